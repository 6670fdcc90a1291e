"""Tests for rolemesh_node.backoff and rolemesh_node.dispatcher.

Two kinds:

* Clock-driven unit tests: the link gets a ``Clock`` and a fake HTTP client
  whose answers the test controls (backoff schedule, cadence, one call in
  flight, re-registration, stop, token hygiene);
* loopback tests: a real fake dispatcher (twisted.web on 127.0.0.1, port 0)
  records every call made by a real ``DispatcherLink`` using treq — attached
  to a real ``NodeService`` (cpu backend, no models) or to a fake node.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import pytest_twisted
import treq.client
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rolemesh_node import __version__
from rolemesh_node.backoff import Backoff
from rolemesh_node.config import ConfigError, ModelSpec, NodeConfig
from rolemesh_node.devices.base import DeviceMetrics, DeviceRef
from rolemesh_node.dispatcher import (
    DEREGISTER_PATH,
    HEARTBEAT_PATH,
    METRICS_WAIT_S,
    NODE_ENDPOINTS,
    REGISTER_PATH,
    DispatcherLink,
    LinkState,
    default_advertise_url,
    deregister_payload,
    heartbeat_payload,
    host_name,
    read_token,
    redact_url,
    register_payload,
)
from rolemesh_node.snapshot import DeviceSnapshot, Phase

TOKEN = "tok-9f8e7d6c5b4a-SECRET"
NO_JITTER = Backoff(base=1.0, factor=2.0, cap=8.0, jitter=0.0)


# ==========================================================================
# fakes for the Clock tests


class FakeSlot:
    def __init__(self, device_id: str = "cpu:0", state: str = "ready", model: str | None = "alpha",
                 in_flight: int = 1, waiting: int = 2) -> None:
        self.snap = DeviceSnapshot(device_id=device_id, index=int(device_id.split(":")[1]), phase=Phase(state),
                                   model=model, port=4000, pid=42, in_flight=in_flight, waiting=waiting,
                                   max_pending=4, capacity=1)

    def snapshot(self) -> DeviceSnapshot:
        return self.snap


class FakeBackend:
    name = "cpu"


class FakeNode:
    """Just what the link reads from a Node."""

    def __init__(self, devices: int = 2) -> None:
        self.node_id = "node-test-1"
        self.started_at = 1_700_000_000.5
        self.backend = FakeBackend()
        self.discovered = True
        self.bin_error: str | None = None
        self.devices = [DeviceRef(backend="cpu", index=i, name="Test CPU", memory_total_bytes=1 << 30)
                        for i in range(devices)]
        self.slots = {d.id: FakeSlot(d.id) for d in self.devices}
        self.waiting = {"alpha": 2}
        self.metrics = {d.id: DeviceMetrics(memory_total_bytes=1 << 30, memory_free_bytes=1 << 29,
                                            utilization_pct=12.5, sampled_at=1_700_000_001.0)
                        for d in self.devices}
        self.refreshes = 0
        self.refresh_result: Callable[[], Deferred[Any]] = lambda: succeed(None)

    def snapshots(self) -> list[DeviceSnapshot]:
        return [self.slots[d.id].snapshot() for d in self.devices if d.id in self.slots]

    def waiting_by_model(self) -> dict[str, int]:
        return dict(self.waiting)

    def refresh_metrics(self) -> Deferred[Any]:
        self.refreshes += 1
        return self.refresh_result()

    def inventory_json(self) -> dict[str, Any]:
        return {"node_id": self.node_id}


class FakeResponse:
    def __init__(self, code: int, body: bytes = b"{}") -> None:
        self.code = code
        self.body = body

    def content(self) -> Deferred[bytes]:
        return succeed(self.body)


@dataclass
class Sent:
    path: str
    json: dict[str, Any]
    headers: dict[str, str]
    at: float
    d: Deferred[Any] = field(repr=False, default_factory=Deferred)


class FakeHttp:
    """Records posts; answers with ``respond(path, payload)``: an int status,
    a (status, body) pair, an Exception, or None to leave the call pending."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[Sent] = []
        self.respond: Callable[[str, dict[str, Any]], Any] = lambda path, payload: 200

    def post(self, url: str, json: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
             **kwargs: Any) -> Deferred[Any]:
        assert url.startswith("http://dispatcher.test:9000")
        path = url[len("http://dispatcher.test:9000"):]
        call = Sent(path, json or {}, dict(headers or {}), self.clock.seconds())
        self.sent.append(call)
        answer = self.respond(path, call.json)
        if isinstance(answer, int):
            call.d.callback(FakeResponse(answer))
        elif isinstance(answer, tuple):
            call.d.callback(FakeResponse(answer[0], answer[1]))
        elif isinstance(answer, Exception):
            call.d.errback(answer)
        return call.d

    def paths(self) -> list[str]:
        return [s.path for s in self.sent]

    def of(self, path: str) -> list[Sent]:
        return [s for s in self.sent if s.path == path]


def make_config(**overrides: Any) -> NodeConfig:
    values: dict[str, Any] = dict(
        node_id="node-test-1", dispatcher_base_url="http://dispatcher.test:9000",
        dispatcher_token=TOKEN, heartbeat_interval_s=10.0, dispatcher_timeout_s=5.0,
        listen_host="127.0.0.1", listen_port=8088,
    )
    values.update(overrides)
    return NodeConfig(**values)


