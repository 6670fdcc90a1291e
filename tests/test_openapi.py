"""The node's real answers, and the calls it makes to a dispatcher, against docs/openapi.yaml.

A real ``NodeService`` (cpu backend, loopback, port 0) is asked every
documented route that needs no ``llama-server``; its answers are validated with
openapi-core (status, headers, body schema). Error answers that belong to no
operation (an unknown path, a wrong method) are checked against the ``Error``
schema. A fake dispatcher records what a real ``DispatcherLink`` sends; each
register / heartbeat / deregister call is validated as an OpenAPI webhook,
bearer auth included. The proxied success paths need a real ``llama-server``
and are marked ``llama``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import pytest
import pytest_twisted
import treq
import yaml
from jsonschema import Draft202012Validator
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.testing import MockRequest, MockResponse
from openapi_core.validation.request.exceptions import RequestValidationError, SecurityValidationError
from openapi_core.validation.response.exceptions import InvalidData, MissingRequiredHeader
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from twisted.internet.task import deferLater
from twisted.web.resource import Resource as WebResource
from twisted.web.server import Site
from werkzeug.datastructures import Headers, ImmutableMultiDict

from rolemesh_node.config import ModelSpec, NodeConfig
from rolemesh_node.dispatcher import (
    DEREGISTER_PATH,
    HEARTBEAT_PATH,
    NODE_ENDPOINTS,
    REGISTER_PATH,
    DispatcherLink,
)

SPEC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
TOKEN = "openapi-test-token-5d41402a"


# ==========================================================================
# the document


@pytest.fixture(scope="module")
def openapi() -> OpenAPI:
    return OpenAPI.from_file_path(str(SPEC_PATH))  # also checks the document itself


@pytest.fixture(scope="module")
def raw_spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))


def schema_validator(raw_spec: dict[str, Any], name: str) -> Draft202012Validator:
    """A JSON Schema validator for ``#/components/schemas/<name>`` (refs resolved in the document)."""
    resource = Resource.from_contents(raw_spec, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:rolemesh:openapi", resource)
    return Draft202012Validator({"$ref": f"urn:rolemesh:openapi#/components/schemas/{name}"}, registry=registry)


def test_document_is_valid_openapi_3_1(openapi: OpenAPI, raw_spec: dict[str, Any]) -> None:
    assert raw_spec["openapi"].startswith("3.1")
    assert set(raw_spec["paths"]) == {"/health", "/ready", "/v1/models", "/v1/models/{model}", "/v1/node/inventory",
                                      "/v1/node/reload", "/v1/node/devices/{device}/logs", "/v1/node/status", "/",
                                      "/ui/{file}",
                                      "/v1/chat/completions", "/v1/completions", "/v1/embeddings"}


def test_document_matches_the_code(raw_spec: dict[str, Any]) -> None:
    hooks = raw_spec["webhooks"]
    assert {hook["post"]["x-rolemesh-path"] for hook in hooks.values()} == {
        REGISTER_PATH, HEARTBEAT_PATH, DEREGISTER_PATH}
    endpoints = raw_spec["components"]["schemas"]["Capabilities"]["properties"]["endpoints"]["items"]["enum"]
    assert set(endpoints) == set(NODE_ENDPOINTS)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        responses = raw_spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "413", "429", "502", "503", "504"} <= set(responses)


def test_document_examples_match_their_schemas(raw_spec: dict[str, Any]) -> None:
    schemas = raw_spec["components"]["schemas"]
    checked = 0
    for name, schema in schemas.items():
        for example in schema.get("examples", []):
            schema_validator(raw_spec, name).validate(example)
            checked += 1
    assert checked >= 3


def test_response_validation_is_strict(openapi: OpenAPI) -> None:
    """An undocumented field or a missing one fails: the check above really checks."""
    request = MockRequest("http://127.0.0.1:8088", "GET", "/health")
    good = {"status": "ok", "node_id": "n1", "uptime_s": 1.0, "devices": 1, "discovered": True}
    headers = {"X-Request-Id": "abc"}
    openapi.validate_response(request, MockResponse(json.dumps(good).encode(), headers=headers))
    for bad in ({**good, "extra": 1}, {k: v for k, v in good.items() if k != "node_id"}, {**good, "status": "no"}):
        with pytest.raises(InvalidData):
            openapi.validate_response(request, MockResponse(json.dumps(bad).encode(), headers=headers))
    with pytest.raises(MissingRequiredHeader):  # X-Request-Id is required
        openapi.validate_response(request, MockResponse(json.dumps(good).encode()))


