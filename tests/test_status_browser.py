"""The status page in a real headless Chromium, against a real node with the real llama-server.

The node has an API key: the page (served without one) asks for it, the key is typed into its field, and the
page then shows the device and the model it serves. A request for another model makes the device switch, and
the page shows the switch without being reloaded. Every request the browser made went to the node itself.
A screenshot is saved in the test's temporary directory (and where ``ROLEMESH_STATUS_SCREENSHOT`` says).
Without Chromium the test skips with a loud reason; under CI (``CI`` set) it fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.cdp import Chromium, chromium_or_skip
from tests.test_proxy_real import chat_body, post, proxy_config

KEY = "browser-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}

DEVICE_ROW = "document.querySelector('#devices tr[data-device=\"cpu:0\"]')"


@pytest.mark.llama
@pytest_twisted.ensureDeferred
async def test_status_page_in_a_real_browser(node_service, tiny_models, llama_server_bin, tmp_path: Path) -> None:
    binary = chromium_or_skip()
    service = await node_service(proxy_config(tiny_models, api_keys=[KEY], node_id="browser-node"))
    response = await post(service, "/v1/chat/completions", chat_body("tiny-a"), headers=AUTH)
    assert response.code == 200
    await response.content()

    origin = f"http://127.0.0.1:{service.port}"
    browser = Chromium(binary, tmp_path / "chromium")
    try:
        await deferToThread(browser.start)
        await deferToThread(browser.navigate, origin + "/")
        # no key yet: the page loads (it carries no data) and asks for one
        await deferToThread(browser.wait_for, "document.getElementById('conn').textContent === 'key needed'")
        await deferToThread(browser.evaluate, "window.sameDocument = 'yes'; document.getElementById('key').focus()")
        await deferToThread(browser.type_text, KEY)
        await deferToThread(browser.evaluate, "document.getElementById('key-form').requestSubmit()")

        ready_a = f"{DEVICE_ROW} && {DEVICE_ROW}.dataset.model === 'tiny-a' && {DEVICE_ROW}.dataset.state === 'ready'"
        await deferToThread(browser.wait_for, ready_a)
        text = await deferToThread(browser.evaluate, "document.body.innerText")
        for shown in ("browser-node", "cpu:0", "tiny-a", "tiny-b", "live"):
            assert shown in text, shown
        assert await deferToThread(browser.evaluate, "document.getElementById('key').value") == ""

        # a model switch shows up without a reload
        response = await post(service, "/v1/chat/completions", chat_body("tiny-b"), headers=AUTH)
        assert response.code == 200
        await response.content()
        switched = (f"{DEVICE_ROW}.dataset.model === 'tiny-b' && {DEVICE_ROW}.dataset.state === 'ready' && "
                    "window.sameDocument === 'yes' && "
                    "document.querySelectorAll('#costs tbody tr').length === 2")
        await deferToThread(browser.wait_for, switched)
        row = await deferToThread(browser.evaluate, f"{DEVICE_ROW}.innerText")
        pid = str(service.node.slots["cpu:0"].child.pid)
        assert pid in row and "tiny-b" in row

        # the log viewer reads the device's log with the key
        await deferToThread(browser.evaluate, f"{DEVICE_ROW}.querySelector('button').click()")
        await deferToThread(browser.wait_for, f"document.getElementById('log').textContent.includes('pid={pid}')")

        shot = tmp_path / "status-page.png"
        await deferToThread(browser.screenshot, shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("ROLEMESH_STATUS_SCREENSHOT"):
            shutil.copy(shot, os.environ["ROLEMESH_STATUS_SCREENSHOT"])

        urls = browser.requested_urls()
        assert urls and all(url.startswith(origin + "/") or url.startswith("data:") for url in urls), urls
        assert not any(KEY in url for url in urls)
        stored = await deferToThread(browser.evaluate, "sessionStorage.getItem('rolemesh-node.api-key')")
        assert stored == KEY
        assert json.loads(await deferToThread(browser.evaluate, "JSON.stringify(localStorage)")) == {}
    finally:
        await deferToThread(browser.close)
