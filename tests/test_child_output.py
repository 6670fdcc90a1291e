"""A ready child's stdout/stderr are drained every READY_OUTPUT_INTERVAL_S, not read at every write.

The unit tests drive LlamaServerChild with a Clock and stand-ins for Twisted's
process pipes that are real non-blocking pipes; the last ones run the real
``llama-server``.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from rolemesh_node import llama_server
from rolemesh_node.llama_server import READY_OUTPUT_INTERVAL_S, ChildState, LlamaServerChild
from tests.fakes import ProcessClock, ScriptedHTTP, exited

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipes are batched on Linux only")
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class FakePipe:
    """Stands in for Twisted's ProcessReader: a real non-blocking pipe whose
    watching by the reactor is only recorded."""

    def __init__(self) -> None:
        self.fd, self.write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        self.reading = True
        self.disconnected = False

    def fileno(self) -> int:
        return self.fd

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True

    def write(self, data: bytes) -> None:
        os.write(self.write_fd, data)

    def close(self) -> None:
        for fd in (self.fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pipes() -> Any:
    made = {1: FakePipe(), 2: FakePipe()}
    yield made
    for pipe in made.values():
        pipe.close()


def started_child(pipes: dict[int, FakePipe], **overrides: Any) -> tuple[ProcessClock, LlamaServerChild]:
    reactor, http = ProcessClock(), ScriptedHTTP()
    http.ready("m")
    kwargs: dict[str, Any] = dict(reactor=reactor, http=http, device_id="cpu:0", model="m",
                                  argv=["/bin/llama-server"], env={}, port=5555, probe_interval_s=0.5,
                                  startup_timeout_s=30.0)
    kwargs.update(overrides)
    child = LlamaServerChild(**kwargs)
    child.start()
    child.transport.pipes = pipes
    return reactor, child


def make_ready(child: LlamaServerChild) -> None:
    child.errReceived(b"srv  llama_server: model loaded\n")
    assert child.state is ChildState.READY


@linux_only
def test_reading_stops_at_ready_and_the_pipes_grow(pipes):
    reactor, child = started_child(pipes)
    assert all(pipe.reading for pipe in pipes.values())  # starting: read per write
    make_ready(child)
    assert not any(pipe.reading for pipe in pipes.values())
    assert all(fcntl.fcntl(pipe.fd, F_GETPIPE_SZ) == llama_server.READY_PIPE_SIZE for pipe in pipes.values())
    assert [call.getTime() for call in reactor.getDelayedCalls()] == [READY_OUTPUT_INTERVAL_S]


@linux_only
def test_drain_every_interval_feeds_the_tail(pipes):
    reactor, child = started_child(pipes)
    make_ready(child)
    pipes[2].write(b"slot launch_slot_: id  0 | task 7 | processing task\nslot release: id  0 | ta")
    pipes[1].write(b"on stdout\n")
    reactor.advance(READY_OUTPUT_INTERVAL_S - 0.001)
    assert child.tail[-1].endswith("model loaded")  # not before the tick
    reactor.advance(0.001)
    assert list(child.tail)[-2:] == ["on stdout", "slot launch_slot_: id  0 | task 7 | processing task"]
    pipes[2].write(b"sk 7 | stop processing\n")
    reactor.advance(READY_OUTPUT_INTERVAL_S)
    assert child.tail[-1] == "slot release: id  0 | task 7 | stop processing"  # split lines are joined
    reactor.advance(READY_OUTPUT_INTERVAL_S * 10)  # nothing written: nothing changes, nothing blocks
    assert child.tail[-1] == "slot release: id  0 | task 7 | stop processing"
    assert not any(pipe.reading for pipe in pipes.values())


@linux_only
@pytest.mark.allow_errors
def test_exit_drains_the_remainder_and_reads_again(pipes, fail_on_logged_errors):
    exits = []
    reactor, child = started_child(pipes, on_exit=lambda c, info: exits.append(list(c.tail)))
    make_ready(child)
    reactor.advance(READY_OUTPUT_INTERVAL_S)
    pipes[2].write(b"GGML_ASSERT(n_tokens > 0) failed\nAborted (core dump")  # no tick since
    child.processExited(exited(None, signal.SIGABRT))
    assert child.state is ChildState.EXITED
    assert exits[0][-2:] == ["GGML_ASSERT(n_tokens > 0) failed", "Aborted (core dump"]
    assert any("GGML_ASSERT" in event.get("tail", "") for event in fail_on_logged_errors)  # the "died" line
    assert all(pipe.reading for pipe in pipes.values())  # the reactor reads to the end and closes them
    assert reactor.getDelayedCalls() == []


@linux_only
def test_stop_drains_and_reads_again(pipes):
    reactor, child = started_child(pipes)
    make_ready(child)
    pipes[2].write(b"srv  log_server_r: done request: POST /v1/completions 127.0.0.1 200\n")
    stopped = []
    child.stop(grace_s=5.0).addCallback(stopped.append)
    assert child.tail[-1].endswith("200") and child.transport.signals == ["TERM"]
    assert all(pipe.reading for pipe in pipes.values())  # its shutdown lines come as they are written
    assert [call.getTime() for call in reactor.getDelayedCalls()] == [5.0]  # the KILL, no drain loop
    child.processExited(exited(0))
    assert stopped[0].expected and reactor.getDelayedCalls() == []


@linux_only
def test_each_drain_is_bounded(pipes, monkeypatch):
    monkeypatch.setattr(llama_server, "READY_OUTPUT_MAX_BYTES", 64 * 1024)
    reactor, child = started_child(pipes)
    make_ready(child)
    line = b"x" * 1023 + b"\n"
    pipes[2].write(line * 200)  # 200 KiB, fits the enlarged pipe
    read: list[int] = []
    lines = child._lines
    monkeypatch.setattr(child, "_lines", lambda fd, data: (read.append(len(data)), lines(fd, data)))
    reactor.advance(READY_OUTPUT_INTERVAL_S)
    assert sum(read) == 64 * 1024
    reactor.advance(READY_OUTPUT_INTERVAL_S)
    assert sum(read) == 128 * 1024
    reactor.pump([READY_OUTPUT_INTERVAL_S] * 2)
    assert sum(read) == 200 * 1024 and child.tail[-1] == "x" * 1023


@linux_only
def test_end_of_file_while_ready_hands_the_pipe_back(pipes):
    reactor, child = started_child(pipes)
    make_ready(child)
    pipes[1].write(b"last words\n")
    os.close(pipes[1].write_fd)
    reactor.advance(READY_OUTPUT_INTERVAL_S)
    assert child.tail[-1] == "last words"
    assert pipes[1].reading and not pipes[2].reading  # the reactor sees the end of file and closes it


@linux_only
@pytest.mark.allow_errors
def test_a_failing_drain_is_logged_and_reading_resumes(pipes, fail_on_logged_errors, monkeypatch):
    reactor, child = started_child(pipes)
    make_ready(child)

    def broken(fd: int, data: bytes) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(child, "_lines", broken)
    pipes[2].write(b"line\n")
    reactor.advance(READY_OUTPUT_INTERVAL_S)
    assert any(event.get("log_failure") is not None and event["log_failure"].check(RuntimeError)
               for event in fail_on_logged_errors)
    assert all(pipe.reading for pipe in pipes.values()) and reactor.getDelayedCalls() == []


def test_without_enlargeable_pipes_the_output_is_read_per_write(pipes, monkeypatch):
    monkeypatch.setattr(llama_server, "_F_SETPIPE_SZ", None)  # e.g. not Linux
    reactor, child = started_child(pipes)
    make_ready(child)
    assert all(pipe.reading for pipe in pipes.values()) and reactor.getDelayedCalls() == []


# --------------------------------------------------------------------------
# the real llama-server


async def eventually(predicate: Any, timeout: float, what: str, step: float = 0.005) -> float:
    """Seconds until ``predicate()`` held (polling every ``step``)."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, step, lambda: None)
    return time.monotonic() - began


