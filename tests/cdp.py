"""A small client for a real headless Chromium, over its DevTools protocol (no driver, nothing downloaded).

Chromium is started with ``--remote-debugging-port=0``; the port it took is read from ``DevToolsActivePort`` in
its profile directory, the page's websocket from ``/json/list``, and commands go over that websocket
(``websocket-client``). Every call blocks: run them in a thread (``deferToThread``) when the reactor must go on
serving the page. Events that arrive meanwhile are kept in ``events``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_or_skip() -> str:
    """The Chromium binary. Missing: skip loudly, or fail when ``CI`` is set (CI must never skip this)."""
    path = next((found for name in NAMES if (found := shutil.which(name))), None)
    problem = None if path else "no chromium binary on PATH (Debian: apt-get install chromium)"
    try:
        import websocket  # noqa: F401  (websocket-client, in the test extra)
    except ImportError:
        problem = "the websocket-client package is missing (pip install -e '.[test]')"
    if problem is None:
        assert path is not None
        return path
    message = f"CHROMIUM MISSING — the status page's browser test did NOT run: {problem}. .ci/run installs it."
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: a missing browser is an error there)", pytrace=False)
    pytest.skip(message)


class Chromium:
    def __init__(self, binary: str, directory: Path, width: int = 1500, height: int = 1000) -> None:
        self.binary = binary
        self.directory = directory
        self.size = (width, height)
        self.process: subprocess.Popen[bytes] | None = None
        self.ws: Any = None
        self.events: list[dict[str, Any]] = []
        self._id = 0

    def start(self, timeout: float = 60.0) -> None:
        profile = self.directory / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
                "--hide-scrollbars", f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        with open(self.directory / "chromium.log", "wb") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port: "
                                   + (self.directory / "chromium.log").read_text(errors="replace")[-2000:])
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                pages = [t for t in json.load(answer) if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        import websocket

        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait until its document has loaded."""
        self.call("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll ``expression`` until it is truthy (the page renders on its own timer)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # the document it needs is not there yet
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out waiting for {expression!r}; the page shows:\n{text}")
            time.sleep(0.1)

    def type_text(self, text: str) -> None:
        """Type into the focused element, as a keyboard would."""
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
            self.ws = None
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