def make_link(clock: Clock, http: FakeHttp, node: FakeNode | None = None, **kwargs: Any) -> DispatcherLink:
    config = kwargs.pop("config", None) or make_config()
    kwargs.setdefault("register_backoff", NO_JITTER)
    kwargs.setdefault("wallclock", lambda: 1_800_000_000.0 + clock.seconds())
    return DispatcherLink(reactor=clock, http=http, node=node or FakeNode(), config=config,
                          advertise_url="http://node.test:8088", **kwargs)


@pytest.fixture
def events():
    """Every log event emitted while the test runs."""
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def dispatcher_events(events: list[dict[str, Any]], level: LogLevel | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_namespace") == "rolemesh_node.dispatcher"
            and (level is None or e.get("log_level") == level)]


def stop(link: DispatcherLink, clock: Clock) -> None:
    """Stop the link, let a pending deregistration time out, check nothing is left scheduled."""
    results: list[Any] = []
    link.stopService().addBoth(results.append)
    clock.advance(5)
    assert results == [None]
    assert clock.getDelayedCalls() == []


# ==========================================================================
# backoff


def test_backoff_schedule_without_jitter() -> None:
    policy = Backoff(base=0.5, factor=3.0, cap=20.0, jitter=0.0)
    assert [policy.delay(n) for n in range(6)] == [0.5, 1.5, 4.5, 13.5, 20.0, 20.0]


def test_backoff_jitter_takes_off_at_most_the_fraction() -> None:
    low = Backoff(base=2.0, factor=2.0, cap=30.0, jitter=0.5, random=lambda: 0.999999)
    high = Backoff(base=2.0, factor=2.0, cap=30.0, jitter=0.5, random=lambda: 0.0)
    mid = Backoff(base=2.0, factor=2.0, cap=30.0, jitter=0.5, random=lambda: 0.5)
    for attempt in range(8):
        ceiling = min(30.0, 2.0 * 2 ** attempt)
        assert high.delay(attempt) == ceiling
        assert low.delay(attempt) == pytest.approx(ceiling / 2, rel=1e-5)
        assert mid.delay(attempt) == pytest.approx(ceiling * 0.75)


def test_backoff_with_real_random_stays_in_bounds() -> None:
    policy = Backoff(base=1.0, factor=2.0, cap=10.0, jitter=0.3)
    for attempt in range(20):
        for _ in range(20):
            d = policy.delay(attempt)
            assert 0.7 * policy.ceiling(attempt) <= d <= policy.ceiling(attempt) <= 10.0


def test_backoff_huge_attempt_is_capped_not_an_overflow() -> None:
    assert Backoff(base=1.0, factor=2.0, cap=60.0, jitter=0.0).delay(100_000) == 60.0


@pytest.mark.parametrize("kwargs", [
    {"base": 0}, {"base": -1}, {"factor": 0.5}, {"cap": 0.1, "base": 1.0}, {"jitter": 1.5},
    {"jitter": -0.1}, {"base": float("nan")},
])
def test_backoff_rejects_bad_parameters(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_backoff_rejects_negative_attempt() -> None:
    with pytest.raises(ValueError):
        Backoff().delay(-1)


# ==========================================================================
# pure helpers


def test_register_payload_shape(tmp_path) -> None:
    model = tmp_path / "a.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 100)
    config = make_config(models={
        "alpha": ModelSpec(name="alpha", path=model, ctx_size=512, aliases=("a",)),
        "emb": ModelSpec(name="emb", path=tmp_path / "missing.gguf", embedding=True, ttl_s=60.0),
    }, max_pending_requests_per_device=3, max_concurrent_requests_per_device=2)
    node = FakeNode()
    body = register_payload(node, config, "http://node.test:8088")
    assert body["node_id"] == "node-test-1"
    assert body["url"] == "http://node.test:8088"
    assert body["version"] == __version__
    assert body["started_at"] == node.started_at
    assert body["backend"] == "cpu"
    assert body["heartbeat_interval_s"] == 10.0
    assert [d["id"] for d in body["devices"]] == ["cpu:0", "cpu:1"]
    assert body["devices"][0] == node.devices[0].to_json()
    assert body["models"] == [
        {"name": "alpha", "aliases": ["a"], "embedding": False, "ctx_size": 512, "size_bytes": 104,
         "available": True, "ttl_s": None},
        {"name": "emb", "aliases": [], "embedding": True, "ctx_size": None, "size_bytes": None,
         "available": False, "ttl_s": 60.0},
    ]
    caps = body["capabilities"]
    assert set(caps["endpoints"]) == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                      "/v1/models", "/v1/node/inventory", "/health", "/ready"}
    assert caps["max_pending_requests_per_device"] == 3
    assert caps["max_concurrent_requests_per_device"] == 2
    assert caps["streaming"] is True
    json.dumps(body)  # serialisable as it is


def test_heartbeat_payload_shape() -> None:
    node = FakeNode()
    node.slots["cpu:1"] = FakeSlot("cpu:1", state="idle", model=None, in_flight=0, waiting=0)
    del node.metrics["cpu:1"]
    body = heartbeat_payload(node, 7, 1234.5)
    assert body["node_id"] == "node-test-1"
    assert body["seq"] == 7
    assert body["time"] == 1234.5
    assert body["started_at"] == node.started_at
    first, second = body["devices"]
    assert first["id"] == "cpu:0"
    assert first["state"] == "ready" and first["model"] == "alpha"
    assert first["in_flight"] == 1 and first["waiting"] == 2
    assert first["metrics"]["utilization_pct"] == 12.5
    assert second["metrics"] is None and second["state"] == "idle" and second["model"] is None
    assert body["waiting"] == {"alpha": 2}
    json.dumps(body)


