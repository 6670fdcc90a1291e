"""The access log: buffered lines, written in batches (rolemesh_node.accesslog).

Unit tests on a ``Clock`` (buffering, flush cadence, flush at stop, the bound,
the level, how the node's observers write a batch), then the real path: an
in-process node with real HTTP requests, and real subprocesses —
``rolemesh-node-agent`` (stdout), ``twistd -n`` (stdout) and daemonized twistd
(its logfile).
"""

from __future__ import annotations

import io
import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, deferLater
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    eventAsText,
    formatTime,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.web.http import datetimeToLogString
from twisted.web.http_headers import Headers

from rolemesh_node.accesslog import (
    LINES_KEY,
    NAMESPACE,
    AccessLog,
    shows_access_lines,
    write_batches_raw,
)
from rolemesh_node.config import NodeConfig
from rolemesh_node.logs import level_observer
from rolemesh_node.service import NodeService
from tests.test_run_modes import (
    AGENT,
    TWISTD,
    assert_clean_log,
    http_json,
    kill_group,
    linux_only,
    run_daemon_and_kill,
    start,
    wait_exit,
    wait_healthy,
    write_node_config,
)

KEY = "access-log-test-key-0123456789"
#: one access line as the node writes it: time, tag, combined log format
LINE = re.compile(r'^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) \[rolemesh_node\.accesslog#info\] '
                  r'"(?P<ip>[^"]+)" - - (?P<date>\[[^\]]+\]) "(?P<method>\S+) (?P<uri>\S+) HTTP/1\.1" (?P<code>\d{3}) '
                  r'(?P<length>\d+|-) "(?P<referrer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)"$', re.MULTILINE)


class FakeRequest:
    """What ``combinedLogFormatter`` reads of a finished request."""

    def __init__(self, uri: bytes = b"/health", code: int = 200, method: bytes = b"GET",
                 headers: dict[bytes, bytes] | None = None) -> None:
        self.uri = uri
        self.code = code
        self.method = method
        self.clientproto = b"HTTP/1.1"
        self.sentLength = 17
        self.requestHeaders = Headers({k: [v] for k, v in (headers or {}).items()})

    def getClientAddress(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 50000)

    def getHeader(self, name: bytes) -> bytes | None:
        return self.requestHeaders.getRawHeaders(name, [None])[-1]


def batches(events: list[dict[str, Any]]) -> list[list[str]]:
    return [e[LINES_KEY].split("\n") for e in events if LINES_KEY in e]


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_800_000_000)  # a realistic time of day
    return clock


@pytest.fixture
def events() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def access(clock: Clock, events: list[dict[str, Any]]) -> AccessLog:
    return AccessLog(clock, observer=events.append)


# --------------------------------------------------------------------------
# unit: buffering, cadence, stop, bound


def test_lines_are_buffered_and_written_as_one_batch(access: AccessLog, clock: Clock,
                                                     events: list[dict[str, Any]]) -> None:
    access.start()
    for uri in (b"/health", b"/v1/models", b"/nope"):
        access.add(FakeRequest(uri, 404 if uri == b"/nope" else 200))
    assert events == [] and access.pending == 3  # nothing per request
    clock.advance(0.2)
    assert len(events) == 1 and access.pending == 0
    event = events[0]
    assert event["log_level"] is LogLevel.info and event["log_namespace"] == NAMESPACE
    assert event["access_lines_count"] == 3
    [lines] = batches(events)
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m["uri"], m["code"]) for m in parsed] == [("/health", "200"), ("/v1/models", "200"), ("/nope", "404")]
    # the node's timestamp, then the combined format's own date: the same second
    assert lines[0].startswith(formatTime(clock.seconds()) + " [")
    assert f" - - {datetimeToLogString(clock.seconds())} " in lines[0]
    access.stop()


def test_flush_cadence(access: AccessLog, clock: Clock, events: list[dict[str, Any]]) -> None:
    access.start()
    access.add(FakeRequest())
    clock.advance(0.1)
    assert events == []
    clock.advance(0.11)  # 0.2 s after the start (0.1 + 0.1 may fall short in floats)
    assert len(events) == 1
    clock.advance(1.0)  # nothing buffered: no empty batch
    assert len(events) == 1
    access.add(FakeRequest())
    access.add(FakeRequest())
    clock.advance(0.2)
    assert [len(b) for b in batches(events)] == [1, 2]
    access.stop()
    assert clock.getDelayedCalls() == []


