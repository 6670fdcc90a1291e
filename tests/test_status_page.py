"""The status page's HTTP side: ``GET /`` for a browser, its files under ``/ui/``, ``GET /v1/node/status``.

The page and its files carry no data and need no key; the data needs the key. JSON clients of ``/`` keep the
answers they had (a JSON 404, or a 401 when keys are set). The browser itself is in test_status_browser.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq

from rolemesh_node.api import UI_FILES, ui_file

KEY = "status-page-test-key-0123456789"
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


async def get(service: Any, path: str, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
    response = await treq.get(f"http://127.0.0.1:{service.port}{path}", headers=headers, persistent=False)
    return response, await response.content()


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return None if not values else values[0]


@pytest.fixture
def config(tiny_models: dict[str, Path], stand_in_bin: str) -> dict[str, Any]:
    return {"backend": "cpu", "cpu_devices": 2, "llama_server_bin": stand_in_bin, "node_id": "page-node",
            "models": {"tiny-a": {"path": str(tiny_models["tiny-a"])}, "ghost": {"path": "ghost.gguf"}}}


def test_the_files_ship_in_the_package_and_load_nothing_from_elsewhere() -> None:
    for name in UI_FILES:
        text = ui_file(name).decode()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text.replace("http://www.w3.org", "")), name
        assert "innerHTML" not in text and "eval(" not in text and "EventSource" not in text
    page = ui_file("index.html").decode()
    assert '<script src="/ui/status.js" defer></script>' in page
    assert '<link rel="icon" href="data:,">' in page  # no favicon request
    script = ui_file("status.js").decode()
    assert "sessionStorage" in script and '"Bearer "' in script and "localStorage" not in script


@pytest_twisted.ensureDeferred
async def test_page_for_browsers_and_the_old_answers_for_the_rest(node_service, config) -> None:
    service = await node_service(config)
    response, body = await get(service, "/", HTML)
    assert response.code == 200
    assert header(response, "content-type") == "text/html; charset=utf-8"
    csp = header(response, "content-security-policy") or ""
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert header(response, "x-content-type-options") == "nosniff"
    assert b"page-node" not in body and b"tiny-a" not in body  # the page carries no data
    for name in ("status.js", "status.css"):
        response, body = await get(service, f"/ui/{name}")
        assert response.code == 200 and body == ui_file(name)
        assert header(response, "content-type") == UI_FILES[name].decode()
    for path in ("/ui/index.html", "/ui/nope.js", "/ui/..%2Fapi.py", "/ui/"):
        response, body = await get(service, path)
        assert response.code == 404 and json.loads(body)["error"]["code"] == "not_found", path
    for headers in (None, {"Accept": "application/json"}, {"Accept": "*/*"}):  # what / answered before
        response, body = await get(service, "/", headers)
        assert response.code == 404 and header(response, "content-type") == "application/json"
        assert json.loads(body)["error"]["code"] == "not_found"
    response = await treq.post(f"http://127.0.0.1:{service.port}/", headers=HTML, persistent=False)
    assert response.code == 405  # a documented path's wrong method
    assert {m.strip() for m in (header(response, "allow") or "").split(",")} == {"GET", "HEAD"}
    await response.content()


@pytest_twisted.ensureDeferred
async def test_with_keys_the_page_is_open_and_the_data_is_not(node_service, config) -> None:
    service = await node_service({**config, "api_keys": [KEY]})
    assert (await get(service, "/", HTML))[0].code == 200
    assert (await get(service, "/ui/status.js"))[0].code == 200
    assert (await get(service, "/"))[0].code == 401  # a JSON client: as before
    assert (await get(service, "/v1/node/status", HTML))[0].code == 401
    assert (await get(service, "/v1/node/status?key=" + KEY))[0].code == 401  # never a key in a URL
    response, body = await get(service, "/v1/node/status", {"Authorization": f"Bearer {KEY}"})
    assert response.code == 200 and json.loads(body)["node_id"] == "page-node"


@pytest_twisted.ensureDeferred
async def test_status_document(node_service, config) -> None:
    service = await node_service(config)
    for _ in range(3):  # a model whose file is missing: 503, one of the recent errors, counted three times
        response = await treq.post(f"http://127.0.0.1:{service.port}/v1/chat/completions",
                                   data=b'{"model": "ghost", "messages": []}', persistent=False)
        assert response.code == 503
        await response.content()
    response, body = await get(service, "/v1/node/status")
    assert response.code == 200 and header(response, "cache-control") == "no-store"
    doc = json.loads(body)
    assert doc["node_id"] == "page-node" and doc["backend"] == "cpu" and doc["serving"]["ready"] is True
    assert doc["dispatcher"] is None
    assert [d["id"] for d in doc["devices"]] == ["cpu:0", "cpu:1"]
    assert doc["devices"][0]["child"]["state"] == "idle" and doc["devices"][0]["metrics"] is not None
    assert [m["name"] for m in doc["models"]] == ["tiny-a", "ghost"]
    assert doc["models"][0] == {"name": "tiny-a", "state": "available", "loaded_on": [], "waiting": 0,
                                "oldest_wait_s": None, "service_s": None}
    [error] = doc["errors"]
    assert error["source"] == "request" and error["count"] == 3 and "ghost" in error["message"]


def test_recent_errors_fold_repeats_and_stay_bounded() -> None:
    from rolemesh_node.recent import RecentErrors

    now = [100.0]
    errors = RecentErrors(size=3, clock=lambda: now[0])
    errors.slot_event("failed", {"device": "cpu:0", "model": "a", "error": "model 'a' could not be made ready"})
    errors.slot_event("crash", {"device": "cpu:0", "model": "a"}, last_error="a crashed: killed by signal 9")
    now[0] = 101.0
    errors.slot_event("crash", {"device": "cpu:0", "model": "a"}, last_error="a crashed: killed by signal 9")
    errors.slot_event("ready", {"device": "cpu:0", "model": "a"})  # not an error
    assert [(e["source"], e["count"], e["at"]) for e in errors.to_json()] == [("crash", 2, 101.0),
                                                                              ("start", 1, 100.0)]
    for i in range(5):
        errors.add("request", f"503 number {i}")
    assert [e["message"] for e in errors.to_json()] == ["503 number 4", "503 number 3", "503 number 2"]
