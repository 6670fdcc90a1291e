"""Log observers filtered by ``log_level``, for the CLI and for twistd.

Both also write the access log's batches as they are
(:func:`rolemesh_node.accesslog.write_batches_raw`).
"""

from __future__ import annotations

from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from .accesslog import write_batches_raw


def level_filter(observer: ILogObserver, level: str) -> ILogObserver:
    """``observer`` seeing only events at ``level`` or above."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(observer, [predicate])


def level_observer(stream: IO[str], level: str) -> ILogObserver:
    """Text lines to ``stream``, filtered by ``level`` (the CLI's observer)."""
    return level_filter(write_batches_raw(textFileLogObserver(stream)), level)


def filter_twistd_logging(level: str) -> None:
    """Make twistd's observers honour ``level``.

    twistd begins logging (to its logfile or stdout) *after* the plugin's
    ``makeService`` ran, and offers no hook for a level; so the observers it
    hands to ``globalLogBeginner.beginLoggingTo`` are wrapped on the way in
    (and its text observer — logfile or stdout — learns to write access-log
    batches as they are). Only ever called in a twistd process, once, before
    logging begins.
    """
    begin = globalLogBeginner.beginLoggingTo

    def filtered(observers: Any, *args: Any, **kwargs: Any) -> Any:
        return begin([level_filter(write_batches_raw(o), level) for o in observers], *args, **kwargs)

    globalLogBeginner.beginLoggingTo = filtered  # type: ignore[method-assign]
