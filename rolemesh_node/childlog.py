"""Each device's child output: one bounded ring across restarts, optional rotated files, live followers.

A :class:`DeviceLog` belongs to a device slot, not to a child: every child
the slot starts writes into the same ring (``child_log_lines`` lines), so the
last words of a child that crashed are still there after the switch that
follows. Each line is stamped once per batch (UTC, milliseconds) with the
model, the pid and the stream::

    2026-05-01T10:00:00.123Z tiny-a pid=4242 stderr: main: model loaded
    2026-05-01T10:00:03.456Z tiny-a pid=4242 agent: exited: killed by signal 9 (unexpected)

``agent`` lines are the node's own notes (start, exit) between a child's lines.

With ``log_dir`` set the same lines also go to ``<log_dir>/<device>.log``
(``cuda:0`` → ``cuda-0.log``), rotated by size (``child_log_max_bytes``,
``child_log_backups`` old files kept as ``.1`` … ``.N``). A write that fails
(disk full) is logged once and the file is dropped; the ring goes on.

A ready child's output arrives in batches (every 50 ms, see
:mod:`rolemesh_node.llama_server`): each batch costs one timestamp, one string
per line, one ``deque.extend``, one file write and one call per follower.
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.logfile import LogFile
from zope.interface import implementer

log = Logger()

STREAMS = {1: "stdout", 2: "stderr"}
#: a follower that has received nothing for this long gets an SSE comment (proxies in between keep it open)
KEEPALIVE_S = 15.0


class Follower(Protocol):
    def lines(self, entries: list[str]) -> None: ...

    def close(self) -> None: ...


def file_name(device_id: str) -> str:
    """The log file of a device: ``cuda:0`` → ``cuda-0.log``."""
    return device_id.replace(":", "-").replace(os.sep, "-") + ".log"


def stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


class DeviceLog:
    """The output of every child of one device: a ring of ``size`` lines, a file, followers."""

    def __init__(self, device_id: str, size: int = 2000, file: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.device_id = device_id
        self.size = size
        self.file = file
        self.clock = clock
        self._ring: collections.deque[str] = collections.deque(maxlen=size)
        self._followers: list[Follower] = []
        self.closed = False

    @classmethod
    def for_device(cls, device_id: str, config: Any) -> "DeviceLog":
        """The log of a device as the config says (a file under ``log_dir`` when set)."""
        file = None
        if config.log_dir is not None:
            try:
                file = LogFile(file_name(device_id), str(config.log_dir), rotateLength=config.child_log_max_bytes,
                               maxRotatedFiles=config.child_log_backups, defaultMode=0o640)
            except OSError as exc:
                log.warn("device {device}: cannot open its child log file in {dir}: {error}; keeping the "
                         "output in memory only", device=device_id, dir=str(config.log_dir), error=exc)
        return cls(device_id, config.child_log_lines, file)

    # ------------------------------------------------------------ writing

    def add(self, model: str, pid: int | None, fd: int, lines: Iterable[str]) -> None:
        """A batch of lines a child wrote on ``fd`` (1 stdout, 2 stderr)."""
        prefix = f"{stamp(self.clock())} {model} pid={pid} {STREAMS.get(fd, fd)}: "
        self._keep([prefix + line for line in lines])

    def note(self, model: str, pid: int | None, text: str) -> None:
        """One line of the agent's own about a child (started, exited)."""
        self._keep([f"{stamp(self.clock())} {model} pid={pid} agent: {text}"])

    def _keep(self, entries: list[str]) -> None:
        if self.closed or not entries:
            return
        self._ring.extend(entries)
        if self.file is not None:
            self._write(entries)
        for follower in self._followers:
            follower.lines(entries)

    def _write(self, entries: list[str]) -> None:
        try:
            self.file.write(("\n".join(entries) + "\n").encode("utf-8", "replace"))
        except (OSError, ValueError) as exc:
            log.warn("device {device}: writing its child log file {path} failed: {error}; keeping the "
                     "output in memory only", device=self.device_id, path=getattr(self.file, "path", "?"),
                     error=exc)
            self._close_file()

    # ------------------------------------------------------------ reading

    def tail(self, n: int) -> list[str]:
        """The last ``n`` lines (fewer when the ring holds fewer)."""
        n = max(0, min(n, len(self._ring)))
        return list(itertools.islice(self._ring, len(self._ring) - n, None))

    def follow(self, follower: Follower) -> Callable[[], None]:
        """``follower.lines(entries)`` for every new batch until the log closes; returns an unsubscribe."""
        if self.closed:
            follower.close()
            return lambda: None
        self._followers.append(follower)

        def unsubscribe() -> None:
            if follower in self._followers:
                self._followers.remove(follower)

        return unsubscribe

    # ------------------------------------------------------------ life

    def reopen(self) -> None:
        """Reopen the file (after an external tool moved it away)."""
        if self.file is not None:
            try:
                self.file.reopen()
            except OSError as exc:
                log.warn("device {device}: reopening its child log file failed: {error}", device=self.device_id,
                         error=exc)
                self.file = None

    def close(self) -> None:
        """The node stops: followers are ended, the file closed (the ring stays readable)."""
        self.closed = True
        followers, self._followers = self._followers, []
        for follower in followers:
            follower.close()
        self._close_file()

    def _close_file(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass


def check_log_dir(path: Path) -> str | None:
    """Make ``path`` if needed; the problem when it is not a writable directory (else None)."""
    if os.path.lexists(path) and not path.is_dir():
        return f"{path} is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror or type(exc).__name__}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


# --------------------------------------------------------------------------- SSE


def _event(line: str) -> bytes:
    # a line never holds "\n" (it was split on it); a lone "\r" would end an SSE line too
    return b"data: " + line.replace("\r", " ").encode("utf-8", "replace") + b"\n\n"


@implementer(IPushProducer)
class SSEFollower:
    """Writes a device's new lines to one HTTP request as server-sent events.

    :meth:`start` answers a Deferred that fires when the log closes (the node
    stops); cancelling it (the API does when the client goes away) unsubscribes
    and cancels the keep-alive timer. It is the request's push producer: while
    a slow client has the transport paused, new lines are dropped (and counted
    in a ``: N lines skipped`` comment on resume) instead of piling up in memory.
    """

    def __init__(self, request: Any, devlog: DeviceLog, reactor: Any, keepalive_s: float = KEEPALIVE_S) -> None:
        self.request = request
        self.devlog = devlog
        self.reactor = reactor
        self.keepalive_s = keepalive_s
        self.done: Deferred[bytes] = Deferred(lambda _d: self._stop())
        self._unsubscribe: Callable[[], None] = lambda: None
        self._timer: Any = None
        self._paused = False
        self._skipped = 0
        self._registered = False

    def start(self, backlog: int) -> Deferred[bytes]:
        request = self.request
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b": following " + self.devlog.device_id.encode() + b"\n\n"
                      + b"".join(_event(line) for line in self.devlog.tail(backlog)))
        if not self.devlog.closed:
            request.registerProducer(self, True)
            self._registered = True
        self._unsubscribe = self.devlog.follow(self)
        if not self.done.called:
            self._arm()
        return self.done

    def lines(self, entries: list[str]) -> None:
        if self._paused:
            self._skipped += len(entries)
            return
        self.request.write(b"".join(_event(line) for line in entries))
        self._arm()

    def close(self) -> None:
        self._stop()
        if not self.done.called:
            self.done.callback(b"")

    # IPushProducer, driven by the client's connection
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._skipped:
            skipped, self._skipped = self._skipped, 0
            self.request.write(b": %d lines skipped (the client read too slowly)\n\n" % skipped)

    def stopProducing(self) -> None:
        self._stop()

    def _keepalive(self) -> None:
        self._timer = None
        if not self._paused:
            self.request.write(b": keep-alive\n\n")
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.keepalive_s)
        else:
            self._timer = self.reactor.callLater(self.keepalive_s, self._keepalive)

    def _stop(self) -> None:
        self._unsubscribe()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._registered:
            self._registered = False
            self.request.unregisterProducer()
