"""Child logs: one bounded ring per device across restarts, rotated files, ``GET /v1/node/devices/{id}/logs``.

Unit tests drive :class:`~rolemesh_node.childlog.DeviceLog` with a fixed clock; the real ones run the node
with the real llama-server: a child is killed, the next switch starts another, and the first child's last
lines and its exit are still there — over HTTP, as text and as SSE, and in the file under ``log_dir``.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from rolemesh_node.childlog import DeviceLog, SSEFollower, check_log_dir, file_name, stamp
from rolemesh_node.config import NodeConfig
from tests.test_proxy_real import chat_body, post, proxy_config
from tests.test_supervisor_real import eventually

KEY = "child-logs-test-key-0123456789"


class Collect:
    def __init__(self) -> None:
        self.got: list[str] = []
        self.closed = False

    def lines(self, entries: list[str]) -> None:
        self.got += entries

    def close(self) -> None:
        self.closed = True


# --------------------------------------------------------------------------- unit


def test_ring_is_bounded_and_keeps_every_child() -> None:
    devlog = DeviceLog("cpu:0", size=10, clock=lambda: 0.5)
    devlog.note("a", 1, "started llama-server on port 5")
    devlog.add("a", 1, 2, [f"a line {i}" for i in range(4)])
    devlog.note("a", 1, "exited: killed by signal 9 (unexpected)")
    devlog.add("b", 2, 1, [f"b line {i}" for i in range(6)])
    lines = devlog.tail(100)
    assert len(lines) == 10  # bounded
    assert lines[0] == "1970-01-01T00:00:00.500Z a pid=1 stderr: a line 1"
    assert "1970-01-01T00:00:00.500Z a pid=1 agent: exited: killed by signal 9 (unexpected)" in lines
    assert lines[-1].endswith("b pid=2 stdout: b line 5")
    assert devlog.tail(2) == lines[-2:]
    assert devlog.tail(0) == []


def test_stamp_and_file_name() -> None:
    assert stamp(1767225600.25) == "2026-01-01T00:00:00.250Z"
    assert file_name("cuda:0") == "cuda-0.log"


def test_followers_get_each_batch_until_close() -> None:
    devlog = DeviceLog("cpu:0", size=10, clock=lambda: 0.0)
    first, second = Collect(), Collect()
    devlog.follow(first)
    unsubscribe = devlog.follow(second)
    devlog.add("a", 1, 2, ["one", "two"])
    unsubscribe()
    devlog.add("a", 1, 2, ["three"])
    assert [line.rsplit(" ", 1)[1] for line in first.got] == ["one", "two", "three"]
    assert len(second.got) == 2
    devlog.close()
    assert first.closed and not second.closed
    late = Collect()
    devlog.follow(late)  # a closed log ends a follower at once
    assert late.closed
    devlog.add("a", 1, 2, ["after close"])
    assert devlog.tail(1)[0].endswith("three")


def test_file_rotates_by_size_and_keeps_backups(tmp_path: Path) -> None:
    config = NodeConfig(log_dir=tmp_path, child_log_lines=50, child_log_max_bytes=4096, child_log_backups=2)
    devlog = DeviceLog.for_device("cpu:1", config)
    for batch in range(40):
        devlog.add("tiny-a", 7, 2, [f"batch {batch} line {i} " + "x" * 60 for i in range(5)])
    devlog.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["cpu-1.log", "cpu-1.log.1", "cpu-1.log.2"]  # older ones removed
    for name in names:
        assert os.path.getsize(tmp_path / name) < 4096 + 1024
    last = (tmp_path / "cpu-1.log").read_text().splitlines()[-1]
    assert last.endswith("batch 39 line 4 " + "x" * 60) and " tiny-a pid=7 stderr: " in last
    assert (tmp_path / "cpu-1.log").stat().st_mode & 0o777 == 0o640


@pytest.mark.allow_errors  # nothing is expected at error level; a warning is
def test_a_failing_file_is_dropped_and_the_ring_goes_on() -> None:
    class Full:
        path = "/full/cpu-0.log"

        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    devlog = DeviceLog("cpu:0", size=5, file=Full(), clock=lambda: 0.0)
    devlog.add("a", 1, 2, ["one"])
    assert devlog.file is None
    devlog.add("a", 1, 2, ["two"])
    assert len(devlog.tail(5)) == 2


def test_check_log_dir(tmp_path: Path) -> None:
    assert check_log_dir(tmp_path / "made" / "here") is None and (tmp_path / "made" / "here").is_dir()
    (tmp_path / "file").write_text("x")
    assert check_log_dir(tmp_path / "file") == f"{tmp_path / 'file'} is not a directory"
    assert (check_log_dir(tmp_path / "file" / "below") or "").startswith("cannot create")


class FakeRequest:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.written: list[bytes] = []
        self.producer: Any = None

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self) -> None:
        assert self.producer is not None
        self.producer = None


def test_sse_follower_backlog_lines_keepalive_and_cancel() -> None:
    clock = Clock()
    devlog = DeviceLog("cpu:0", size=10, clock=lambda: 0.0)
    devlog.add("a", 1, 2, ["old one", "old\rtwo"])
    request = FakeRequest()
    done = SSEFollower(request, devlog, clock, keepalive_s=15).start(backlog=1)
    assert request.headers[b"content-type"].startswith(b"text/event-stream")
    assert request.written[0].endswith(b"stderr: old two\n\n") and b"old one" not in request.written[0]
    devlog.add("a", 1, 1, ["new"])
    assert request.written[-1] == b"data: 1970-01-01T00:00:00.000Z a pid=1 stdout: new\n\n"
    clock.advance(15)
    assert request.written[-1] == b": keep-alive\n\n"
    # a slow client: lines are dropped while it is paused, and counted
    request.producer.pauseProducing()
    devlog.add("a", 1, 1, ["dropped 1", "dropped 2"])
    clock.advance(15)
    assert b"dropped" not in b"".join(request.written) and request.written[-1] == b": keep-alive\n\n"
    request.producer.resumeProducing()
    assert request.written[-1] == b": 2 lines skipped (the client read too slowly)\n\n"
    failures: list[Any] = []
    done.addErrback(failures.append)
    done.cancel()  # the client went away (the API cancels the handler's Deferred)
    assert failures and not clock.getDelayedCalls() and request.producer is None
    devlog.add("a", 1, 1, ["unheard"])
    assert b"unheard" not in b"".join(request.written)


def test_sse_follower_ends_when_the_log_closes() -> None:
    clock = Clock()
    devlog = DeviceLog("cpu:0", size=10)
    request = FakeRequest()
    done = SSEFollower(request, devlog, clock).start(backlog=0)
    devlog.close()
    assert done.called and not clock.getDelayedCalls() and request.producer is None


# --------------------------------------------------------------------------- over HTTP, real llama-server


async def get(service: Any, path: str, **kwargs: Any) -> tuple[Any, bytes]:
    response = await treq.get(f"http://127.0.0.1:{service.port}{path}", persistent=False, **kwargs)
    return response, await response.content()


class Lines(Protocol):
    """Reads an SSE body; ``wait_for(text)`` fires once a data line holds ``text``."""

    def __init__(self) -> None:
        self.data = b""
        self.waiting: list[tuple[bytes, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for item in list(self.waiting):
            if item[0] in self.data:
                self.waiting.remove(item)
                item[1].callback(None)

    def wait_for(self, text: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if text in self.data:
            d.callback(None)
        else:
            self.waiting.append((text, d))
        return d.addTimeout(15, reactor)

    def connectionLost(self, reason: Any = None) -> None:
        pass


@pytest.mark.llama
@pytest.mark.allow_errors  # the kill is logged at error level, on purpose
@pytest_twisted.ensureDeferred
async def test_a_crash_log_survives_the_next_switch(node_service, tiny_models, llama_server_bin, tmp_path,
                                                   fail_on_logged_errors) -> None:
    log_dir = tmp_path / "child-logs"
    service = await node_service(proxy_config(tiny_models, log_dir=str(log_dir), api_keys=[KEY]))
    auth = {"Authorization": f"Bearer {KEY}"}
    response = await post(service, "/v1/chat/completions", chat_body("tiny-a"), headers=auth)
    assert response.code == 200, await response.content()
    await response.content()
    slot = service.node.slots["cpu:0"]
    first_pid = slot.child.pid

    # follow the log while the crash and the switch happen
    follow = await treq.get(f"http://127.0.0.1:{service.port}/v1/node/devices/cpu:0/logs?follow=1&lines=0",
                            headers=auth, persistent=False, unbuffered=True)
    assert follow.code == 200 and follow.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
    stream = Lines()
    follow.deliverBody(stream)

    os.kill(first_pid, signal.SIGKILL)
    await eventually(lambda: slot.crash_count == 1, what="the crash")
    response = await post(service, "/v1/chat/completions", chat_body("tiny-b"), headers=auth)
    assert response.code == 200, await response.content()
    await response.content()
    second_pid = slot.child.pid
    await stream.wait_for(f"tiny-b pid={second_pid} agent: started llama-server".encode())
    await stream.wait_for(f"tiny-a pid={first_pid} agent: exited: killed by signal 9 (unexpected)".encode())
    stream.transport.loseConnection()

    # the text: both children, the first one's exit between them
    response, body = await get(service, "/v1/node/devices/cpu:0/logs?lines=2000", headers=auth)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
    text = body.decode()
    lines = text.splitlines()
    exit_at = next(i for i, line in enumerate(lines) if f"pid={first_pid} agent: exited: killed by signal 9" in line)
    assert any(f"tiny-a pid={first_pid} stderr: " in line for line in lines[:exit_at])
    assert any(f"tiny-b pid={second_pid} stderr: " in line for line in lines[exit_at:])
    assert (await get(service, "/v1/node/devices/cpu:0/logs?lines=3", headers=auth))[1].decode().count("\n") == 3

    # the file holds the same lines
    await eventually(lambda: f"pid={second_pid}".encode() in (log_dir / "cpu-0.log").read_bytes(), what="file")
    assert f"pid={first_pid} agent: exited: killed by signal 9".encode() in (log_dir / "cpu-0.log").read_bytes()

    # authenticated like the other routes; errors are JSON
    assert (await get(service, "/v1/node/devices/cpu:0/logs"))[0].code == 401
    response, body = await get(service, "/v1/node/devices/cuda:7/logs", headers=auth)
    assert response.code == 404 and json.loads(body)["error"]["code"] == "device_not_found"
    for query in ("lines=abc", "lines=-1", "follow=maybe"):
        response, body = await get(service, f"/v1/node/devices/cpu:0/logs?{query}", headers=auth)
        assert response.code == 400, query
        assert json.loads(body)["error"]["code"] == "invalid_request"
    assert any("died" in str(event.get("log_format", "")) for event in fail_on_logged_errors)


@pytest_twisted.ensureDeferred
async def test_a_follower_ends_when_the_node_stops(node_service, stand_in_bin, tmp_path) -> None:
    service = await node_service({"backend": "cpu", "llama_server_bin": stand_in_bin})
    follow = await treq.get(f"http://127.0.0.1:{service.port}/v1/node/devices/cpu:0/logs?follow=1",
                            persistent=False, unbuffered=True)
    assert follow.code == 200
    body = treq.content(follow)
    await service.stopService()
    assert (await body.addTimeout(10, reactor)).startswith(b": following cpu:0\n\n")


def test_log_dir_that_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    from rolemesh_node.config import ConfigError
    from rolemesh_node.service import makeService

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="log_dir"):
        makeService(NodeConfig(log_dir=tmp_path / "file" / "logs", listen_port=0), Clock())