def test_deregister_payload_shape() -> None:
    assert deregister_payload(FakeNode(), 99.0) == {
        "node_id": "node-test-1", "started_at": 1_700_000_000.5, "time": 99.0, "reason": "shutdown"}


def test_default_advertise_url() -> None:
    assert default_advertise_url(make_config(advertise_url="https://n1.example:9443")) == "https://n1.example:9443"
    assert default_advertise_url(make_config(listen_host="127.0.0.1", listen_port=8088)) == "http://127.0.0.1:8088"
    assert default_advertise_url(make_config(listen_host="::1", listen_port=81)) == "http://[::1]:81"
    assert default_advertise_url(make_config(listen_host="0.0.0.0", listen_port=81)) == f"http://{host_name()}:81"
    assert default_advertise_url(make_config(listen_host="::", listen_port=81), port=5) == f"http://{host_name()}:5"
    assert host_name() and host_name() is host_name()  # looked up once


def test_redact_url() -> None:
    assert redact_url("https://user:pw@d.example/x") == "https://***@d.example/x"
    assert redact_url("http://d.example:9000") == "http://d.example:9000"


def test_read_token(tmp_path) -> None:
    assert read_token(make_config(dispatcher_token=None)) is None
    assert read_token(make_config(dispatcher_token=" abc ")) == "abc"
    path = tmp_path / "token"
    path.write_text(f"\n  {TOKEN}\n")
    assert read_token(make_config(dispatcher_token=None, dispatcher_token_file=path)) == TOKEN
    path.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token(make_config(dispatcher_token=None, dispatcher_token_file=path))
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(make_config(dispatcher_token=None, dispatcher_token_file=tmp_path / "nope"))
    path.write_text(f"{TOKEN} two\n")
    with pytest.raises(ConfigError) as info:
        read_token(make_config(dispatcher_token=None, dispatcher_token_file=path))
    assert TOKEN not in str(info.value)


