"""The node's identity: ``node_id`` from config, else generated once and kept.

A generated id is ``<hostname>-<8 hex>`` and lives in ``<state_dir>/node_id`` so
that it survives restarts (the dispatcher keys its records on it). The state
directory defaults to ``$XDG_STATE_HOME/rolemesh-node`` (``~/.local/state/…``),
or ``/var/lib/rolemesh-node`` when running as root. Read once at start.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

from .config import NodeConfig


def default_state_dir() -> Path:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/rolemesh-node")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "rolemesh-node"


def state_dir(config: NodeConfig) -> Path:
    return config.state_dir if config.state_dir is not None else default_state_dir()


def node_id(config: NodeConfig) -> str:
    """The configured id, or the one kept in the state directory (made on first use)."""
    if config.node_id:
        return config.node_id
    directory = state_dir(config)
    path = directory / "node_id"
    try:
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
    except OSError:
        pass
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname() or "node")[:64]
    new = f"{host}-{secrets.token_hex(4)}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(new + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # not persisted: the caller logs the id it got; a restart makes a new one
    return new
