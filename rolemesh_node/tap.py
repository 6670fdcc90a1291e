"""``twistd rolemesh-node``: options and ``makeService`` for the twistd plugin.

A bad config stops twistd before it daemonizes, with exit code 2 and the one
line ``config error: FILE: key.path: problem`` on stderr. Signals as for the
CLI (:mod:`rolemesh_node.signals`): SIGTERM drains and stops, SIGHUP reloads,
SIGUSR1 rotates twistd's ``--logfile`` (appended to, never rotated by size:
:mod:`rolemesh_node.logs`).
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from .config import ConfigError, load_config


class Options(usage.Options):
    synopsis = "--config PATH"
    longdesc = "Run the RoleMesh Node Agent (see docs/operations.md)."
    optParameters = [["config", "c", None, "Path to the node's YAML config file (required)."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config PATH is required")
        try:
            self.node_config = load_config(self["config"])
        except ConfigError as exc:
            sys.stderr.write(f"{exc}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None
        from .tls import skip_tls_unless_needed

        skip_tls_unless_needed(self.node_config)


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    from .logs import filter_twistd_logging
    from .memory import release_once_discovered
    from .service import makeService as make
    from .signals import install_signal_handlers

    twistd_log = filter_twistd_logging(options.node_config.log_level)
    try:
        service = make(options.node_config)  # reads the dispatcher token file
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    # Exit 0 after a clean stop on SIGTERM/SIGINT (twistd would re-raise the signal); HUP, USR1.
    reactor.callWhenRunning(install_signal_handlers, reactor, service, twistd_log.rotate)
    # twistd starts the service before the reactor runs; what its start-up freed goes back (rolemesh_node.memory)
    reactor.callWhenRunning(release_once_discovered, service)
    return service