def test_token_file_read_once_at_construction(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    clock = Clock()
    http = FakeHttp(clock)
    link = make_link(clock, http, config=make_config(dispatcher_token=None, dispatcher_token_file=path))
    path.write_text("changed\n")
    link.startService()
    assert http.sent[0].headers["Authorization"] == f"Bearer {TOKEN}"
    stop(link, clock)


def test_link_needs_a_dispatcher_url() -> None:
    with pytest.raises(ValueError):
        make_link(Clock(), FakeHttp(Clock()), config=make_config(dispatcher_base_url=None))


# ==========================================================================
# the link, on a Clock


def test_registers_at_start_then_heartbeats_every_interval() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    link = make_link(clock, http)
    link.startService()
    assert http.paths() == [REGISTER_PATH, HEARTBEAT_PATH]  # first heartbeat right after registering
    assert link.state is LinkState.REGISTERED
    reg = http.sent[0]
    assert reg.json["node_id"] == "node-test-1" and reg.json["url"] == "http://node.test:8088"
    assert reg.headers["Authorization"] == f"Bearer {TOKEN}"
    assert reg.headers["User-Agent"] == f"rolemesh-node/{__version__}"
    for _ in range(5):
        clock.advance(10)
    beats = http.of(HEARTBEAT_PATH)
    assert len(beats) == 6
    assert [b.at for b in beats] == [0, 10, 20, 30, 40, 50]
    assert [b.json["seq"] for b in beats] == [1, 2, 3, 4, 5, 6]
    assert beats[2].json["time"] == 1_800_000_020.0
    assert all(b.headers["Authorization"] == f"Bearer {TOKEN}" for b in beats)
    clock.advance(9.9)
    assert len(http.of(HEARTBEAT_PATH)) == 6  # not early
    stop(link, clock)
    assert http.paths()[-1] == DEREGISTER_PATH
    assert http.sent[-1].json["node_id"] == "node-test-1"


def test_heartbeat_reads_metrics_first() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    node = FakeNode()
    link = make_link(clock, http, node=node)
    link.startService()
    clock.advance(10)
    assert node.refreshes == 2
    stop(link, clock)


def test_slow_metrics_do_not_hold_the_heartbeat_back() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    node = FakeNode()
    slow: Deferred[Any] = Deferred()
    node.refresh_result = lambda: slow
    link = make_link(clock, http, node=node)
    link.startService()
    assert http.paths() == [REGISTER_PATH]  # waiting for metrics
    clock.advance(METRICS_WAIT_S)
    assert http.paths() == [REGISTER_PATH, HEARTBEAT_PATH]
    clock.advance(10)  # the refresh still runs: no second one, heartbeat goes with what we have
    assert node.refreshes == 1
    assert len(http.of(HEARTBEAT_PATH)) == 2
    slow.callback(None)
    node.refresh_result = lambda: succeed(None)
    clock.advance(10)
    assert node.refreshes == 2
    stop(link, clock)


def test_failing_metrics_do_not_stop_heartbeats() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    node = FakeNode()
    node.refresh_result = lambda: fail(RuntimeError("sensor gone"))
    link = make_link(clock, http, node=node)
    link.startService()
    clock.advance(10)
    assert len(http.of(HEARTBEAT_PATH)) == 2
    stop(link, clock)


def test_registration_retried_with_backoff_until_it_works(events) -> None:
    clock = Clock()
    http = FakeHttp(clock)
    failures = {"left": 6}

    def respond(path: str, payload: dict[str, Any]) -> Any:
        if path == REGISTER_PATH and failures["left"] > 0:
            failures["left"] -= 1
            return ConnectionRefusedError("dispatcher down")
        return 200

    http.respond = respond
    link = make_link(clock, http)
    link.startService()
    for _ in range(200):
        clock.advance(0.5)
    regs = http.of(REGISTER_PATH)
    assert [r.at for r in regs] == [0, 1, 3, 7, 15, 23, 31]  # gaps 1, 2, 4, 8, then the 8 s cap
    assert link.state is LinkState.REGISTERED
    assert link.registrations == 1
    assert http.of(HEARTBEAT_PATH)[0].at == 31
    warnings = [e for e in dispatcher_events(events, LogLevel.warn) if "registration" in e["log_format"]]
    assert len(warnings) == 1  # the first failure; the same error again is not logged
    assert warnings[0]["failures"] == 1 and "refused" in warnings[0]["error"]
    infos = [e for e in dispatcher_events(events, LogLevel.info) if "registered with" in e["log_format"]]
    assert infos[-1]["failures"] == 6
    stop(link, clock)


def test_registration_backoff_uses_jitter() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    http.respond = lambda path, payload: 503
    link = make_link(clock, http, register_backoff=Backoff(base=4.0, factor=2.0, cap=60.0, jitter=0.5,
                                                          random=lambda: 0.5))
    link.startService()
    clock.advance(3.0)
    assert len(http.of(REGISTER_PATH)) == 2  # 4 s minus a quarter
    clock.advance(6.0)
    assert len(http.of(REGISTER_PATH)) == 3  # then 8 s minus a quarter
    stop(link, clock)
    assert DEREGISTER_PATH not in http.paths()  # never registered: nothing to undo


def test_registration_is_never_repeated_in_parallel() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    http.respond = lambda path, payload: None  # the dispatcher never answers
    link = make_link(clock, http)
    link.startService()
    clock.advance(4.9)
    assert http.paths() == [REGISTER_PATH]
    assert link.state is LinkState.REGISTERING
    clock.advance(0.1)  # dispatcher_timeout_s: the call is given up and cancelled
    assert http.sent[0].d.called
    assert link.state is LinkState.UNREGISTERED
    clock.advance(1.0)  # first backoff step
    assert http.paths() == [REGISTER_PATH, REGISTER_PATH]
    assert sum(1 for s in http.sent if not s.d.called) == 1
    stop(link, clock)


def test_never_two_heartbeats_in_flight() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    held: list[Sent] = []

    def respond(path: str, payload: dict[str, Any]) -> Any:
        if path == HEARTBEAT_PATH and len(http.of(HEARTBEAT_PATH)) == 2:
            held.append(http.sent[-1])
            return None  # the second heartbeat hangs
        return 200

    http.respond = respond
    link = make_link(clock, http, config=make_config(heartbeat_interval_s=1.0, dispatcher_timeout_s=3.5))
    link.startService()
    clock.advance(1)  # second heartbeat sent, hangs
    for _ in range(3):
        clock.advance(1)
        assert len(http.of(HEARTBEAT_PATH)) == 2
    held[0].d.callback(FakeResponse(200))  # answers just before the timeout
    assert len(http.of(HEARTBEAT_PATH)) == 2  # the next one waits for its tick
    clock.advance(1)
    assert len(http.of(HEARTBEAT_PATH)) == 3
    stop(link, clock)


def test_hung_heartbeat_times_out_and_the_loop_goes_on() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    hang = {"on": True}
    http.respond = lambda path, payload: None if path == HEARTBEAT_PATH and hang["on"] else 200
    link = make_link(clock, http, config=make_config(heartbeat_interval_s=2.0, dispatcher_timeout_s=5.0),
                     heartbeat_backoff=Backoff(base=2.0, cap=2.0, jitter=0.0))
    link.startService()
    clock.advance(4.9)
    assert len(http.of(HEARTBEAT_PATH)) == 1
    clock.advance(0.1)
    assert http.of(HEARTBEAT_PATH)[0].d.called  # cancelled by its timeout
    hang["on"] = False
    clock.advance(1.0)  # the loop's next tick (6 s)
    assert len(http.of(HEARTBEAT_PATH)) == 2
    assert link.state is LinkState.REGISTERED
    stop(link, clock)


@pytest.mark.parametrize("status", [404, 410])
def test_reregisters_when_the_dispatcher_forgot_the_node(status: int) -> None:
    clock = Clock()
    http = FakeHttp(clock)
    forgotten = {"once": True}

    def respond(path: str, payload: dict[str, Any]) -> Any:
        if path == HEARTBEAT_PATH and payload["seq"] == 3 and forgotten["once"]:
            forgotten["once"] = False
            return status, b'{"error": "unknown node"}'
        return 200

    http.respond = respond
    link = make_link(clock, http)
    link.startService()
    clock.advance(10)
    clock.advance(10)  # seq 3 → 404 → register again → heartbeat at once
    assert http.paths() == [REGISTER_PATH, HEARTBEAT_PATH, HEARTBEAT_PATH, HEARTBEAT_PATH,
                            REGISTER_PATH, HEARTBEAT_PATH]
    assert link.registrations == 2
    clock.advance(10)
    beats = http.of(HEARTBEAT_PATH)
    assert [b.json["seq"] for b in beats] == [1, 2, 3, 4, 5]  # never reset: always increasing
    assert [b.at for b in beats] == [0, 10, 20, 20, 30]
    stop(link, clock)


def test_reregistration_that_fails_backs_off_and_heartbeats_wait() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    state = {"registered": True, "register_failures": 0}

    def respond(path: str, payload: dict[str, Any]) -> Any:
        if path == HEARTBEAT_PATH and payload["seq"] == 2:
            state["registered"] = False
            return 404
        if path == REGISTER_PATH and not state["registered"]:
            if state["register_failures"] < 2:
                state["register_failures"] += 1
                return 500
            state["registered"] = True
        return 200

    http.respond = respond
    link = make_link(clock, http)
    link.startService()
    clock.advance(10)  # 404 → register fails (retry in 1 s)
    assert link.state is LinkState.UNREGISTERED
    clock.advance(1)  # fails again (retry in 2 s)
    clock.advance(2)  # works → heartbeat at once
    assert link.state is LinkState.REGISTERED
    assert http.paths() == [REGISTER_PATH, HEARTBEAT_PATH, HEARTBEAT_PATH, REGISTER_PATH, REGISTER_PATH,
                            REGISTER_PATH, HEARTBEAT_PATH]
    assert [r.at for r in http.of(REGISTER_PATH)] == [0, 10, 11, 13]
    stop(link, clock)


def test_heartbeat_failures_back_off_and_are_logged_without_flooding(events) -> None:
    clock = Clock()
    http = FakeHttp(clock)
    down = {"on": True}
    http.respond = lambda path, payload: 503 if path == HEARTBEAT_PATH and down["on"] else 200
    link = make_link(clock, http, config=make_config(heartbeat_interval_s=1.0),
                     heartbeat_backoff=Backoff(base=1.0, factor=2.0, cap=8.0, jitter=0.0), log_every=4)
    link.startService()
    for _ in range(40):
        clock.advance(1)
    beats = http.of(HEARTBEAT_PATH)
    # gaps 1, 2, 4, 8, 8, 8 …: spaced out, never more often than the cadence
    assert [b.at for b in beats] == [0, 1, 3, 7, 15, 23, 31, 39]
    warnings = [e for e in dispatcher_events(events, LogLevel.warn) if "heartbeat" in e["log_format"]]
    assert [w["failures"] for w in warnings] == [1, 4, 8]  # the first, then every 4th
    assert all(w["error"].startswith("HTTP 503") for w in warnings)
    down["on"] = False
    for _ in range(8):
        clock.advance(1)
    recovered = [e for e in dispatcher_events(events, LogLevel.info) if "work again" in e["log_format"]]
    assert len(recovered) == 1 and recovered[0]["failures"] == 8
    clock.advance(1)
    assert [b.at for b in http.of(HEARTBEAT_PATH)][-3:] == [47, 48, 49]  # back to the cadence
    assert link.state is LinkState.REGISTERED  # a failing heartbeat is not a lost registration
    stop(link, clock)


def test_a_change_of_error_is_logged() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    answers = collections.deque([503, 503, 401, 401])
    http.respond = lambda path, payload: answers.popleft() if path == HEARTBEAT_PATH and answers else 200
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        link = make_link(clock, http, config=make_config(heartbeat_interval_s=1.0),
                         heartbeat_backoff=Backoff(base=1.0, cap=1.0, jitter=0.0))
        link.startService()
        for _ in range(5):
            clock.advance(1)
        stop(link, clock)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e for e in dispatcher_events(seen, LogLevel.warn) if "heartbeat" in e["log_format"]]
    assert [(w["failures"], w["error"][:8]) for w in warnings] == [(1, "HTTP 503"), (3, "HTTP 401")]


