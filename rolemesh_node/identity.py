"""The node's identity: ``node_id`` from config, else generated once and kept.

A generated id is ``<hostname>-<8 hex>`` and lives in ``<state_dir>/node_id`` so
that it survives restarts (the dispatcher keys its records on it). The state
directory defaults to ``$XDG_STATE_HOME/rolemesh-node`` (``~/.local/state/…``),
or ``/var/lib/rolemesh-node`` when running as root. Read once at start.

An id that can neither be read from nor written to the state directory is a
config error (the node refuses to start, exit 2): a node that took a new id on
every start would show up at the dispatcher as a new node each time. A
read-only state directory that already holds the id is fine.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

from .config import ConfigError, NodeConfig


def default_state_dir() -> Path:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/rolemesh-node")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "rolemesh-node"


def state_dir(config: NodeConfig) -> Path:
    return config.state_dir if config.state_dir is not None else default_state_dir()


def node_id(config: NodeConfig) -> str:
    """The configured id, or the one kept in the state directory (made on first use).

    Raises :class:`ConfigError` (``state_dir``) when no id is configured and
    none can be read from or written to the state directory."""
    if config.node_id:
        return config.node_id
    directory = state_dir(config)
    path = directory / "node_id"
    try:
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
    except (FileNotFoundError, NotADirectoryError):
        pass  # not made yet
    except OSError as exc:
        raise _unusable(config, directory, f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname() or "node")[:64]
    new = f"{host}-{secrets.token_hex(4)}"
    tmp = path.with_suffix(".tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.write_text(new + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise _unusable(config, directory, f"cannot write {path}: {exc.strerror or type(exc).__name__}") from None
    return new


def _unusable(config: NodeConfig, directory: Path, why: str) -> ConfigError:
    key = "state_dir" if config.state_dir is not None else f"state_dir (default {directory})"
    return ConfigError(config.source, key, f"{why}; the generated node_id could not be kept, so it would change "
                       "on every start: make the directory writable, or set node_id (or ROLEMESH_NODE_ID)")
