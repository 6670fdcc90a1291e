"""The access log: one line per HTTP request, kept off the request's path.

Per request, :meth:`AccessLog.add` formats the line — the combined log format
(``twisted.web.http.combinedLogFormatter``) behind the node's usual timestamp
prefix; both dates are made once per second, from the same second (the
``Site``'s own cached date is not used: it is refreshed every second counted
from when the port opened, so it lags the clock by up to a second) — and
appends it to a list. No log event, no ``strftime``, no system call. A
``LoopingCall`` on the node's reactor hands the list on every
:data:`FLUSH_INTERVAL_S` seconds; so does :meth:`AccessLog.stop` (the node's
clean stop), and so does :meth:`AccessLog.add` itself once
:data:`MAX_BUFFERED_LINES` are waiting (a burst cannot grow the list without
bound) or while the loop is not running (before start, after stop: nothing is
held back then).

**Where the lines go: one ``twisted.logger`` event per batch.** Each flush
emits a single info-level event (namespace :data:`NAMESPACE`) carrying the
batch's text under :data:`LINES_KEY`; the node's text observers write that text
as it is (:func:`write_batches_raw`), one ``write`` + ``flush`` per batch. This
was chosen over a writer of our own handed the log stream because the event
takes the path every other log line takes:

* the same destination in both run modes without knowing what it is — the
  CLI's stdout observer, twistd's logfile (a ``LogFile``, which rotates
  itself: a second writer to it would have to go through the very same object)
  or its stdout with ``-n``; the stream sits inside twistd's observer, which
  keeps no public reference to it;
* the ``log_level`` filter applies to it as to any info line, and events sent
  before logging has begun are buffered and replayed by ``globalLogBeginner``;
* an observer that does not know about batches still shows every line: a plain
  ``twisted.logger`` text observer writes the batch as one multi-line entry
  (continuation lines indented by a tab), twistd's ``--syslog`` observer sends
  each line as a message of its own.

Each line is written in the node's log format, ``<time> [rolemesh_node.accesslog#info] <combined line>``
(the time is when the request finished, to the second); within one flush the
lines are in the order the requests finished, and a batch can follow log lines
of the last 0.2 s — the time on each line is what orders them.

Secrets stay out: the combined format has no ``Authorization`` header (nor any
other header but ``Referer`` and ``User-Agent``). When ``log_level`` hides info
lines, :func:`shows_access_lines` is false and the node makes no
:class:`AccessLog` at all, so nothing is formatted for nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatTime,
)
from twisted.web.http import combinedLogFormatter, datetimeToLogString

#: the namespace of the batch events (and the ``[…#info]`` tag on every line)
NAMESPACE = "rolemesh_node.accesslog"
#: the event key holding a batch's text: its lines joined by ``"\n"``
LINES_KEY = "rolemesh_access_lines"
#: how often the buffered lines are handed to the log
FLUSH_INTERVAL_S = 0.2
#: hand the lines on at once when this many are waiting (~100 kB)
MAX_BUFFERED_LINES = 512

_TAG = f" [{NAMESPACE}#info] "


def shows_access_lines(access_log: bool, log_level: str) -> bool:
    """Whether an access line would reach the log: ``access_log`` is on and
    ``log_level`` lets info lines of :data:`NAMESPACE` through (the very
    predicate of the node's level filter)."""
    if not access_log:
        return False
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(log_level))
    return predicate({"log_namespace": NAMESPACE, "log_level": LogLevel.info}) is not PredicateResult.no


class AccessLog:
    """Buffers access lines and hands them to the log in batches.

    ``reactor`` provides ``seconds()`` (the line's time) and is the
    ``LoopingCall``'s clock. ``observer`` is where the batch events go
    (default: the global log publisher).
    """

    def __init__(self, reactor: Any, *, interval_s: float = FLUSH_INTERVAL_S,
                 max_lines: int = MAX_BUFFERED_LINES, observer: ILogObserver | None = None) -> None:
        self.reactor = reactor
        self.interval_s = interval_s
        self.max_lines = max_lines
        self._log = Logger(namespace=NAMESPACE, observer=observer)
        self._lines: list[str] = []
        self._second = -1
        self._prefix = ""
        self._date = ""
        self._batching = False
        self._loop = LoopingCall(self.flush)
        self._loop.clock = reactor

    def add(self, request: Any) -> None:
        """Buffer the line for ``request``, a finished one."""
        second = int(self.reactor.seconds())
        if second != self._second:
            self._second = second
            self._prefix = formatTime(second) + _TAG
            self._date = datetimeToLogString(second)
        lines = self._lines
        lines.append(self._prefix + combinedLogFormatter(self._date, request))
        if not self._batching or len(lines) >= self.max_lines:
            self.flush()

    @property
    def pending(self) -> int:
        """Lines buffered and not yet handed on."""
        return len(self._lines)

    def flush(self) -> None:
        """Hand every buffered line to the log, as one event."""
        lines = self._lines
        if lines:
            self._lines = []
            self._log.emit(LogLevel.info, "{" + LINES_KEY + "}", **{LINES_KEY: "\n".join(lines)},
                           access_lines_count=len(lines))

    def start(self) -> None:
        """Begin batching: flush every ``interval_s`` from now on."""
        if self._loop.running:
            return
        self._batching = True
        done = self._loop.start(self.interval_s, now=False)
        done.addErrback(self._loop_failed)

    def stop(self) -> None:
        """Stop batching and flush; later lines are handed on one by one."""
        self._batching = False
        if self._loop.running:
            self._loop.stop()
        self.flush()

    def _loop_failed(self, failure: Any) -> None:
        self._batching = False  # write through from now on: lose nothing
        self._log.failure("the access log's flush loop stopped", failure)


def _is_text_format(format_event: Any) -> bool:
    # textFileLogObserver's formatter is a closure of that function; any other
    # FileLogObserver (jsonFileLogObserver, a custom --logger) keeps its format
    return getattr(format_event, "__qualname__", "").startswith("textFileLogObserver.")


def write_batches_raw(observer: ILogObserver) -> ILogObserver:
    """Make ``observer`` write access batches as they are, when it is a text
    ``FileLogObserver`` (``textFileLogObserver``: the CLI's and twistd's):
    every line of a batch already carries its time and tag. Other events, and
    other observers, are left alone. Returns ``observer``."""
    if isinstance(observer, FileLogObserver) and _is_text_format(observer.formatEvent):
        classic = observer.formatEvent

        def format_event(event: Any) -> str | None:
            lines = event.get(LINES_KEY)
            if lines is not None and event.get("log_namespace") == NAMESPACE:
                return lines + "\n"
            return classic(event)

        observer.formatEvent = format_event
    return observer
