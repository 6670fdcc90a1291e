"""The TLS stack (pyOpenSSL, cryptography) is loaded only for an https dispatcher.

Unit: :func:`rolemesh_node.tls.skip_tls_unless_needed`. Real path: a node run
as ``rolemesh-node-agent`` and as ``twistd -n rolemesh-node``, whose memory
maps show whether cryptography's extension was loaded.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from rolemesh_node.config import NodeConfig
from rolemesh_node.tls import needs_tls, skip_tls_unless_needed
from tests.test_run_modes import AGENT, TWISTD, kill_group, start, wait_exit, wait_healthy, write_node_config

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")


def test_needs_tls_only_for_an_https_dispatcher() -> None:
    assert not needs_tls(NodeConfig())
    assert not needs_tls(NodeConfig(dispatcher_base_url="http://dispatcher:8080"))
    assert needs_tls(NodeConfig(dispatcher_base_url="HTTPS://dispatcher"))


def test_skip_blocks_the_import_only_when_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "OpenSSL", raising=False)
    assert skip_tls_unless_needed(NodeConfig())
    assert sys.modules["OpenSSL"] is None
    with pytest.raises(ImportError):
        import OpenSSL  # noqa: F401
    monkeypatch.delitem(sys.modules, "OpenSSL")
    assert not skip_tls_unless_needed(NodeConfig(dispatcher_base_url="https://d"))
    assert "OpenSSL" not in sys.modules
    monkeypatch.setitem(sys.modules, "OpenSSL", object())  # loaded already: left alone
    assert not skip_tls_unless_needed(NodeConfig())


def _tls_loaded(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "cryptography" in maps or "OpenSSL" in maps


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
        proc.send_signal(signal.SIGTERM)
        assert wait_exit(proc, out) == 0
    finally:
        kill_group(proc)
    assert "Traceback" not in out.read_text()