def test_devices_found_after_registering_cause_a_new_registration() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    node = FakeNode(devices=0)
    node.discovered = False
    link = make_link(clock, http, node=node)
    link.startService()
    assert http.of(REGISTER_PATH)[0].json["devices"] == []
    assert http.of(REGISTER_PATH)[0].json["discovered"] is False
    done = FakeNode(devices=1)
    node.devices, node.slots, node.metrics, node.discovered = done.devices, done.slots, done.metrics, True
    clock.advance(10)
    assert http.paths() == [REGISTER_PATH, HEARTBEAT_PATH, REGISTER_PATH, HEARTBEAT_PATH]
    assert [d["id"] for d in http.of(REGISTER_PATH)[1].json["devices"]] == ["cpu:0"]
    clock.advance(10)
    assert http.paths()[-1] == HEARTBEAT_PATH and len(http.of(REGISTER_PATH)) == 2
    stop(link, clock)


def test_stop_deregisters_and_fires_even_when_the_dispatcher_hangs() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    http.respond = lambda path, payload: None if path == DEREGISTER_PATH else 200
    link = make_link(clock, http, config=make_config(dispatcher_timeout_s=30.0))
    link.startService()
    clock.advance(10)
    results: list[Any] = []
    link.stopService().addBoth(results.append)
    assert link.state is LinkState.STOPPED
    assert http.paths()[-1] == DEREGISTER_PATH
    assert http.sent[-1].json == {"node_id": "node-test-1", "started_at": 1_700_000_000.5,
                                  "time": 1_800_000_010.0, "reason": "shutdown"}
    clock.advance(1.9)
    assert results == []
    clock.advance(0.1)  # bounded by 2 s even though dispatcher_timeout_s is 30 s
    assert results == [None]
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert http.paths()[-1] == DEREGISTER_PATH  # no heartbeat after stop


def test_stop_deregisters_within_a_shorter_dispatcher_timeout() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    http.respond = lambda path, payload: None if path == DEREGISTER_PATH else 200
    link = make_link(clock, http, config=make_config(dispatcher_timeout_s=0.5))
    link.startService()
    results: list[Any] = []
    link.stopService().addBoth(results.append)
    clock.advance(0.5)
    assert results == [None]


