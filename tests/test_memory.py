"""What keeps the agent's resident memory down, checked without measuring it (docs/performance.md, idle RSS).

* the modules the agent imports, as ``rolemesh-node-agent`` imports them (the TLS gate first, then the
  reactor and the service), leave out the heavy ones it does without: Klein and Werkzeug,
  prometheus-client, and without an https dispatcher the TLS stack;
* the one ``malloc_trim`` after start (:mod:`rolemesh_node.memory`) runs where there is glibc.
"""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest
from twisted.internet.defer import Deferred

from rolemesh_node.memory import release_freed_memory, release_once_discovered
from tests.subprocs import env

#: never imported by the agent (the TLS ones: unless the dispatcher is https)
LEFT_OUT = ("klein", "werkzeug", "prometheus_client", "OpenSSL", "cryptography", "ssl", "_ssl", "_hashlib",
            "importlib.resources")

AS_THE_AGENT = """
import sys
from rolemesh_node.config import NodeConfig
from rolemesh_node.tls import skip_tls_unless_needed
skip_tls_unless_needed(NodeConfig(dispatcher_base_url={url!r}))
from twisted.internet import reactor
from rolemesh_node.service import makeService
from rolemesh_node.logs import level_observer
from rolemesh_node.memory import release_once_discovered
from rolemesh_node.signals import install_signal_handlers
print(" ".join(name for name in {left_out!r} if sys.modules.get(name) is not None))
"""


def loaded(url: str | None) -> set[str]:
    code = AS_THE_AGENT.format(url=url, left_out=LEFT_OUT)
    result = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_agent_imports_none_of_the_heavy_modules_it_does_without() -> None:
    assert loaded(None) == set()
    assert loaded("http://dispatcher:8080") == set()


def test_an_https_dispatcher_gets_the_tls_stack() -> None:
    assert {"OpenSSL", "ssl", "_hashlib"} <= loaded("https://dispatcher")


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") != "libc.so.6",
                    reason="malloc_trim is glibc's")
def test_the_freed_memory_goes_back_once_discovered(monkeypatch: pytest.MonkeyPatch) -> None:
    assert release_freed_memory()
    calls: list[bool] = []
    monkeypatch.setattr("rolemesh_node.memory.release_freed_memory", lambda: calls.append(True) or True)

    class Service:
        discovered: Deferred[None] = Deferred()

        def when_discovered(self) -> Deferred[None]:
            return self.discovered

    service = Service()
    release_once_discovered(service)
    assert calls == []
    service.discovered.callback(None)
    assert calls == [True]
