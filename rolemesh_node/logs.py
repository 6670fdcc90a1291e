"""Log observers filtered by ``log_level``, and the log file, for the CLI and for twistd.

Both also write the access log's batches as they are
(:func:`rolemesh_node.accesslog.write_batches_raw`).

**The log file** (``rolemesh-node-agent --logfile PATH``, ``twistd --logfile
PATH``) is an :class:`AppendLogFile`: opened in append mode, so after
logrotate's ``copytruncate`` the next line lands at the start of the emptied
file instead of at the old offset (which would leave a hole of NUL bytes);
SIGUSR1 rotates it — it reopens the path when something else already moved the
file away (logrotate's ``create`` + ``postrotate kill -USR1``), else it renames
the file to ``PATH.1`` (older ones to ``.2``, ``.3`` …) and starts a new one, as
twistd's own log file does. There is no rotation by size (twistd's default of
1 MB is off): rotate with logrotate or SIGUSR1.
"""

from __future__ import annotations

import os
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

from .accesslog import write_batches_raw

log = Logger()


class AppendLogFile(LogFile):
    """A ``LogFile`` in append mode, never rotated by size; :meth:`rotate` for SIGUSR1."""

    def __init__(self, name: str, directory: str, defaultMode: int | None = None,
                 maxRotatedFiles: int | None = None) -> None:
        super().__init__(name, directory, rotateLength=None, defaultMode=defaultMode,
                         maxRotatedFiles=maxRotatedFiles)

    def _openFile(self) -> None:
        self.closed = False
        self._file = open(self.path, "ab", 0)  # O_APPEND: every write goes to the end of the file as it is now
        if self.defaultMode is not None:
            try:
                os.chmod(self.path, self.defaultMode)
            except OSError:
                pass
        self.size = self._file.tell()

    def moved_away(self) -> bool:
        """True when the path no longer names the file being written (renamed or removed)."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return True
        own = os.fstat(self._file.fileno())
        return (on_disk.st_dev, on_disk.st_ino) != (own.st_dev, own.st_ino)

    def rotate(self) -> None:
        """Reopen the path if the file was moved away, else rename it to ``PATH.1`` and start anew."""
        if self.moved_away():
            self.reopen()
        else:
            super().rotate()


def open_log_file(path: str) -> AppendLogFile:
    return AppendLogFile.fromFullPath(path)


class TwistdLogFile:
    """twistd's ``--logfile``, replaced by an :class:`AppendLogFile` at the same path (see
    :func:`filter_twistd_logging`); :meth:`rotate` is the SIGUSR1 handler's."""

    def __init__(self) -> None:
        self.file: AppendLogFile | None = None

    def adopt(self, observer: Any) -> Any:
        """``observer``, or a text observer on an :class:`AppendLogFile` in place of twistd's file."""
        out = getattr(observer, "_outFile", None)  # FileLogObserver keeps no public handle on its file
        if not isinstance(out, LogFile) or isinstance(out, AppendLogFile):
            return observer
        out.close()
        self.file = AppendLogFile.fromFullPath(out.path, defaultMode=out.defaultMode)
        return textFileLogObserver(self.file)

    def rotate(self) -> None:
        if self.file is None:
            log.info("received SIGUSR1: twistd logs to stdout or syslog here; nothing to rotate")
        else:
            self.file.rotate()


def level_filter(observer: ILogObserver, level: str) -> ILogObserver:
    """``observer`` seeing only events at ``level`` or above."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(observer, [predicate])


def level_observer(stream: IO[str], level: str) -> ILogObserver:
    """Text lines to ``stream``, filtered by ``level`` (the CLI's observer)."""
    return level_filter(write_batches_raw(textFileLogObserver(stream)), level)


def filter_twistd_logging(level: str) -> TwistdLogFile:
    """Make twistd's observers honour ``level``, and its log file append and rotate as ours.

    twistd begins logging (to its logfile or stdout) *after* the plugin's
    ``makeService`` ran, and offers no hook for a level; so the observers it
    hands to ``globalLogBeginner.beginLoggingTo`` are wrapped on the way in
    (and its text observer — logfile or stdout — learns to write access-log
    batches as they are). Its logfile observer is replaced by one on an
    :class:`AppendLogFile` at the same path (twistd's ``LogFile`` writes at its
    own offset, and rotates by size), kept in the returned
    :class:`TwistdLogFile` for SIGUSR1. Only ever called in a twistd process,
    once, before logging begins.
    """
    begin = globalLogBeginner.beginLoggingTo
    twistd_log = TwistdLogFile()

    def filtered(observers: Any, *args: Any, **kwargs: Any) -> Any:
        return begin([level_filter(write_batches_raw(twistd_log.adopt(o)), level) for o in observers],
                     *args, **kwargs)

    globalLogBeginner.beginLoggingTo = filtered  # type: ignore[method-assign]
    return twistd_log