def test_each_line_keeps_its_own_second(access: AccessLog, clock: Clock, events: list[dict[str, Any]]) -> None:
    clock.advance(0.95 - clock.seconds() % 1)  # .95 into a second
    access.start()
    access.add(FakeRequest(b"/a"))
    clock.advance(0.1)  # the next second: the cached prefix changes
    access.add(FakeRequest(b"/b"))
    clock.advance(0.11)
    [lines] = batches(events)
    first, second = (LINE.match(line) for line in lines)
    assert first[1] != second[1] and first["date"] != second["date"]
    assert second["date"] == datetimeToLogString(int(clock.seconds()))
    access.stop()


def test_stop_flushes_and_later_lines_are_written_at_once(access: AccessLog, clock: Clock,
                                                            events: list[dict[str, Any]]) -> None:
    access.start()
    access.add(FakeRequest(b"/last"))
    access.stop()
    assert [LINE.match(b[0])["uri"] for b in batches(events)] == ["/last"]
    assert clock.getDelayedCalls() == []  # the loop is gone
    access.add(FakeRequest(b"/after-stop"))  # e.g. a request that ends during the shutdown
    assert len(events) == 2 and access.pending == 0
    access.stop()  # idempotent
    assert len(events) == 2


def test_not_started_writes_through(access: AccessLog, events: list[dict[str, Any]]) -> None:
    access.add(FakeRequest())
    assert len(events) == 1 and access.pending == 0


def test_the_buffer_is_bounded(clock: Clock, events: list[dict[str, Any]]) -> None:
    access = AccessLog(clock, max_lines=4, observer=events.append)
    access.start()
    for _ in range(10):  # a burst within one interval
        access.add(FakeRequest())
        assert access.pending < 4
    assert [len(b) for b in batches(events)] == [4, 4]
    clock.advance(0.2)
    assert [len(b) for b in batches(events)] == [4, 4, 2]
    access.stop()


def test_no_secret_reaches_the_line(access: AccessLog, events: list[dict[str, Any]]) -> None:
    access.add(FakeRequest(b"/v1/models?x=1", headers={b"authorization": f"Bearer {KEY}".encode(),
                                                            b"x-api-key": KEY.encode(),
                                                            b"user-agent": b'curl "8" \xff'}))
    [[line]] = batches(events)
    assert KEY not in line
    match = LINE.match(line)
    assert match and match["uri"] == "/v1/models?x=1"
    assert match["agent"] == r'curl \"8\" \xff'  # escaped: quotes kept apart, ASCII only


def test_loop_failure_is_logged_and_lines_write_through(clock: Clock) -> None:
    seen: list[dict[str, Any]] = []
    access = AccessLog(clock, observer=seen.append)
    access.start()
    access.add(FakeRequest())
    access._loop.f = lambda: 1 / 0  # the loop's next call fails
    clock.advance(0.2)
    failures = [e for e in seen if e.get("log_failure") is not None]
    assert len(failures) == 1 and "flush loop stopped" in failures[0]["log_format"]
    assert not access._loop.running and clock.getDelayedCalls() == []
    access.add(FakeRequest())  # not batching any more: written at once, the buffered line with it
    assert access.pending == 0 and [len(b) for b in batches(seen)] == [2]


# --------------------------------------------------------------------------
# unit: the level, and the node's observers


def test_shows_access_lines_follows_log_level() -> None:
    assert shows_access_lines(True, "debug") and shows_access_lines(True, "info")
    assert not shows_access_lines(True, "warn") and not shows_access_lines(True, "error")
    assert not shows_access_lines(False, "info") and not shows_access_lines(False, "debug")


