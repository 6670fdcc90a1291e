"""Log observers filtered by ``log_level``, for the CLI and for twistd."""

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


def level_filter(observer: ILogObserver, level: str) -> ILogObserver:
    """``observer`` seeing only events at ``level`` or above."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(observer, [predicate])


def level_observer(stream: IO[str], level: str) -> ILogObserver:
    """Text lines to ``stream``, filtered by ``level`` (the CLI's observer)."""
    return level_filter(textFileLogObserver(stream), level)


def filter_twistd_logging(level: str) -> None:
    """Make twistd's observers honour ``level``.

    twistd begins logging (to its logfile or stdout) *after* the plugin's
    ``makeService`` ran, and offers no hook for a level; so the observers it
    hands to ``globalLogBeginner.beginLoggingTo`` are wrapped on the way in.
    Only ever called in a twistd process, once, before logging begins.
    """
    begin = globalLogBeginner.beginLoggingTo

    def filtered(observers: Any, *args: Any, **kwargs: Any) -> Any:
        return begin([level_filter(o, level) for o in observers], *args, **kwargs)

    globalLogBeginner.beginLoggingTo = filtered  # type: ignore[method-assign]
