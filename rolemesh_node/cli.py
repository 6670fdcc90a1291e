"""``rolemesh-node-agent``: the node in the foreground, logging to stdout (or ``--logfile``).

It builds the same service as ``twistd rolemesh-node`` directly (no plugin
discovery involved), runs the reactor, and stops cleanly on SIGINT/SIGTERM:
it drains, then every child is stopped and waited for before the process exits
0. SIGHUP reloads the config, SIGUSR1 rotates ``--logfile``
(:mod:`rolemesh_node.signals`).

Exit codes: 0 after a clean stop, 1 when the port cannot be bound, 2 for a
bad command line or config (``config error: FILE: key.path: problem``).

``--check-config FILE`` validates a config and exits (0, or 2 with that one
line) without starting anything: see :mod:`rolemesh_node.checkconfig`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rolemesh-node-agent",
        description="RoleMesh Node Agent: one llama-server per device behind an OpenAI-compatible proxy.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", "-c", metavar="PATH", help="the node's YAML config (docs/configuration.md)")
    what.add_argument("--check-config", metavar="FILE",
                      help="validate FILE as the node would at start, then exit (0: valid, 2: one config error "
                           "line); files absent here (keys, token, models) are listed as not checked")
    what.add_argument("--demo", action="store_true",
                      help="generate two tiny models and run a CPU node on 127.0.0.1 serving them")
    parser.add_argument("--demo-dir", metavar="DIR", default="rolemesh-demo",
                        help="where --demo writes its models and config (default: ./rolemesh-demo)")
    parser.add_argument("--port", type=int, default=8088, help="--demo's port (default: 8088)")
    parser.add_argument("--logfile", metavar="PATH",
                        help="log to PATH (appended to; SIGUSR1 rotates it) instead of stdout")
    parser.add_argument("--version", action="version", version=f"rolemesh-node {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.check_config is not None:
        return _check(args.check_config)
    if args.demo:
        from .demo import banner, prepare

        config_path = prepare(Path(args.demo_dir), args.port)
        print(banner(args.port), flush=True)
    else:
        config_path = args.config  # reported as given
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 2

    from .tls import skip_tls_unless_needed

    skip_tls_unless_needed(config)  # before the reactor is imported

    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError
    from twisted.logger import globalLogBeginner

    from .logs import level_observer, open_log_file
    from .memory import release_once_discovered
    from .service import makeService
    from .signals import install_signal_handlers

    try:
        service = makeService(config, reactor)  # reads the dispatcher token file
    except ConfigError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 2
    try:
        service.startService()
    except CannotListenError as exc:
        print(f"error: cannot listen on {config.listen_host}:{config.listen_port}: {exc.socketError}",
              file=sys.stderr, flush=True)
        service.stopService()
        return 1
    log_file = None
    if args.logfile:
        try:
            log_file = open_log_file(args.logfile)
        except OSError as exc:
            print(f"error: cannot open --logfile {args.logfile}: {exc.strerror}", file=sys.stderr, flush=True)
            service.stopService()
            return 1
    stream = sys.stdout if log_file is None else log_file
    globalLogBeginner.beginLoggingTo([level_observer(stream, config.log_level)], redirectStandardIO=False)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    # After Twisted installed its handlers (SIGCHLD is needed to reap children).
    reactor.callWhenRunning(install_signal_handlers, reactor, service,
                            None if log_file is None else log_file.rotate)
    release_once_discovered(service)  # what the start-up freed goes back to the system (rolemesh_node.memory)
    reactor.run()
    return 0


def _check(path: str) -> int:
    from .checkconfig import check_config

    try:
        report = check_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr, flush=True)
        return 2
    print("\n".join(report.lines()), flush=True)
    return 0


if __name__ == "__main__":  # python -m rolemesh_node.cli
    raise SystemExit(main())
