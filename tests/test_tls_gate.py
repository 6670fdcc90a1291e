"""The TLS stack (pyOpenSSL, cryptography; the standard library's ssl and _hashlib) is loaded only for an
https dispatcher.

Unit: :func:`rolemesh_node.tls.skip_tls_unless_needed`. Real path: a node run
as ``rolemesh-node-agent`` and as ``twistd -n rolemesh-node``, whose memory
maps show whether cryptography's extension, and the standard library's OpenSSL
bindings, were loaded (under twistd the latter are loaded before the plugin runs).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from rolemesh_node.config import NodeConfig
from rolemesh_node.tls import TLS_MODULES, needs_tls, skip_tls_unless_needed
from tests.test_run_modes import AGENT, TWISTD, kill_group, start, wait_exit, wait_healthy, write_node_config

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")


def test_needs_tls_only_for_an_https_dispatcher() -> None:
    assert not needs_tls(NodeConfig())
    assert not needs_tls(NodeConfig(dispatcher_base_url="http://dispatcher:8080"))
    assert needs_tls(NodeConfig(dispatcher_base_url="HTTPS://dispatcher"))


@pytest.fixture
def tls_modules_restored() -> Any:
    """The test process's own entries for the TLS modules, put back afterwards (this process needs ssl)."""
    saved = {name: sys.modules[name] for name in TLS_MODULES if name in sys.modules}
    try:
        yield
    finally:
        for name in TLS_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def test_skip_blocks_the_import_only_when_not_loaded(tls_modules_restored: None) -> None:
    for name in TLS_MODULES:
        sys.modules.pop(name, None)
    assert skip_tls_unless_needed(NodeConfig()) == list(TLS_MODULES)
    assert all(sys.modules[name] is None for name in TLS_MODULES)
    with pytest.raises(ImportError):
        import OpenSSL  # noqa: F401
    with pytest.raises(ImportError):
        import ssl  # noqa: F401
    for name in TLS_MODULES:
        del sys.modules[name]
    assert skip_tls_unless_needed(NodeConfig(dispatcher_base_url="https://d")) == []
    assert not any(name in sys.modules for name in TLS_MODULES)
    sys.modules["OpenSSL"] = object()  # type: ignore[assignment]  # loaded already: left alone
    assert skip_tls_unless_needed(NodeConfig()) == ["ssl", "_ssl", "_hashlib"]
    assert sys.modules["OpenSSL"] is not None


def test_without_the_tls_modules_the_standard_library_still_does_what_the_node_asks(
        tls_modules_restored: None) -> None:
    import subprocess

    code = ("import sys\n"
            "for name in ('OpenSSL', 'ssl', '_ssl', '_hashlib'): sys.modules[name] = None\n"
            "import hashlib, hmac, http.client, urllib.request, asyncio, secrets, uuid\n"
            "assert hmac.compare_digest(b'a', b'a') and not hmac.compare_digest(b'a', b'b')\n"
            "assert hashlib.sha256(b'x').hexdigest().startswith('2d711642')\n"
            "assert len(secrets.token_hex(4)) == 8 and uuid.uuid4()\n"
            "assert not hasattr(http.client, 'HTTPSConnection')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _tls_loaded(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "cryptography" in maps or "OpenSSL" in maps


def _stdlib_tls_loaded(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "/_ssl." in maps or "/_hashlib." in maps


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize("runner", ["agent", "twistd"])
@pytest.mark.parametrize("https", [False, True], ids=["http-dispatcher", "https-dispatcher"])
def test_a_running_node_loads_tls_only_for_https(tmp_path: Path, free_port: Any, runner: str,
                                                 https: bool) -> None:
    port = free_port()
    config = write_node_config(tmp_path, port)
    # A dispatcher nobody answers on: registration retries in the background.
    scheme = "https" if https else "http"
    with config.open("a") as f:
        f.write(f"dispatcher_base_url: {scheme}://127.0.0.1:{free_port()}\nlog_level: error\n")
    argv = [AGENT, "--config", str(config)] if runner == "agent" else [
        TWISTD, "-n", "--pidfile", "", "rolemesh-node", "--config", str(config)]
    proc, out = start(argv, tmp_path)
    try:
        wait_healthy(port, proc, out)
        assert _tls_loaded(proc.pid) is https, out.read_text()
        if runner == "agent":  # twistd loads them before the plugin runs
            assert _stdlib_tls_loaded(proc.pid) is https, out.read_text()
        proc.send_signal(signal.SIGTERM)
        assert wait_exit(proc, out) == 0
    finally:
        kill_group(proc)
    assert "Traceback" not in out.read_text()
