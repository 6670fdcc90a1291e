"""SIGINT/SIGTERM → one clean stop, for the CLI and the twistd plugin alike.

Twisted's own handlers record the signal, and twistd then re-raises it after
the reactor stopped, so the process "dies" of SIGTERM even after a clean stop,
and a second Ctrl-C while stopping logs a ReactorNotRunning error. These
handlers stop the reactor once (every child is stopped and waited for by the
services' ``stopService``), log a repeated signal, and let the process exit 0.

Installed with ``reactor.callWhenRunning`` so that they replace Twisted's
SIGINT/SIGTERM handlers but leave its SIGCHLD handling (children are reaped
through it) in place.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.logger import Logger

log = Logger()


def install_stop_handlers(reactor: Any) -> None:
    stopping: list[bool] = []

    def stop() -> None:
        if stopping:
            log.info("already stopping; waiting for the children to exit")
            return
        stopping.append(True)
        reactor.stop()

    def handler(signum: int, frame: Any) -> None:
        log.info("received {name}, stopping", name=signal.Signals(signum).name)
        reactor.callFromThread(stop)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
