"""Prototype changes to ``rolemesh_node``, measured before they are made.

A *variant* is a node started by the bench with some config keys set and/or
some functions of ``rolemesh_node`` replaced at start (by
:mod:`bench.node_variant`, before the CLI builds the service). Each patch here
is the smallest stand-in for a proposed change in the code; docs/performance.md
says which were measured and what they gave. The patches target the code as it
was when they were written: if the code they replace has changed, a patch may
no longer apply (it raises at start, and the bench says so).

    python -m bench.run --variants noaccesslog,lean
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import Any, Callable

# ---------------------------------------------------------------- patches


def noform() -> None:
    """Skip twisted.web's form parsing of POST bodies.

    For every POST with a body, ``Request.requestReceived`` parses the
    Content-Type with ``email.message.EmailMessage`` (~27 µs here) to look for
    form data the node never reads. Proposal: ``web.make_site`` passes
    ``parsePOSTFormSubmission=False`` to ``NodeSite`` (Twisted 26.10 accepts it;
    it sets ``Site._parsePOSTFormSubmission``, which each request copies)."""
    from rolemesh_node import web

    original = web.NodeSite.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._parsePOSTFormSubmission = False

    web.NodeSite.__init__ = __init__


def nostat() -> None:
    """No file-system calls per request.

    ``ModelSpec.available()`` (stat + access) and ``size_bytes()`` (stat, twice:
    the model and the loaded one in ``Node.views``) run on every request.
    Proposal: check them in the metrics loop (every ``metrics_interval_s``)
    and on a child start, and read the cached values on the hot path. Here: cached
    for one second."""
    import time

    from rolemesh_node import config

    cls = config.ModelSpec
    avail, size = cls.available, cls.size_bytes
    cache: dict[tuple[str, Any], tuple[float, Any]] = {}

    def cached(kind: str, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def method(self: Any) -> Any:
            now = time.monotonic()
            key = (kind, self.path)
            hit = cache.get(key)
            if hit is not None and now - hit[0] < 1.0:
                return hit[1]
            value = fn(self)
            cache[key] = (now, value)
            return value
        return method

    cls.available = cached("available", avail)
    cls.size_bytes = cached("size", size)


def nossl() -> None:
    """Do not load pyOpenSSL/cryptography (≈14 MB of RSS).

    Importing the reactor imports ``twisted.internet.ssl``, which loads
    pyOpenSSL and cryptography's Rust extension whenever they are installed
    (``treq`` depends on ``twisted[tls]``, so they always are). The node only
    needs TLS for an ``https://`` dispatcher. Proposal: in ``cli.main`` (and the
    twistd plugin), before the reactor is imported, ``sys.modules["OpenSSL"] =
    None`` unless ``dispatcher_base_url`` starts with ``https:``."""
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]


def accesslog_buffered() -> None:
    """The access log without twisted.logger, written in batches.

    Each access-log line goes through the legacy ``log.msg`` bridge, a
    ``twisted.logger`` event, the level filter, ``formatEvent`` with a
    ``strftime`` per line, and a ``write`` + ``flush`` of stdout — ≈17 µs and a
    system call per request (to journald's pipe, under systemd: a wake-up of
    journald per request). Proposal (``web.make_site``): keep the line
    (``combinedLogFormatter``), prefix it with a timestamp cached per second,
    append it to a list, and write the list from a ``LoopingCall`` every
    0.2 s (and at stop) to the same stream the log observer writes to."""
    import time as _time

    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from twisted.web import server
    from twisted.web.http import combinedLogFormatter

    lines: list[str] = []
    stamp = [0, ""]

    def log(self: Any, request: Any) -> None:
        now = int(_time.time())
        if now != stamp[0]:
            stamp[0] = now
            stamp[1] = _time.strftime("%Y-%m-%dT%H:%M:%S+0000 [access] ", _time.gmtime(now))
        lines.append(stamp[1] + combinedLogFormatter(self._logDateTime, request) + "\n")

    def flush() -> None:
        if lines:
            text = "".join(lines)
            lines.clear()
            sys.stdout.write(text)
            sys.stdout.flush()

    server.Site.log = log  # type: ignore[method-assign]
    loop = LoopingCall(flush)
    reactor.callWhenRunning(loop.start, 0.2, False)
    reactor.addSystemEventTrigger("after", "shutdown", flush)


def nometrics() -> None:
    """No Prometheus counting per request (measures what it costs)."""
    from rolemesh_node import proxy

    proxy.ProxyResource.metrics = property(lambda self: None, lambda self, value: None)


def stderrbatch() -> None:
    """Read a ready child's stdout/stderr in batches, not per write.

    llama-server writes ~9 log lines per request (slot selection, timings,
    release) in several write()s; the agent wakes for each (≈3.5 reads per
    request: an epoll event, a read, line splitting, a regex) right while it
    relays the answer. Proposal (``llama_server.LlamaServerChild``): while
    starting, read as now (the ready hint must be seen at once); once ready,
    ``stopReading()`` the child's pipes, enlarge them (``F_SETPIPE_SZ``, 1 MiB)
    and drain them from a ``LoopingCall`` every 50 ms; on exit, read on again
    so the last lines are kept."""
    from twisted.internet.task import LoopingCall

    from rolemesh_node import llama_server

    cls = llama_server.LlamaServerChild
    F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    orig_made, orig_probed, orig_exited = cls.connectionMade, cls._probed, cls.processExited

    def connectionMade(self: Any) -> None:
        orig_made(self)
        for fd in (1, 2):
            pipe = getattr(self.transport, "pipes", {}).get(fd)
            if pipe is not None:
                try:
                    fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, 1 << 20)
                except OSError:
                    pass

    def drain(self: Any) -> None:
        for fd in (1, 2):
            pipe = getattr(self.transport, "pipes", {}).get(fd)
            if pipe is None:
                continue
            for _ in range(64):  # up to 4 MiB a round
                try:
                    data = os.read(pipe.fileno(), 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if not data:
                    break
                self._lines(fd, data)

    def _probed(self: Any, result: Any) -> None:
        orig_probed(self, result)
        if self.state is llama_server.ChildState.READY and getattr(self, "_batch", None) is None:
            for fd in (1, 2):
                pipe = getattr(self.transport, "pipes", {}).get(fd)
                if pipe is not None:
                    pipe.stopReading()
            self._batch = LoopingCall(drain, self)
            self._batch.clock = self.reactor
            self._batch.start(0.05, now=False)

    def processExited(self: Any, reason: Any) -> None:
        batch = getattr(self, "_batch", None)
        if batch is not None and batch.running:
            batch.stop()
        try:
            drain(self)
        except Exception:
            pass
        for fd in (1, 2):
            pipe = getattr(self.transport, "pipes", {}).get(fd)
            if pipe is not None and not pipe.disconnected:
                pipe.startReading()
        orig_exited(self, reason)

    cls.connectionMade = connectionMade
    cls._probed = _probed
    cls.processExited = processExited


PATCHES: dict[str, Callable[[], None]] = {
    "noform": noform,
    "nostat": nostat,
    "nossl": nossl,
    "accesslog_buffered": accesslog_buffered,
    "nometrics": nometrics,
    "stderrbatch": stderrbatch,
}

#: the prototypes proposed together (all but nometrics, which only measures)
LEAN = ["noform", "nostat", "nossl", "accesslog_buffered", "stderrbatch"]

# ------------------------------------------------------------- variants

#: name -> {"config": extra top-level config keys, "child_args": extra child flags, "patches": [...]}
VARIANTS: dict[str, dict[str, Any]] = {
    # the operator can already turn the access log off: what does it cost?
    "noaccesslog": {"config": {"access_log": False}},
    # children that log nothing: what the agent's reading of their stderr costs
    # (measurement only — the node needs the log lines)
    "childquiet": {"child_args": ["--log-disable"]},
    # one request queued inside llama-server while one runs (llama_server_parallel stays 1)
    "pipeline2": {"config": {"max_concurrent_requests_per_device": 2}},
    # each prototype alone
    **{name: {"patches": [name]} for name in PATCHES},
    # all the proposed prototypes together (default config otherwise)
    "lean": {"patches": LEAN},
    "lean+pipeline2": {"patches": LEAN, "config": {"max_concurrent_requests_per_device": 2}},
}