def test_every_readiness_status_is_documented(openapi: OpenAPI, raw_spec: dict[str, Any]) -> None:
    from rolemesh_node.node import Serving

    documented = raw_spec["components"]["schemas"]["Readiness"]["properties"]["status"]["enum"]
    assert documented[0] == "ready"
    request = MockRequest("http://127.0.0.1:8088", "GET", "/ready")
    headers = {"X-Request-Id": "abc"}
    ready = Serving(True, "ready").to_json()
    openapi.validate_response(request, MockResponse(json.dumps(ready).encode(), headers=headers))
    for status in documented[1:]:
        doc = Serving(False, status, "why").to_json()
        openapi.validate_response(request, MockResponse(json.dumps(doc).encode(), status_code=503, headers=headers))
    with pytest.raises(InvalidData):
        doc = Serving(False, "draining-but-undocumented", "why").to_json()
        openapi.validate_response(request, MockResponse(json.dumps(doc).encode(), status_code=503, headers=headers))


# ==========================================================================
# a real node on loopback


class Recorder(WebResource):
    """A fake dispatcher: records each call (path, headers, body), answers 200."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def render_POST(self, request: Any) -> bytes:
        self.calls.append({
            "path": request.path.decode(),
            "headers": {k.decode(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()},
            "body": request.content.read(),
            "content_type": (request.getHeader(b"content-type") or b"").decode(),
        })
        request.setHeader(b"content-type", b"application/json")
        return b'{"ok": true}'

    def of(self, path: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["path"] == path]


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await deferLater(reactor, 0.01, lambda: None)


class Node:
    """A running NodeService with a DispatcherLink talking to a Recorder."""

    def __init__(self, tmp_path: Path, models: dict[str, ModelSpec] | None = None) -> None:
        from twisted.internet import reactor

        from rolemesh_node.service import makeService

        self.recorder = Recorder()
        site = Site(self.recorder)
        site.noisy = False
        self.dispatcher_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.config = NodeConfig(
            backend="cpu", cpu_devices=2, listen_host="127.0.0.1", listen_port=0, node_id="openapi-node",
            state_dir=tmp_path, max_request_body_bytes=2048, models=models or {},
            dispatcher_base_url=f"http://127.0.0.1:{self.dispatcher_port.getHost().port}",
            dispatcher_token=TOKEN, heartbeat_interval_s=0.05, dispatcher_timeout_s=1.0)
        self.service = makeService(self.config, reactor)
        self.link: DispatcherLink | None = None

    async def start(self) -> None:

        self.service.startService()
        await self.service.when_discovered()
        self.port = self.service.port
        self.base = f"http://127.0.0.1:{self.port}"
        self.link = self.service.dispatcher  # wired by makeService

    async def stop(self) -> None:
        try:
            await self.service.stopService()
        finally:
            await self.dispatcher_port.stopListening()

    async def call(self, method: str, path: str, body: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        response = await treq.request(method, self.base + path, data=body, headers=headers,
                                      persistent=False)
        content = await response.content()
        return response.code, {k.decode(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}, content


def check_response(openapi: OpenAPI, node: Node, method: str, path: str, status: int, headers: dict[str, str],
                   body: bytes, request_body: bytes | None = None) -> None:
    """Validate one real answer against its operation in the document."""
    path, _, query = path.partition("?")
    request = MockRequest(node.base, method, path, data=request_body, content_type="application/json",
                          args=ImmutableMultiDict(parse_qsl(query)))
    content_type = headers.get("Content-Type", "")
    response = MockResponse(body, status_code=status, headers=headers, content_type=content_type)
    openapi.validate_response(request, response)


def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "present.gguf"
    path.write_bytes(b"GGUF" + bytes(64))  # never loaded here: only its presence matters
    return path


@pytest.fixture
def models(tmp_path: Path) -> dict[str, ModelSpec]:
    return {
        "alpha": ModelSpec(name="alpha", path=model_file(tmp_path), ctx_size=512, aliases=("a",)),
        "ghost": ModelSpec(name="ghost", path=tmp_path / "missing.gguf", embedding=True, ttl_s=30.0),
    }


@pytest_twisted.ensureDeferred
async def test_node_answers_match_the_document(openapi: OpenAPI, raw_spec: dict[str, Any], tmp_path: Path,
                                               models: dict[str, ModelSpec]) -> None:
    node = Node(tmp_path, models)
    await node.start()
    try:
        # ------------------------------------------------ the node's own routes
        for path in ("/health", "/ready", "/v1/models", "/v1/node/inventory", "/v1/node/status"):
            status, headers, body = await node.call("GET", path)
            assert status == 200, (path, body)
            check_response(openapi, node, "GET", path, status, headers, body)
        for path in ("/health", "/ready"):
            status, headers, body = await node.call("HEAD", path)
            assert status == 200 and body == b""
            check_response(openapi, node, "HEAD", path, status, headers, body)

        status, headers, body = await node.call("GET", "/", headers={"Accept": "text/html"})
        assert status == 200
        check_response(openapi, node, "GET", "/", status, headers, body)
        await node.call("POST", "/v1/embeddings", b'{"model": "ghost", "input": "x"}')  # a 503: a recent error
        status_doc = json.loads((await node.call("GET", "/v1/node/status"))[2])
        assert status_doc["dispatcher"]["state"] in ("registering", "registered") and status_doc["errors"]
        node.service.node.slots["cpu:1"].output.add("alpha", 4242, 2, ["main: model loaded"])  # no child here
        for path, status in [("/v1/node/devices/cpu:1/logs?lines=5", 200), ("/v1/node/devices/gpu:9/logs", 404),
                             ("/v1/node/devices/cpu:0/logs?lines=x", 400)]:
            got, headers, body = await node.call("GET", path)
            assert got == status, (path, body)
            check_response(openapi, node, "GET", path, got, headers, body)

        models_doc = json.loads((await node.call("GET", "/v1/models"))[2])
        assert {m["id"]: m["state"] for m in models_doc["data"]} == {"alpha": "available", "ghost": "unavailable"}
        inventory = json.loads((await node.call("GET", "/v1/node/inventory"))[2])
        assert [d["id"] for d in inventory["devices"]] == ["cpu:0", "cpu:1"]
        assert inventory["devices"][0]["child"]["state"] == "idle"

        # ------------------------------------------------ models.retrieve
        for path, status in (("/v1/models/alpha", 200), ("/v1/models/a", 200), ("/v1/models/ghost", 200),
                             ("/v1/models/nope", 404)):
            got, headers, body = await node.call("GET", path)
            assert got == status, (path, body)
            check_response(openapi, node, "GET", path, got, headers, body)
        assert json.loads((await node.call("GET", "/v1/models/a"))[2])["id"] == "alpha"
        assert json.loads((await node.call("GET", "/v1/models/nope"))[2])["error"]["code"] == "model_not_found"

        # ------------------------------ crash cooldown: shown, with until and why
        slots = node.service.node.slots
        for _ in range(node.config.crash_limit):
            slots["cpu:0"].crashes.record("alpha", "exit code 1")
        doc = json.loads((await node.call("GET", "/v1/models/alpha"))[2])
        assert doc["state"] == "available" and doc["cooldown"]["devices"] == ["cpu:0"]  # cpu:1 can still run it
        for _ in range(node.config.crash_limit):
            slots["cpu:1"].crashes.record("alpha", "exit code 1")
        for path in ("/v1/models", "/v1/models/alpha", "/v1/node/inventory"):
            got, headers, body = await node.call("GET", path)
            check_response(openapi, node, "GET", path, got, headers, body)
        doc = json.loads((await node.call("GET", "/v1/models/alpha"))[2])
        assert doc["state"] == "cooldown" and doc["cooldown"]["devices"] == ["cpu:0", "cpu:1"]
        assert doc["cooldown"]["until"] > time.time() and "3 failures" in doc["cooldown"]["reason"]
        inventory = json.loads((await node.call("GET", "/v1/node/inventory"))[2])
        assert [m["state"] for m in inventory["models"]] == ["cooldown", "unavailable"]

        # ------------------------------------- errors of the proxied routes
        cases = [
            ("/v1/chat/completions", b'{"model": "no-such-model", "messages": []}', 404, "model_not_found"),
            ("/v1/chat/completions", b'{"model": ', 400, "invalid_json"),
            ("/v1/completions", b"[1, 2]", 400, "invalid_request"),
            ("/v1/completions", b'{"prompt": "x"}', 400, "missing_model"),
            ("/v1/embeddings", b'{"model": "alpha", "input": "x"}', 400, "wrong_model_kind"),
            ("/v1/chat/completions", b'{"model": "ghost", "messages": []}', 400, "wrong_model_kind"),
            # what llama-server would answer 500: the node refuses it (400)
            ("/v1/chat/completions", b'{"model": "a", "messages": [{"content": "x"}]}', 400, "invalid_request"),
            ("/v1/chat/completions", b'{"model": "a", "messages": [{"role": "u", "content": [{"type": "text"}]}]}',
             400, "invalid_request"),
            ("/v1/embeddings", b'{"model": "ghost", "input": "x"}', 503, None),
            ("/v1/completions", b'{"model": "a", "prompt": "' + b"x" * 4096 + b'"}', 413, "request_too_large"),
        ]
        for path, request_body, expected, code in cases:
            status, headers, body = await node.call("POST", path, request_body,
                                                    {"Content-Type": "application/json"})
            assert status == expected, (path, request_body[:40], status, body)
            error = json.loads(body)["error"]
            if code is not None:
                assert error["code"] == code
            check_response(openapi, node, "POST", path, status, headers, body, request_body)

        # ---------------- errors outside any operation: checked on their schema
        error_schema = schema_validator(raw_spec, "Error")
        others = [
            ("GET", "/v1/chat/completions", 405, "POST"),
            ("PUT", "/v1/embeddings", 405, "POST"),
            ("POST", "/health", 405, "GET, HEAD"),
            ("PUT", "/ready", 405, "GET, HEAD"),
            ("DELETE", "/v1/models", 405, "GET, HEAD"),
            ("POST", "/v1/node/inventory", 405, "GET, HEAD"),
            ("GET", "/no/such/path", 404, None),
            ("POST", "/v1/nodes/register", 404, None),  # the node is not a dispatcher
        ]
        for method, path, expected, allow in others:
            status, headers, body = await node.call(method, path)
            assert status == expected, (method, path, status)
            assert headers["Content-Type"] == "application/json"
            error_schema.validate(json.loads(body))
            assert json.loads(body)["error"]["code"] == ("not_found" if expected == 404 else "method_not_allowed")
            if allow is not None:
                assert {m.strip() for m in headers["Allow"].split(",")} == {m.strip() for m in allow.split(",")}

        # ------------------------------------------- what the dispatcher got
        await eventually(lambda: len(node.recorder.of(HEARTBEAT_PATH)) >= 3)
    finally:
        await node.stop()

    calls = node.recorder.calls
    assert [c["path"] for c in calls][:2] == [REGISTER_PATH, HEARTBEAT_PATH]
    assert calls[-1]["path"] == DEREGISTER_PATH
    names = {REGISTER_PATH: "nodeRegister", HEARTBEAT_PATH: "nodeHeartbeat", DEREGISTER_PATH: "nodeDeregister"}
    for call in calls:
        check_webhook(openapi, names[call["path"]], call)
    registration = json.loads(calls[0]["body"])
    assert [m["name"] for m in registration["models"]] == ["alpha", "ghost"]
    assert registration["url"] == node.base


class WebhookCall:
    """An openapi-core ``WebhookRequest`` built from a recorded call."""

    def __init__(self, name: str, call: dict[str, Any]) -> None:
        self.name = name
        self.method = "post"
        self.body = call["body"]
        self.content_type = call["content_type"]
        self.parameters = RequestParameters(header=Headers(call["headers"]), query=ImmutableMultiDict(),
                                            cookie=ImmutableMultiDict())


def check_webhook(openapi: OpenAPI, name: str, call: dict[str, Any]) -> None:
    request = WebhookCall(name, call)
    openapi.validate_request(request)  # body schema and bearer auth
    assert call["headers"]["Authorization"] == f"Bearer {TOKEN}"
    openapi.validate_response(request, MockResponse(b'{"ok": true}', status_code=200))


def test_webhook_validation_rejects_a_wrong_payload(openapi: OpenAPI) -> None:
    good = {"node_id": "n1", "seq": 1, "time": 1.0, "started_at": 1.0, "discovered": True,
            "llama_server_error": None, "devices": [], "waiting": {}}
    headers = {"Authorization": "Bearer x", "Content-Type": "application/json"}
    check_webhook(openapi, "nodeHeartbeat", {"body": json.dumps(good).encode(), "content_type": "application/json",
                                             "headers": {**headers, "Authorization": f"Bearer {TOKEN}"}})
    for bad in ({**good, "seq": 0}, {**good, "surprise": 1}, {k: v for k, v in good.items() if k != "time"}):
        with pytest.raises(RequestValidationError):
            openapi.validate_request(WebhookCall("nodeHeartbeat", {
                "body": json.dumps(bad).encode(), "content_type": "application/json", "headers": headers}))
    with pytest.raises(SecurityValidationError):  # no bearer token
        openapi.validate_request(WebhookCall("nodeHeartbeat", {
            "body": json.dumps(good).encode(), "content_type": "application/json",
            "headers": {"Content-Type": "application/json"}}))


# ==========================================================================
# the proxied success paths: a real llama-server


def _llama_available() -> bool:
    from rolemesh_node.llama_server import LlamaServerNotFound, find_llama_server

    try:
        find_llama_server(None)
        return True
    except LlamaServerNotFound:
        return False


def sse_events(body: bytes) -> list[str]:
    return [line[len("data: "):] for line in body.decode().split("\n") if line.startswith("data: ")]


@pytest.mark.llama
@pytest_twisted.ensureDeferred
async def test_proxied_answers_match_the_document(openapi: OpenAPI, raw_spec: dict[str, Any],
                                                  tmp_path: Path) -> None:
    if not _llama_available():
        pytest.skip("no llama-server binary")
    pytest.importorskip("gguf")
    from rolemesh_node.tinymodel import write_tiny_model

    models = {
        "alpha": ModelSpec(name="alpha", path=write_tiny_model(tmp_path / "a.gguf", seed=1), ctx_size=512),
        "emb": ModelSpec(name="emb", path=write_tiny_model(tmp_path / "e.gguf", seed=2), ctx_size=512,
                         embedding=True),
    }
    node = Node(tmp_path, models)
    await node.start()
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    try:
        cases: list[tuple[str, dict[str, Any]]] = [
            ("/v1/chat/completions", chat),
            ("/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 3}),
            ("/v1/embeddings", {"model": "emb", "input": "hi"}),
        ]
        for path, payload in cases:
            request_body = json.dumps(payload).encode()
            status, headers, body = await node.call("POST", path, request_body,
                                                    {"Content-Type": "application/json"})
            assert status == 200, (path, body)
            assert headers["X-Rolemesh-Device"].startswith("cpu:")
            check_response(openapi, node, "POST", path, status, headers, body, request_body)

        # an error from llama-server itself is relayed (code is then an integer)
        request_body = json.dumps({"model": "alpha"}).encode()
        status, headers, body = await node.call("POST", "/v1/chat/completions", request_body,
                                                {"Content-Type": "application/json"})
        assert status == 400
        check_response(openapi, node, "POST", "/v1/chat/completions", status, headers, body, request_body)

        # streams: every event against the documented event schema
        for path, payload, schema in [
            ("/v1/chat/completions", {**chat, "stream": True}, "ChatCompletionChunk"),
            ("/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 3, "stream": True},
             "CompletionStreamEvent"),
        ]:
            status, headers, body = await node.call("POST", path, json.dumps(payload).encode(),
                                                    {"Content-Type": "application/json"})
            assert status == 200
            assert headers["Content-Type"].startswith("text/event-stream")
            events = sse_events(body)
            assert events[-1] == "[DONE]"
            validator = schema_validator(raw_spec, schema)
            for event in events[:-1]:
                validator.validate(json.loads(event))
            media = raw_spec["components"]["responses"][
                "ChatCompletion" if schema == "ChatCompletionChunk" else "Completion"]["content"]
            assert media["text/event-stream"]["x-rolemesh-event-schema"]["$ref"].endswith("/" + schema)
    finally:
        await node.stop()


def test_reload_results_match_the_document(raw_spec: dict[str, Any]) -> None:
    from rolemesh_node.config import NodeConfig
    from rolemesh_node.reload import ReloadResult, diff

    validator = schema_validator(raw_spec, "ReloadResult")
    changes = diff(NodeConfig(), NodeConfig(listen_port=9000, request_timeout_s=5.0))
    for result in (ReloadResult("applied", "/etc/node.yaml", changes=changes), ReloadResult("unchanged", "n.yaml"),
                   ReloadResult("rejected", "n.yaml", "config error: n.yaml: listen_port: expected an integer")):
        validator.validate(result.to_json())
    deregister = schema_validator(raw_spec, "DeregisterRequest")
    from rolemesh_node.dispatcher import DEREGISTER_REASONS

    for reason in DEREGISTER_REASONS:
        deregister.validate({"node_id": "n1", "started_at": 1.0, "time": 2.0, "reason": reason})
