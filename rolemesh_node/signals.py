"""The agent's signals, for the CLI and the twistd plugin alike.

* **SIGTERM, SIGINT**: stop — drain first (:mod:`rolemesh_node.drain`: the
  dispatcher is told, new requests get 503, the requests in flight and waiting
  are served up to ``drain_timeout_s``), then every child is stopped and waited
  for, and the process exits 0. A second one ends the drain at once; later ones
  are logged.
* **SIGHUP**: reload the config file (:meth:`rolemesh_node.service.NodeService.reload`);
  never stops the process.
* **SIGUSR1**: rotate the log file (``--logfile``; twistd's meaning of it); never
  stops the process. Without a log file (stdout, the journal) it is logged and
  ignored.

Twisted's own SIGINT/SIGTERM handlers record the signal, and twistd then
re-raises it after the reactor stopped, so the process "dies" of SIGTERM even
after a clean stop; SIGHUP and SIGUSR1 (unless twistd logs to a file) would
kill the process by default. These handlers replace them. They only hand the
work to the reactor thread (``callFromThread``).

Installed with ``reactor.callWhenRunning`` so that they replace Twisted's
handlers but leave its SIGCHLD handling (children are reaped through it) in
place.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.logger import Logger

log = Logger()


def install_signal_handlers(reactor: Any, service: Any, rotate_log: Callable[[], None] | None = None) -> None:
    """``service`` is the NodeService (``reload()``, ``hurry()``, ``drain``); ``rotate_log``
    rotates the log file (None: there is none)."""
    stops: list[str] = []

    def stop(name: str) -> None:
        stops.append(name)
        if len(stops) == 1:
            log.info("received {name}, stopping (draining first, up to drain_timeout_s)", name=name)
            reactor.stop()
        elif len(stops) == 2 and service.drain.state == service.drain.DRAINING:
            log.info("received {name} again: ending the drain now", name=name)
            service.hurry()
        else:
            log.info("already stopping; waiting for the children to exit")

    def reload() -> None:
        log.info("received SIGHUP, reloading the config")
        try:
            service.reload()
        except Exception:
            log.failure("config reload failed unexpectedly")

    def rotate() -> None:
        if rotate_log is None:
            log.info("received SIGUSR1: the log goes to stdout here; nothing to rotate")
            return
        try:
            rotate_log()
        except Exception:
            log.failure("rotating the log file failed")
        else:
            log.info("received SIGUSR1: log file rotated")

    def on_stop(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop, signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
    signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(rotate))