def test_stop_when_the_deregistration_fails_still_fires(events) -> None:
    clock = Clock()
    http = FakeHttp(clock)
    http.respond = lambda path, payload: ConnectionRefusedError() if path == DEREGISTER_PATH else 200
    link = make_link(clock, http)
    link.startService()
    results: list[Any] = []
    link.stopService().addBoth(results.append)
    assert results == [None]
    assert any("deregistration" in e["log_format"] for e in dispatcher_events(events, LogLevel.warn))


def test_stop_cancels_the_heartbeat_in_flight() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    http.respond = lambda path, payload: None if path == HEARTBEAT_PATH else 200
    link = make_link(clock, http)
    link.startService()
    beat = http.of(HEARTBEAT_PATH)[0]
    assert not beat.d.called
    results: list[Any] = []
    link.stopService().addBoth(results.append)
    assert beat.d.called  # cancelled, not left to time out
    assert results == [None]
    assert clock.getDelayedCalls() == []


def test_stop_while_registering_cancels_it_and_deregisters() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    http.respond = lambda path, payload: None if path == REGISTER_PATH else 200
    link = make_link(clock, http)
    link.startService()
    results: list[Any] = []
    link.stopService().addBoth(results.append)
    assert http.sent[0].d.called
    assert http.paths() == [REGISTER_PATH, DEREGISTER_PATH]  # it may have reached the dispatcher
    assert results == [None]
    assert clock.getDelayedCalls() == []


def test_stop_while_backing_off_cancels_the_retry() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    http.respond = lambda path, payload: 500
    link = make_link(clock, http)
    link.startService()
    assert len(clock.getDelayedCalls()) == 1
    stop(link, clock)
    assert http.paths() == [REGISTER_PATH]


def test_restart_after_stop() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    link = make_link(clock, http)
    link.startService()
    stop(link, clock)
    link.startService()
    clock.advance(10)
    assert http.paths() == [REGISTER_PATH, HEARTBEAT_PATH, DEREGISTER_PATH, REGISTER_PATH, HEARTBEAT_PATH,
                            HEARTBEAT_PATH]
    assert [b.json["seq"] for b in http.of(HEARTBEAT_PATH)] == [1, 2, 3]
    stop(link, clock)


def test_no_token_means_no_authorization_header() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    link = make_link(clock, http, config=make_config(dispatcher_token=None))
    link.startService()
    assert "Authorization" not in http.sent[0].headers
    stop(link, clock)


