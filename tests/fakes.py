"""Fakes for Clock-driven unit tests: a process reactor, a scripted HTTP client, a fake child."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from rolemesh_node.llama_server import ChildStartError, ChildState, ExitInfo


class FakeProcessTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.stdin_closed = False

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def closeStdin(self) -> None:
        self.stdin_closed = True


class ProcessClock(Clock):
    """A Clock that also "spawns" processes: it connects the protocol to a fake transport."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[str, str]]] = []

    def spawnProcess(self, proto: Any, exe: str, args: list[str], env: dict[str, str] | None = None,
                     **kwargs: Any) -> FakeProcessTransport:
        transport = FakeProcessTransport(1000 + len(self.spawned))
        self.spawned.append((proto, list(args), dict(env or {})))
        proto.makeConnection(transport)
        return transport


def exited(code: int | None = 0, signal: int | None = None) -> Failure:
    if code == 0 and signal is None:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(exitCode=code, signal=signal))


class FakeResponse:
    def __init__(self, code: int, body: Any) -> None:
        self.code = code
        self._body = body if isinstance(body, bytes) else json.dumps(body).encode()

    def content(self) -> Deferred[bytes]:
        return succeed(self._body)


class ScriptedHTTP:
    """``get(url)`` answers from ``routes[path]``: a FakeResponse, or None to hang (a Deferred kept)."""

    def __init__(self) -> None:
        self.routes: dict[str, FakeResponse | None] = {}
        self.calls: list[str] = []
        self.hanging: list[Deferred[Any]] = []

    def loading(self) -> None:
        self.routes = {"/health": FakeResponse(503, {"error": {"message": "Loading model", "code": 503}}),
                       "/v1/models": FakeResponse(503, {"error": {"message": "Loading model"}})}

    def ready(self, model: str) -> None:
        self.routes = {"/health": FakeResponse(200, {"status": "ok"}),
                       "/v1/models": FakeResponse(200, {"data": [{"id": model, "meta": {"n_vocab": 1}}]})}

    def get(self, url: str) -> Deferred[Any]:
        path = "/" + url.split("/", 3)[3]
        self.calls.append(path)
        answer = self.routes.get(path)
        if answer is None:
            d: Deferred[Any] = Deferred()
            self.hanging.append(d)
            return d
        return succeed(answer)


class FakeChild:
    """Stands in for LlamaServerChild in DeviceSlot tests; the test drives its fate."""

    instances: list["FakeChild"] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.model = kwargs["model"]
        self.port = kwargs["port"]
        self.device_id = kwargs["device_id"]
        self.on_exit = kwargs["on_exit"]
        self.state = ChildState.STARTING
        self.tail = ["fake line"]
        self.pid = 4242
        self.started_at = 1.0
        self.ready_at = None
        self.ready_d: Deferred[Any] = Deferred()
        self.stop_calls = 0
        self.hung_reason = None
        FakeChild.instances.append(self)

    def start(self) -> Deferred[Any]:
        return self.ready_d

    def become_ready(self) -> None:
        self.state = ChildState.READY
        self.ready_d.callback(self)

    def fail_start(self, error: Exception) -> None:
        self.state = ChildState.EXITED
        self.ready_d.errback(error)

    def stop(self, grace_s: float) -> Deferred[Any]:
        self.stop_calls += 1
        was_starting = self.state is ChildState.STARTING
        self.state = ChildState.EXITED
        if was_starting and not self.ready_d.called:  # as LlamaServerChild: the start fails at once
            self.ready_d.errback(ChildStartError(self.device_id, self.model, "stopped before it was ready"))
        info = ExitInfo(0, None, 0.0, expected=True)
        self.on_exit(self, info)
        return succeed(info)

    def die(self, code: int = 1) -> None:
        self.state = ChildState.EXITED
        self.on_exit(self, ExitInfo(code, None, 0.0, expected=False))
