"""Faults with the real llama-server, the real node and real loopback HTTP.

* a child SIGKILLed while it streams: the client's stream ends with an SSE
  error event and closes; while it generates a plain answer: a clean 502. The
  device is marked crashed and the next request is served by a new child;
* a child SIGSTOPped (hung): the request times out (504, or an SSE error event
  when the stream had begun), the child is killed and replaced;
* a model file that is corrupt, truncated, a directory, missing or unreadable:
  a fast 503 that says why (the child's stderr tail where one was started),
  then crash cooldown; the device keeps serving other models;
* the dispatcher refusing, 500ing, hanging, down, and back having forgotten
  the node: a soak through every phase (compressed to seconds, see
  :func:`test_dispatcher_outages_soak`) — never two calls in flight, bounded
  memory, re-registration when it comes back; plus a dispatcher that keeps
  forgetting the node (registrations back off instead of looping) and no
  connection to the dispatcher left open after stop.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rolemesh_node.backoff import Backoff
from rolemesh_node.dispatcher import DEREGISTER_PATH, HEARTBEAT_PATH, REGISTER_PATH, LinkState
from rolemesh_node.llama_server import ChildState
from rolemesh_node.snapshot import Phase
from tests.test_supervisor_real import alive, eventually, models_config

LONG_STREAM_TOKENS = 1500  # with ctx_size 2048: ~0.3 s of tokens from the tiny model


def fault_config(tiny_models: dict[str, Path], **extra: Any) -> dict[str, Any]:
    config = models_config(tiny_models, **extra)
    for spec in config["models"].values():
        spec["ctx_size"] = 2048
    return config


def chat_body(model: str = "tiny-a", max_tokens: int = 4, stream: bool = False) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}],
                       "max_tokens": max_tokens, "stream": stream}).encode()


def post(service: Any, body: bytes, **kwargs: Any) -> Any:
    return treq.post(f"http://127.0.0.1:{service.port}/v1/chat/completions", data=body,
                     headers={"Content-Type": "application/json"}, persistent=False, **kwargs)


def is_llama_server(pid: int) -> bool:
    try:
        return b"llama-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def cleanup_pid(pid: int | None) -> None:
    """SIGCONT and SIGKILL a child that a test stopped, if it is still there."""
    if pid is None or not is_llama_server(pid):
        return
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def sse_events(body: bytes) -> list[bytes]:
    return [e.strip() for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]


async def ok_on_a_new_child(service: Any, slot: Any, old_pid: int) -> None:
    response = await post(service, chat_body(max_tokens=3))
    doc = json.loads(await response.content())
    assert response.code == 200, doc
    assert doc["choices"][0]["message"]["content"] is not None
    assert slot.child.pid != old_pid and slot.child.state is ChildState.READY and alive(slot.child.pid)
    assert slot.inflight == 0


# --------------------------------------------------------------------------
# the child dies or hangs


@pytest.mark.llama
@pytest.mark.allow_errors  # the crash is logged at error level on purpose
@pytest_twisted.ensureDeferred
async def test_child_sigkilled_mid_stream(node_service, tiny_models, llama_server_bin):
    service = await node_service(fault_config(tiny_models))
    slot = service.node.slots["cpu:0"]
    child = await slot.ensure_server(service.config.models["tiny-a"])
    pid = child.pid
    try:
        response = await post(service, chat_body(max_tokens=LONG_STREAM_TOKENS, stream=True), unbuffered=True)
        assert response.code == 200
        chunks: list[bytes] = []

        def collect(data: bytes) -> None:
            if not chunks:
                os.kill(pid, signal.SIGKILL)  # the first chunk is here: the child dies mid-stream
            chunks.append(data)

        began = time.monotonic()
        await treq.collect(response, collect)  # the stream ends (closes) rather than hanging
        assert time.monotonic() - began < 5
    finally:
        cleanup_pid(pid)
    events = sse_events(b"".join(chunks))
    assert events[0].startswith(b"data: {") and b'"choices"' in events[0]
    assert b"[DONE]" not in events[-1]  # it did not finish normally
    last = json.loads(events[-1][len(b"data: "):])
    assert set(last) == {"error"} and last["error"]["code"] == "upstream_failed"
    assert "mid-stream" in last["error"]["message"] and "cpu:0" in last["error"]["message"]
    await eventually(lambda: slot.phase is Phase.FAILED, what="the crash to be noticed")
    assert not alive(pid)
    snap = slot.snapshot().to_json()
    assert snap["crashes"] == 1 and "killed by signal 9" in snap["last_exit"] and snap["in_flight"] == 0
    assert "crashed" in snap["last_error"]
    await ok_on_a_new_child(service, slot, pid)


@pytest.mark.llama
@pytest.mark.allow_errors  # the crash is logged at error level on purpose
@pytest_twisted.ensureDeferred
async def test_child_sigkilled_while_generating_a_plain_answer(node_service, tiny_models, llama_server_bin):
    """Non-streamed: the child sends nothing before it is done, so the client gets a clean 502."""
    service = await node_service(fault_config(tiny_models))
    slot = service.node.slots["cpu:0"]
    child = await slot.ensure_server(service.config.models["tiny-a"])
    pid = child.pid
    try:
        pending = post(service, chat_body(max_tokens=LONG_STREAM_TOKENS))
        await eventually(lambda: slot.inflight == 1, what="the request to reach the child")
        await deferLater(reactor, 0.05, lambda: None)  # generating by now
        os.kill(pid, signal.SIGKILL)
        response = await pending
        doc = json.loads(await response.content())
    finally:
        cleanup_pid(pid)
    assert response.code == 502, doc
    assert set(doc["error"]) == {"message", "type", "code"} and doc["error"]["code"] == "upstream_failed"
    assert "cpu:0" in doc["error"]["message"]
    await eventually(lambda: slot.phase is Phase.FAILED, what="the crash to be noticed")
    assert slot.inflight == 0
    await ok_on_a_new_child(service, slot, pid)


@pytest.mark.llama
@pytest.mark.allow_errors  # "unresponsive; killing it" is logged at error level on purpose
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest_twisted.ensureDeferred
async def test_child_sigstopped_times_out_and_is_replaced(node_service, tiny_models, llama_server_bin, stream):
    # The request runs out of request_timeout_s (504, or an SSE error event): that
    # ends it, and has the child checked. The liveness check finds the child hung
    # (/health does not answer, twice) and it is killed and replaced.
    timeout = 1.0
    service = await node_service(fault_config(tiny_models, request_timeout_s=timeout, liveness_interval_s=0.5,
                                              liveness_timeout_s=1.0))
    slot = service.node.slots["cpu:0"]
    child = await slot.ensure_server(service.config.models["tiny-a"])
    pid = child.pid
    try:
        if stream:
            response = await post(service, chat_body(max_tokens=LONG_STREAM_TOKENS, stream=True), unbuffered=True)
            assert response.code == 200
            chunks: list[bytes] = []

            def collect(data: bytes) -> None:
                if not chunks:
                    os.kill(pid, signal.SIGSTOP)  # hangs mid-stream
                chunks.append(data)

            began = time.monotonic()
            await treq.collect(response, collect)
            took = time.monotonic() - began
            last = json.loads(sse_events(b"".join(chunks))[-1][len(b"data: "):])
            assert last["error"]["code"] == "upstream_failed" and "timed out" in last["error"]["message"]
        else:
            os.kill(pid, signal.SIGSTOP)
            began = time.monotonic()
            response = await post(service, chat_body())
            doc = json.loads(await response.content())
            took = time.monotonic() - began
            assert response.code == 504, doc
            assert set(doc["error"]) == {"message", "type", "code"}
            assert doc["error"]["code"] == "upstream_timeout" and "request_timeout_s=1s" in doc["error"]["message"]
            assert slot.phase is Phase.READY  # a timeout alone kills nothing
        assert timeout * 0.9 <= took < timeout + 3.0
        # taken for hung: SIGKILLed (a SIGTERM would wait behind the SIGSTOP) and replaced
        await eventually(lambda: not alive(pid), timeout=5, what="the hung child to be killed")
        await eventually(lambda: slot.phase is Phase.FAILED, what="the device to note it")
        assert "unresponsive" in slot.last_error and slot.inflight == 0
    finally:
        cleanup_pid(pid)
    await ok_on_a_new_child(service, slot, pid)


# --------------------------------------------------------------------------
# broken model files


def corrupt(path: Path, source: Path) -> None:
    path.write_bytes(os.urandom(4096))


def truncated(path: Path, source: Path) -> None:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # a valid GGUF header, tensor data cut off


def directory(path: Path, source: Path) -> None:
    path.mkdir()


def missing(path: Path, source: Path) -> None:
    pass


def unreadable(path: Path, source: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading the file "
                    "(the 'directory' variant covers a path that cannot be read as a model)")
    path.write_bytes(source.read_bytes())
    path.chmod(0)


@pytest.mark.llama
@pytest.mark.allow_errors  # failed starts and the cooldown are logged at error level on purpose
@pytest.mark.parametrize("make, code, reason", [
    (corrupt, "model_not_ready", ("exited during startup", ("invalid magic", "failed to load"))),
    (truncated, "model_not_ready", ("exited during startup", ("failed to load", "failed to read", "tensor"))),
    (directory, "model_unavailable", ("missing or unreadable", ())),
    (missing, "model_unavailable", ("missing or unreadable", ())),
    (unreadable, "model_unavailable", ("missing or unreadable", ())),
], ids=["corrupt", "truncated", "directory", "missing", "unreadable"])
@pytest_twisted.ensureDeferred
async def test_broken_model_file_is_a_fast_503_with_the_reason(node_service, tiny_models, llama_server_bin,
                                                               tmp_path, make, code, reason):
    bad = tmp_path / "broken.gguf"
    make(bad, tiny_models["tiny-a"])
    config = fault_config(tiny_models, llama_server_startup_timeout_s=60, crash_limit=2)
    config["models"]["broken"] = {"path": bad, "ctx_size": 512}
    service = await node_service(config)
    slot = service.node.slots["cpu:0"]
    began = time.monotonic()
    response = await post(service, chat_body("broken"))
    doc = json.loads(await response.content())
    took = time.monotonic() - began
    assert response.code == 503, doc
    assert took < 20  # far below the 60 s startup timeout: the child's exit is noticed at once
    assert set(doc["error"]) == {"message", "type", "code"} and doc["error"]["code"] == code
    message = doc["error"]["message"]
    must, any_of = reason
    assert must in message and "broken" in message, message
    if any_of:  # the child's own words (its stderr tail) are in the answer
        assert any(word in message for word in any_of), message
        assert "last stderr:" in message
        # once more → crash_limit=2 reached → cooldown: refused at once, with the reason
        again = await post(service, chat_body("broken"))
        assert again.code == 503
        await again.content()
        began = time.monotonic()
        cooled = await post(service, chat_body("broken"))
        doc = json.loads(await cooled.content())
        assert cooled.code == 503 and time.monotonic() - began < 2
        assert "cooldown" in doc["error"]["message"], doc
        assert slot.starts == 2  # no new child was spawned for the refused request
    # the device still serves the good model
    ok = await post(service, chat_body("tiny-a", 2))
    assert ok.code == 200, await ok.content()
    await ok.content()
    assert slot.inflight == 0 and slot.phase is Phase.READY
    if not any_of:
        listed = {m["id"]: m for m in service.node.models_json()["data"]}
        assert listed["broken"]["state"] == "unavailable" and listed["broken"]["reason"]


# --------------------------------------------------------------------------
# the dispatcher misbehaving for a long time


class SoakDispatcher(Resource):
    """A fake dispatcher whose behaviour the test switches between phases.

    ``mode``: ``ok`` (200), ``error`` (500), ``hang`` (never answers; the
    request is dropped when the client gives up), ``forget`` (404 on
    heartbeats until the node registers again, then ``ok``). ``register_mode``
    overrides ``mode`` for registrations. Records each call and the most calls it ever had in flight.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.register_mode: str | None = None
        self.sticky_forget = False  # forget: keep answering 404 to heartbeats even after a registration
        self.calls: list[tuple[str, float, dict[str, Any]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.overlaps: list[str] = []
        self.held: set[Any] = set()
        self.channels: set[Any] = set()
        self.listening: Any = None
        self.port = 0

    def render_POST(self, request: Any) -> Any:
        path = request.path.decode()
        body = json.loads(request.content.read())
        self.calls.append((path, time.monotonic(), {"seq": body.get("seq")}))
        self.in_flight += 1
        if self.in_flight > 1:
            self.overlaps.append(f"{path} while {self.in_flight - 1} other call(s) in flight")
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        request.notifyFinish().addBoth(self._done, request)
        mode = self.register_mode if path == REGISTER_PATH and self.register_mode else self.mode
        if mode == "hang":
            self.held.add(request)
            return NOT_DONE_YET
        if mode == "forget" and path != HEARTBEAT_PATH:
            if path == REGISTER_PATH and not self.sticky_forget:
                self.mode = "ok"  # it knows the node again
            mode = "ok"
        status = {"ok": 200, "error": 500, "forget": 404}[mode]
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"ok": status < 300}).encode()

    def _done(self, _: Any, request: Any) -> None:
        self.in_flight -= 1
        self.held.discard(request)  # a hung call the client gave up on: forget it

    def of(self, path: str) -> list[tuple[str, float, dict[str, Any]]]:
        return [c for c in self.calls if c[0] == path]

    def listen(self) -> None:
        dispatcher = self

        class TrackingSite(Site):
            noisy = False

            def buildProtocol(self, addr: Any) -> Any:
                protocol = super().buildProtocol(addr)
                dispatcher.channels.add(protocol)
                lost = protocol.connectionLost

                def connection_lost(reason: Any, protocol: Any = protocol) -> None:
                    dispatcher.channels.discard(protocol)
                    lost(reason)

                protocol.connectionLost = connection_lost
                return protocol

        site = TrackingSite(self)
        site.log = lambda request: None  # no access log: it would only fill the log buffer
        self.listening = reactor.listenTCP(self.port, site, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def down(self) -> Deferred[Any]:
        """Stop listening and cut every open connection (keep-alive ones too)."""
        for channel in list(self.channels):
            # Site wraps each HTTPChannel in a _GenericHTTPChannelProtocol
            transport = getattr(getattr(channel, "_channel", channel), "transport", None)
            if transport is not None:
                transport.abortConnection()
        listening, self.listening = self.listening, None
        return listening.stopListening() if listening is not None else succeed(None)


class CountingHttp:
    """Wraps the link's HTTP client: the most calls it ever had in flight at once."""

    def __init__(self, http: Any) -> None:
        self.http = http
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0

    def post(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        d = self.http.post(*args, **kwargs)

        def done(result: Any) -> Any:
            self.in_flight -= 1
            return result

        return d.addBoth(done)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def settle(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@pytest.fixture
def stand_in_bin(tmp_path: Path) -> str:
    """A llama_server_bin that is never run (the soak has no models)."""
    path = tmp_path / "bin" / "llama-server"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(0o755)
    return str(path)


SOAK_PHASE_S = float(os.environ.get("ROLEMESH_SOAK_PHASE_S", "1.5"))

#: allocations that are not the node's: the log buffer (bounded; no observer
#: consumes events under pytest) and this test's own records
NOT_THE_NODE = (
    tracemalloc.Filter(False, "*/twisted/logger/*"),
    tracemalloc.Filter(False, __file__),
    tracemalloc.Filter(False, tracemalloc.__file__),
)


def traced_bytes() -> int:
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(NOT_THE_NODE)
    return sum(stat.size for stat in snapshot.statistics("filename"))


async def start_soak_node(node_service: Any, fake: SoakDispatcher, stand_in_bin: str) -> tuple[Any, CountingHttp]:
    service = await node_service({
        "backend": "cpu", "cpu_devices": 2, "llama_server_bin": stand_in_bin, "node_id": "soak-node",
        "dispatcher_base_url": f"http://127.0.0.1:{fake.port}",
        "heartbeat_interval_s": 0.05, "dispatcher_timeout_s": 0.2, "metrics_interval_s": 0.5,
    })
    link = service.dispatcher
    assert link is not None
    # compress "minutes" into seconds: registration retried within 0.2 s, a heartbeat every tick
    link.register_backoff = Backoff(base=0.05, factor=2.0, cap=0.2, jitter=0.5)
    link.heartbeat_backoff = Backoff(base=0.05, factor=1.0, cap=0.05, jitter=0.0)
    counting = CountingHttp(link.http)
    link.http = counting
    return service, counting


async def stop_soak_node(service: Any, fake: SoakDispatcher) -> None:
    if service.running:
        await service.stopService()
    await fake.down()


@pytest_twisted.ensureDeferred
async def test_dispatcher_outages_soak(node_service, stand_in_bin) -> None:
    """The dispatcher refuses registration, then 500s, hangs, is down and comes back having forgotten us.

    Each phase stands in for "minutes" of the real thing: the node runs with a
    heartbeat every 0.05 s, a 0.2 s dispatcher timeout and back-offs capped at
    0.2 s (a failed heartbeat is retried at the next tick), so that a phase of
    ``ROLEMESH_SOAK_PHASE_S`` (1.5 s by default) holds as many failed calls as
    minutes would at the default settings (10 s heartbeat, back-off to 60 s).

    Checked throughout: never two calls to the dispatcher in flight (seen from
    both ends); registration retried until it works; heartbeats go on through
    every failure and resume after; a 404 after the outage makes the node
    register again; the Python memory the node holds does not grow with the
    number of failed calls, and the process RSS stays within a generous bound.
    """
    fake = SoakDispatcher()
    fake.register_mode = "error"
    fake.listen()
    service, counting = await start_soak_node(node_service, fake, stand_in_bin)
    link = service.dispatcher
    tracing = False
    phases: list[tuple[str, int, int]] = []  # (phase, calls during it, traced bytes at its end)
    try:
        # phase 0: registration refused with 500 — retried with backoff, never in parallel
        await settle(SOAK_PHASE_S)
        assert len(fake.of(REGISTER_PATH)) >= 3 and not fake.of(HEARTBEAT_PATH)
        assert link.state in (LinkState.UNREGISTERED, LinkState.REGISTERING)
        # phase 1: healthy — registered, heartbeats flow
        fake.register_mode = None
        await eventually(lambda: link.state is LinkState.REGISTERED, timeout=5, what="registration")
        await eventually(lambda: len(fake.of(HEARTBEAT_PATH)) >= 5, timeout=5, what="heartbeats")
        assert link.registrations == 1

        tracemalloc.start()
        tracing = True
        rss_before = rss_bytes()

        async def phase(name: str, mode: str, *, down: bool = False, up: bool = False) -> None:
            calls_before = counting.calls
            fake.mode = mode
            if down:
                await fake.down()
            if up:
                fake.listen()
            await settle(SOAK_PHASE_S)
            phases.append((name, counting.calls - calls_before, traced_bytes()))

        # phases 2-5: 500s, a hang (each call times out), down (refused); then 500s again to compare
        await phase("warm-up 500", "error")
        await phase("500", "error")
        await phase("hang", "hang")
        assert link.state is LinkState.REGISTERED  # failing heartbeats do not unregister
        await phase("down", "ok", down=True)
        await phase("500 again", "error", up=True)
        rss_after = rss_bytes()
        tracemalloc.stop()
        tracing = False
        assert link.state is LinkState.REGISTERED and link.registrations == 1

        # phase 6: it comes back having forgotten the node → register again → heartbeats resume
        fake.mode = "forget"
        await eventually(lambda: link.registrations == 2, timeout=5, what="the node to register again")
        beats = len(fake.of(HEARTBEAT_PATH))
        await eventually(lambda: len(fake.of(HEARTBEAT_PATH)) >= beats + 5, timeout=5,
                         what="heartbeats after registering again")
        assert link.state is LinkState.REGISTERED and link._heartbeat_failures.count == 0
    finally:
        if tracing:
            tracemalloc.stop()
        await stop_soak_node(service, fake)

    # never two calls in flight, seen from the node and from the dispatcher
    assert counting.max_in_flight == 1, counting.max_in_flight
    assert fake.max_in_flight == 1 and not fake.overlaps, fake.overlaps
    # every failing phase really made many calls (the soak did soak)
    calls = {name: n for name, n, _ in phases}
    assert calls["500"] >= 10 and calls["hang"] >= 4 and calls["down"] >= 3, calls
    # heartbeats are numbered without repeats, in order, whatever happened
    seqs = [c[2]["seq"] for c in fake.of(HEARTBEAT_PATH)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert fake.calls[-1][0] == DEREGISTER_PATH
    # memory: what the node holds does not grow with the number of failed calls
    traced = {name: size for name, _, size in phases}
    failed_calls = sum(n for _, n, _ in phases[1:])
    growth = traced["500 again"] - traced["warm-up 500"]
    assert growth < 128 * 1024, f"traced memory grew by {growth} bytes over {failed_calls} failed calls: {phases}"
    assert rss_after - rss_before < 32 * 1024 * 1024, (rss_before, rss_after)


@pytest_twisted.ensureDeferred
async def test_a_dispatcher_that_keeps_forgetting_the_node_is_not_hammered(node_service, stand_in_bin) -> None:
    """Registered, then 404 on every heartbeat, for a while: registrations must back off.

    (They used to loop register → heartbeat → 404 → register with no delay at all, hundreds a second.)
    """
    fake = SoakDispatcher()
    fake.listen()
    service, counting = await start_soak_node(node_service, fake, stand_in_bin)
    link = service.dispatcher
    try:
        await eventually(lambda: link.state is LinkState.REGISTERED, timeout=5, what="registration")
        fake.sticky_forget = True
        fake.mode = "forget"
        await settle(1.0)
        registrations = len(fake.of(REGISTER_PATH))
    finally:
        fake.mode = "ok"
        await stop_soak_node(service, fake)
    # one heartbeat interval is 0.05 s: even registering again at every tick makes ~20 in a second
    assert registrations <= 25, f"{registrations} registrations within 1 s"


@pytest_twisted.ensureDeferred
async def test_stop_leaves_no_connection_to_the_dispatcher_open(node_service, stand_in_bin) -> None:
    """The deregistration's keep-alive connection does not outlive stopService (it used to go back into
    a pool that had already been closed, with a 120 s timer)."""
    fake = SoakDispatcher()
    fake.listen()
    service, _counting = await start_soak_node(node_service, fake, stand_in_bin)
    try:
        await eventually(lambda: len(fake.of(HEARTBEAT_PATH)) >= 3, timeout=5, what="heartbeats")
        await service.stopService()
        assert fake.calls[-1][0] == DEREGISTER_PATH
        await settle(0.05)
        cached = sum(len(v) for v in service.pool._connections.values())
    finally:
        await stop_soak_node(service, fake)
    assert cached == 0, f"{cached} connection(s) left in the pool after stopService"


# --------------------------------------------------------------------------
# a long request is not a hung child


@pytest_twisted.ensureDeferred
async def test_a_long_plain_request_next_to_a_live_stream_is_not_a_hung_child(node_service, tiny_models,
                                                                              llama_server_bin):
    # llama-server sends a plain answer's headers only when it is complete. This
    # one takes several times request_timeout_s; the liveness check sees the
    # child's tokens grow in /slots, so nothing times out, the stream beside it
    # completes, and the child is neither killed nor counted as a crash.
    timeout = 0.5
    config = fault_config(tiny_models, llama_server_parallel=2, request_timeout_s=timeout,
                          liveness_interval_s=0.1, liveness_timeout_s=1.0)
    config["models"]["tiny-a"]["ctx_size"] = 4096  # 2048 per slot
    service = await node_service(config)
    slot = service.node.slots["cpu:0"]
    child = await slot.ensure_server(service.config.models["tiny-a"])

    def body(tokens: int, stream: bool) -> bytes:
        return json.dumps({"model": "tiny-a", "messages": [{"role": "user", "content": "hello"}],
                           "max_tokens": tokens, "stream": stream, "ignore_eos": True}).encode()

    began = time.monotonic()
    plain = post(service, body(4000, False))
    stream = await post(service, body(3000, True), unbuffered=True)
    assert stream.code == 200
    events = sse_events(await stream.content())
    assert events[-1] == b"data: [DONE]"  # the stream completed
    response = await plain
    doc = json.loads(await response.content())
    took = time.monotonic() - began
    assert response.code == 200, doc
    assert doc["usage"]["completion_tokens"] > 1500  # the slot's context (2048 here) ends it
    assert took > 2 * timeout  # it really ran past request_timeout_s
    assert slot.child is child and slot.phase is Phase.READY
    assert slot.crash_count == 0 and slot.starts == 1
    model = json.loads(await (await treq.get(f"http://127.0.0.1:{service.port}/v1/models/tiny-a",
                                             persistent=False)).content())
    assert model["state"] == "loaded" and "cooldown" not in model