def test_token_never_in_logs_or_repr(events, tmp_path) -> None:
    clock = Clock()
    http = FakeHttp(clock)
    answers = collections.deque([
        (500, f"bad token {TOKEN}".encode()),  # a dispatcher echoing it back
        ConnectionRefusedError(f"refused {TOKEN}"),
    ])

    def respond(path: str, payload: dict[str, Any]) -> Any:
        if path == REGISTER_PATH:
            return answers.popleft() if answers else 200
        if path == HEARTBEAT_PATH and payload["seq"] == 2:
            return 401, f"token {TOKEN} rejected".encode()
        if path == HEARTBEAT_PATH and payload["seq"] == 3:
            return 404
        return 200

    http.respond = respond
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    link = make_link(clock, http, config=make_config(
        dispatcher_base_url="http://dispatcher.test:9000", dispatcher_token=None,
        dispatcher_token_file=token_file))
    link.startService()
    for _ in range(40):
        clock.advance(1)
    stop(link, clock)
    assert http.sent[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert len(http.of(REGISTER_PATH)) >= 4 and len(http.of(HEARTBEAT_PATH)) >= 3
    assert len(dispatcher_events(events, LogLevel.warn)) >= 3
    for event in events:
        text = formatEvent(event) + repr(event)
        assert TOKEN not in text
    assert TOKEN not in repr(link) and TOKEN not in str(link)
    assert TOKEN not in repr(vars(link))


def test_plain_http_to_a_remote_dispatcher_with_a_token_warns(events) -> None:
    make_link(Clock(), FakeHttp(Clock()))
    assert any("plain http" in e["log_format"] for e in dispatcher_events(events, LogLevel.warn))
    events.clear()
    make_link(Clock(), FakeHttp(Clock()), config=make_config(dispatcher_base_url="https://d.example"))
    assert not dispatcher_events(events, LogLevel.warn)


def test_errors_in_payload_building_are_retried_not_fatal(events) -> None:
    clock = Clock()
    http = FakeHttp(clock)
    node = FakeNode()
    broken = {"on": True}
    original = node.devices

    class Exploding(list):
        def __iter__(self):
            if broken["on"]:
                raise RuntimeError("boom")
            return iter(original)

    node.devices = Exploding(original)
    link = make_link(clock, http, node=node)
    link.startService()
    assert http.sent == [] and link.state is LinkState.UNREGISTERED
    broken["on"] = False
    clock.advance(1)
    assert http.paths() == [REGISTER_PATH, HEARTBEAT_PATH]
    assert not dispatcher_events(events, LogLevel.critical)
    stop(link, clock)


# ==========================================================================
# loopback: a real fake dispatcher on 127.0.0.1


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


class FakeDispatcher(Resource):
    """Records every call; answers 200 ``{"ok": true}`` unless told otherwise.

    ``answers[path]`` is a queue of status codes for the next calls on that
    path; ``hang`` is a set of paths that are never answered.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.answers: dict[str, collections.deque[int]] = collections.defaultdict(collections.deque)
        self.hang: set[str] = set()
        self.held: list[Any] = []
        self.port: Any = None

    def render_POST(self, request: Any) -> Any:
        path = request.path.decode()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.calls.append(Call(path, headers, json.loads(request.content.read()), time.monotonic()))
        if path in self.hang:
            self.held.append(request)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        status = self.answers[path].popleft() if self.answers[path] else 200
        request.setResponseCode(status)
        return json.dumps({"ok": status < 300}).encode()

    def of(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path == path]

    def listen(self, port: int = 0) -> int:
        from twisted.internet import reactor

        site = Site(self)
        site.noisy = False
        self.port = reactor.listenTCP(port, site, interface="127.0.0.1")
        return self.port.getHost().port

    def close(self) -> Deferred[Any]:
        for request in self.held:
            request.channel.transport.abortConnection()
        self.held.clear()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else succeed(None)


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    """Wait (without blocking the reactor) until ``predicate()`` holds."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


def free_port() -> int:
    """A loopback port nobody listens on (right now)."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    number = port.getHost().port
    port.stopListening()
    return number


def real_http() -> tuple[treq.client.HTTPClient, HTTPConnectionPool]:
    from twisted.internet import reactor

    pool = HTTPConnectionPool(reactor, persistent=False)
    return treq.client.HTTPClient(Agent(reactor, pool=pool)), pool


@pytest.fixture
def dispatcher():
    fake = FakeDispatcher()
    yield fake
    pytest_twisted.blockon(fake.close())


@pytest.fixture
def no_errors():
    """Fails the test when anything logs at error level or above."""
    bad: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) and \
                event.get("log_namespace", "").startswith("rolemesh_node.dispatcher"):
            bad.append(event)

    globalLogPublisher.addObserver(observe)
    yield bad
    globalLogPublisher.removeObserver(observe)
    assert not bad, [formatEvent(e) for e in bad]


@pytest_twisted.ensureDeferred
async def test_loopback_with_a_real_node_service(dispatcher, no_errors, tmp_path) -> None:
    from twisted.internet import reactor

    from rolemesh_node.service import makeService

    port = dispatcher.listen()
    config = NodeConfig(backend="cpu", cpu_devices=2, listen_host="127.0.0.1", listen_port=0,
                        node_id="loop-node", state_dir=tmp_path,
                        dispatcher_base_url=f"http://127.0.0.1:{port}", dispatcher_token=TOKEN,
                        heartbeat_interval_s=0.05, dispatcher_timeout_s=1.0)
    service = makeService(config, reactor)
    service.startService()
    try:
        await service.when_discovered()
        node_port = service.port
        assert service.dispatcher is not None  # makeService wires the link when a dispatcher is set
        await eventually(lambda: len(dispatcher.of(HEARTBEAT_PATH)) >= 6, what="6 heartbeats")
    finally:
        began = time.monotonic()
        await service.stopService()
        stop_took = time.monotonic() - began
    assert stop_took < 2.0
    reg = dispatcher.of(REGISTER_PATH)
    assert len(reg) == 1
    body = reg[0].body
    assert body["node_id"] == "loop-node"
    assert body["url"] == f"http://127.0.0.1:{node_port}"
    assert body["version"] == __version__
    assert body["backend"] == "cpu" and body["discovered"] is True
    assert [d["id"] for d in body["devices"]] == ["cpu:0", "cpu:1"]
    assert body["devices"][0]["memory_total_bytes"] > 0
    assert body["models"] == []
    assert set(body["capabilities"]["endpoints"]) == set(NODE_ENDPOINTS)
    assert body["capabilities"]["max_pending_requests_per_device"] == config.max_pending_requests_per_device
    assert all(c.headers["authorization"] == f"Bearer {TOKEN}" for c in dispatcher.calls)
    assert all(c.headers["content-type"].startswith("application/json") for c in dispatcher.calls)
    beats = dispatcher.of(HEARTBEAT_PATH)
    seqs = [b.body["seq"] for b in beats]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [d["id"] for d in beats[-1].body["devices"]] == ["cpu:0", "cpu:1"]
    assert beats[-1].body["devices"][0]["state"] == "idle"
    assert beats[-1].body["devices"][0]["metrics"]["memory_total_bytes"] > 0
    # cadence: about 20 per second; generous bounds
    span = beats[-1].at - beats[0].at
    assert span >= 0.05 * (len(beats) - 1) * 0.5
    assert dispatcher.calls[-1].path == DEREGISTER_PATH
    assert dispatcher.calls[-1].body["node_id"] == "loop-node"
    assert service.dispatcher.state is LinkState.STOPPED


def fake_link(port: int, **kwargs: Any) -> tuple[DispatcherLink, HTTPConnectionPool]:
    from twisted.internet import reactor

    http, pool = real_http()
    config = make_config(dispatcher_base_url=f"http://127.0.0.1:{port}", heartbeat_interval_s=0.05,
                         dispatcher_timeout_s=kwargs.pop("timeout", 1.0))
    kwargs.setdefault("register_backoff", Backoff(base=0.02, factor=2.0, cap=0.1, jitter=0.5))
    kwargs.setdefault("heartbeat_backoff", Backoff(base=0.05, factor=2.0, cap=0.1, jitter=0.0))
    link = DispatcherLink(reactor=reactor, http=http, node=FakeNode(), config=config,
                          advertise_url="http://127.0.0.1:1", **kwargs)
    return link, pool


@pytest_twisted.ensureDeferred
async def test_loopback_reregisters_after_404(dispatcher, no_errors) -> None:
    port = dispatcher.listen()
    dispatcher.answers[HEARTBEAT_PATH].extend([200, 200, 404])
    link, pool = fake_link(port)
    link.startService()
    try:
        await eventually(lambda: len(dispatcher.of(REGISTER_PATH)) == 2, what="a second registration")
        await eventually(lambda: len(dispatcher.of(HEARTBEAT_PATH)) >= 6, what="heartbeats after it")
    finally:
        await link.stopService()
        await pool.closeCachedConnections()
    paths = [c.path for c in dispatcher.calls]
    assert paths[:5] == [REGISTER_PATH, HEARTBEAT_PATH, HEARTBEAT_PATH, HEARTBEAT_PATH, REGISTER_PATH]
    assert paths[-1] == DEREGISTER_PATH
    assert link.registrations == 2
    seqs = [c.body["seq"] for c in dispatcher.of(HEARTBEAT_PATH)]
    assert seqs == list(range(1, len(seqs) + 1))


@pytest_twisted.ensureDeferred
async def test_loopback_recovers_when_the_dispatcher_comes_up_late(no_errors) -> None:
    port = free_port()
    link, pool = fake_link(port)
    late = FakeDispatcher()
    link.startService()
    try:
        await eventually(lambda: link._register_attempt >= 2, what="failed registrations")
        assert link.state in (LinkState.UNREGISTERED, LinkState.REGISTERING)
        late.listen(port)
        await eventually(lambda: len(late.of(HEARTBEAT_PATH)) >= 3, what="heartbeats once it is up")
        assert len(late.of(REGISTER_PATH)) == 1
        assert link.state is LinkState.REGISTERED
    finally:
        await link.stopService()
        await pool.closeCachedConnections()
        await late.close()
    assert late.calls[-1].path == DEREGISTER_PATH


@pytest_twisted.ensureDeferred
async def test_loopback_survives_the_dispatcher_going_away_and_coming_back(no_errors) -> None:
    first = FakeDispatcher()
    port = first.listen()
    link, pool = fake_link(port)
    link.startService()
    second = FakeDispatcher()
    try:
        await eventually(lambda: len(first.of(HEARTBEAT_PATH)) >= 2, what="heartbeats")
        await first.close()
        await eventually(lambda: link._heartbeat_failures.count >= 2, what="failing heartbeats")
        assert link.state is LinkState.REGISTERED
        # it comes back having forgotten us: 404 → register again → heartbeats
        second.answers[HEARTBEAT_PATH].append(404)
        second.listen(port)
        await eventually(lambda: len(second.of(HEARTBEAT_PATH)) >= 3, what="heartbeats after the restart")
        assert [c.path for c in second.calls[:3]] == [HEARTBEAT_PATH, REGISTER_PATH, HEARTBEAT_PATH]
        assert link._heartbeat_failures.count == 0
    finally:
        await link.stopService()
        await pool.closeCachedConnections()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_loopback_stop_is_bounded_when_the_dispatcher_hangs(dispatcher, no_errors) -> None:
    port = dispatcher.listen()
    dispatcher.hang.add(DEREGISTER_PATH)
    link, pool = fake_link(port, timeout=0.3)
    link.startService()
    try:
        await eventually(lambda: len(dispatcher.of(HEARTBEAT_PATH)) >= 1, what="a heartbeat")
    finally:
        began = time.monotonic()
        await link.stopService()
        took = time.monotonic() - began
        await pool.closeCachedConnections()
    assert dispatcher.calls[-1].path == DEREGISTER_PATH
    assert 0.2 < took < 1.5


@pytest_twisted.ensureDeferred
async def test_loopback_stop_when_the_dispatcher_is_gone(no_errors) -> None:
    first = FakeDispatcher()
    port = first.listen()
    link, pool = fake_link(port)
    link.startService()
    try:
        await eventually(lambda: link.state is LinkState.REGISTERED, what="registration")
    finally:
        await first.close()
        began = time.monotonic()
        await link.stopService()
        took = time.monotonic() - began
        await pool.closeCachedConnections()
    assert took < 1.5


# ==========================================================================
# drain and reload (Clock)


def test_leave_stops_heartbeats_and_deregisters_once_with_its_reason() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    link = make_link(clock, http)
    link.startService()
    done: list[Any] = []
    link.leave("draining").addBoth(done.append)
    assert done == [None] and http.paths()[-1] == DEREGISTER_PATH
    assert http.sent[-1].json["reason"] == "draining"
    clock.advance(60)
    assert http.paths().count(HEARTBEAT_PATH) == 1  # none after leaving
    stop(link, clock)  # waits for that deregistration; sends no second one
    assert http.paths().count(DEREGISTER_PATH) == 1


def test_reconfigure_registers_again_on_a_new_token_and_keeps_the_new_interval() -> None:
    clock = Clock()
    http = FakeHttp(clock)
    link = make_link(clock, http)
    link.startService()
    link.reconfigure(make_config(heartbeat_interval_s=5.0), "http://node.test:8088", register_again=False)
    assert http.paths() == [REGISTER_PATH, HEARTBEAT_PATH]  # same identity: no new registration
    clock.advance(5)
    assert [s.at for s in http.of(HEARTBEAT_PATH)] == [0, 5]
    link.reconfigure(make_config(dispatcher_token="tok-new-0123456789"), "http://node.test:8088",
                     register_again=False)
    assert http.paths()[-2:] == [REGISTER_PATH, HEARTBEAT_PATH]  # the token changed: registered again
    assert http.sent[-1].headers["Authorization"] == "Bearer tok-new-0123456789"
    clock.advance(10)
    assert http.of(HEARTBEAT_PATH)[-1].at == 15  # back to 10 s
    stop(link, clock)