@pytest.mark.parametrize(("access_log", "log_level", "made"), [
    (True, "info", True), (True, "debug", True), (True, "warn", False), (True, "error", False),
    (False, "info", False),
])
def test_the_node_makes_an_access_log_only_when_it_shows(access_log: bool, log_level: str, made: bool) -> None:
    config = NodeConfig(source="t.yaml", backend="cpu", node_id="n1", access_log=access_log, log_level=log_level)
    service = NodeService(config, Clock())
    assert (service.access_log is not None) is made
    assert service.site.access_log is service.access_log  # None: nothing formatted, no buffer, no loop


def batch_event(text: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []
    access = AccessLog(Clock(), observer=seen.append)
    for uri in text.split():
        access._lines.append(f"2026-11-28T14:03:07+0000 [{NAMESPACE}#info] {uri}")
    access.flush()
    return seen[0]


def test_the_node_observer_writes_a_batch_raw_and_the_rest_as_before() -> None:
    stream = io.StringIO()
    observer = level_observer(stream, "info")
    observer(batch_event("/a /b /c"))
    Logger(namespace="rolemesh_node.node", observer=observer).info("hello {who}", who="you")
    text = stream.getvalue()
    lines = text.splitlines()
    assert lines[:3] == [f"2026-11-28T14:03:07+0000 [{NAMESPACE}#info] /{x}" for x in "abc"]
    assert re.match(r"^\S+ \[rolemesh_node\.node#info\] hello you$", lines[3]), lines
    assert text.endswith("\n") and len(lines) == 4


def test_the_node_observer_drops_batches_below_its_level() -> None:
    stream = io.StringIO()
    level_observer(stream, "warn")(batch_event("/a"))
    assert stream.getvalue() == ""


def test_other_observers_keep_their_format() -> None:
    # JSON lines stay JSON; a plain text observer (not wrapped) still shows every line
    json_stream, plain_stream = io.StringIO(), io.StringIO()
    write_batches_raw(jsonFileLogObserver(json_stream))(batch_event("/a /b"))
    assert json.loads(json_stream.getvalue().strip("\x1e\n"))[LINES_KEY].count("\n") == 1
    textFileLogObserver(plain_stream)(batch_event("/a /b"))
    assert plain_stream.getvalue().count(f"[{NAMESPACE}#info] /") == 2
    # wrapping twice changes nothing; a non-file observer is returned as it is
    stream = io.StringIO()
    observer = write_batches_raw(write_batches_raw(textFileLogObserver(stream)))
    observer(batch_event("/a"))
    assert stream.getvalue().count("\n") == 1
    filtering = FilteringLogObserver(lambda e: None, [])
    assert write_batches_raw(filtering) is filtering


# --------------------------------------------------------------------------
# a real node, real HTTP requests


async def wait_for(predicate: Any, timeout: float = 5.0) -> Any:
    from twisted.internet import reactor

    for _ in range(int(timeout / 0.02)):
        value = predicate()
        if value:
            return value
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("timed out")


@pytest_twisted.ensureDeferred
async def test_a_real_node_logs_requests_in_batches(node_service: Any, http_client: Any,
                                                    stand_in_bin: str) -> None:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        service = await node_service({"backend": "cpu", "llama_server_bin": stand_in_bin, "api_keys": [KEY]})
        base = f"http://127.0.0.1:{service.port}"
        auth = {"Authorization": f"Bearer {KEY}"}
        for path, headers in (("/health", {}), ("/v1/models?limit=1", auth), ("/v1/node/inventory", {}),
                              ("/nope", auth)):
            response = await http_client.get(base + path, headers=headers)
            await response.content()
        await wait_for(lambda: sum(len(b) for b in batches(seen)) >= 4)
        assert len(batches(seen)) < 4  # batched, not one event per request
        # the last request's line, held in the buffer, is written by the node's stop
        service.access_log._loop.stop()  # no timed flush from here on (still batching)
        response = await http_client.get(base + "/health")
        await response.content()
        assert service.access_log.pending == 1
        await service.stopService()
        assert service.access_log.pending == 0
    finally:
        globalLogPublisher.removeObserver(seen.append)
    stream = io.StringIO()
    observer = level_observer(stream, "info")
    for event in seen:
        observer(event)
    text = stream.getvalue()
    lines = [m.groupdict() for m in LINE.finditer(text)]
    assert [(x["method"], x["uri"], x["code"]) for x in lines] == [
        ("GET", "/health", "200"), ("GET", "/v1/models?limit=1", "200"), ("GET", "/v1/node/inventory", "401"),
        ("GET", "/nope", "404"), ("GET", "/health", "200")]
    assert all(x["ip"] == "127.0.0.1" for x in lines)
    assert KEY not in text and KEY not in repr(seen)
    assert not service.access_log._loop.running


@pytest_twisted.ensureDeferred
async def test_access_log_false_logs_no_request(node_service: Any, http_client: Any, stand_in_bin: str) -> None:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        service = await node_service({"backend": "cpu", "llama_server_bin": stand_in_bin, "access_log": False})
        assert service.access_log is None and service.site.access_log is None
        response = await http_client.get(f"http://127.0.0.1:{service.port}/health")
        await response.content()
        await service.stopService()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert response.code == 200
    assert not [e for e in seen if e.get("log_namespace") == NAMESPACE]
    assert not [e for e in seen if "GET /health" in (eventAsText(e) or "")]


# --------------------------------------------------------------------------
# real subprocesses: the lines land where the rest of the log goes


def get(port: int, path: str) -> int:
    try:
        status, _ = http_json(f"http://127.0.0.1:{port}{path}")
    except ValueError:  # not JSON (e.g. /metrics)
        status = 200
    return status


REQUESTS = ("/health", "/v1/models", "/v1/node/inventory?verbose=1", "/nope")


def access_lines(text: str) -> list[tuple[str, str]]:
    """``(uri, code)`` of every access line; checks each line's two dates name the same second."""
    from datetime import datetime

    found = []
    for match in LINE.finditer(text):
        stamp = datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S%z")
        date = datetime.strptime(match["date"], "[%d/%b/%Y:%H:%M:%S %z]")
        assert stamp == date, match[0]
        found.append((match["uri"], match["code"]))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("runner", [
    pytest.param([AGENT], id="rolemesh-node-agent"),
    pytest.param([TWISTD, "-n", "--pidfile", "", "rolemesh-node"], id="twistd-n"),
])
@pytest.mark.parametrize("log_level", ["info", "warn"])
def test_lines_reach_stdout(tmp_path: Path, free_port: Any, runner: list[str], log_level: str) -> None:
    port = free_port()
    config = write_node_config(tmp_path, port)
    config.write_text(config.read_text() + f"log_level: {log_level}\n")
    proc, out = start([*runner, "--config", str(config)], tmp_path)
    try:
        wait_healthy(port, proc, out)  # its own /health requests are logged too
        codes = [get(port, path) for path in REQUESTS]
        assert codes == [200, 200, 200, 404]
        proc.send_signal(signal.SIGTERM)  # right away: the stop writes what is buffered
        assert wait_exit(proc, out) == 0
    finally:
        kill_group(proc)
    text = out.read_text()
    assert_clean_log(text)
    lines = access_lines(text)
    if log_level == "warn":
        assert lines == [] and "accesslog" not in text, text
        return
    assert lines[-4:] == [("/health", "200"), ("/v1/models", "200"), ("/v1/node/inventory?verbose=1", "200"),
                          ("/nope", "404")], text
    assert set(lines[:-4]) == {("/health", "200")}  # wait_healthy's polls
    # one line per request, each on its own line, the same format as the node's other lines
    assert len([x for x in text.splitlines() if "accesslog" in x]) == len(lines)
    listening = next(x for x in text.splitlines() if "rolemesh-node listening on" in x)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[", listening)


@pytest.mark.slow
@linux_only
def test_lines_reach_the_twistd_logfile(tmp_path: Path, free_port: Any) -> None:
    port = free_port()

    def while_up() -> None:
        assert [get(port, path) for path in REQUESTS] == [200, 200, 200, 404]

    run_daemon_and_kill(tmp_path, port, write_node_config(tmp_path, port), while_up)
    text = (tmp_path / "node.log").read_text()
    lines = access_lines(text)
    assert lines[-4:] == [("/health", "200"), ("/v1/models", "200"), ("/v1/node/inventory?verbose=1", "200"),
                          ("/nope", "404")], text
    # written before twistd's last line, by the clean stop
    assert text.index("/nope HTTP/1.1") < text.index("Server Shut Down.")