def tiny_config(tiny_models: dict[str, Path]) -> dict[str, Any]:
    return {"backend": "cpu", "llama_server_startup_timeout_s": 20,
            "models": {"tiny-a": {"path": tiny_models["tiny-a"], "ctx_size": 512}}}


def batched(child: LlamaServerChild) -> bool:
    readers = reactor.getReaders()
    pipes = [child.transport.pipes[fd] for fd in (1, 2) if fd in child.transport.pipes]
    return bool(pipes) and not any(pipe in readers for pipe in pipes)


async def complete(http_client: Any, child: LlamaServerChild, prompt: str) -> None:
    response = await http_client.post(f"http://127.0.0.1:{child.port}/v1/completions",
                                      data=json.dumps({"prompt": prompt, "max_tokens": 2}).encode(),
                                      headers={"Content-Type": ["application/json"]})
    await response.content()
    assert response.code == 200


@linux_only
@pytest.mark.llama
@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_real_child_tail_stays_current_and_a_kill_is_seen(node_service, tiny_models, llama_server_bin,
                                                               http_client):
    service = await node_service(tiny_config(tiny_models))
    slot = service.node.slots["cpu:0"]
    child = await slot.ensure_server(service.config.models["tiny-a"])
    assert batched(child)
    for task in range(3):
        seen = set(child.tail)
        await complete(http_client, child, f"hello {task}")
        took = await eventually(lambda seen=seen: any("release" in line and line not in seen for line in child.tail),
                                timeout=2.0, what="the request's log lines in the tail")
        assert took < 0.2 + READY_OUTPUT_INTERVAL_S, f"the tail lagged {took:.3f}s behind the answer"
    assert batched(child)
    pipes = dict(child.transport.pipes)
    os.kill(child.pid, signal.SIGKILL)
    took = await eventually(lambda: child.state is ChildState.EXITED, timeout=2.0, what="the exit")
    assert took < 0.5 and child.exit.signal == signal.SIGKILL and not child.exit.expected
    assert child._output_loop is None
    # the reactor reads the pipes to their end and closes them
    await eventually(lambda: not child.transport.pipes, timeout=2.0, what="the pipes to be closed")
    assert all(pipe.disconnected for pipe in pipes.values())


@linux_only
@pytest.mark.llama
@pytest_twisted.ensureDeferred
async def test_real_child_stop_keeps_its_last_lines(node_service, tiny_models, llama_server_bin, http_client):
    service = await node_service(tiny_config(tiny_models))
    slot = service.node.slots["cpu:0"]
    child = await slot.ensure_server(service.config.models["tiny-a"])
    await complete(http_client, child, "hello")
    assert batched(child)
    seen = set(child.tail)
    began = time.monotonic()
    info = await child.stop(grace_s=5.0)
    assert time.monotonic() - began < 2.0 and info.expected and info.exit_code == 0
    assert not batched(child) or not child.transport.pipes
    assert any(line not in seen for line in child.tail), "no line written while stopping was kept"
