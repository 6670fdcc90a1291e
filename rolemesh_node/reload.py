"""Config reload: validate the new file fully, classify every change, say what to do.

``SIGHUP`` and ``POST /v1/node/reload`` call :meth:`ConfigStore.load` (the very
loader of the start, environment overrides included, plus what the start reads
besides the YAML: the key file, the token file, the ``llama-server`` binary).
An invalid file changes nothing. A valid one is compared with the running config
by :func:`diff`, a pure function: every key has one class in :data:`KEY_CLASSES`
(the table in ``docs/configuration.md``), every model is added, removed,
restarted or updated. :func:`effective` is the config the node then runs with —
the new one, except the keys that need a restart, which keep their running
value. :meth:`rolemesh_node.service.NodeService.reload` applies it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .auth import load_api_keys
from .config import ConfigError, ModelSpec, NodeConfig, load_config
from .dispatcher import read_token
from .llama_server import LlamaServerNotFound, find_llama_server

#: a key's class: what a change of it does to the running node
LIVE = "live"  # applies at once, or to the next request, connection, start or stop
CHILDREN = "children"  # the children restart, after their requests in flight, one device at a time
DISPATCHER = "dispatcher"  # the dispatcher link takes it at once (and registers again where it must)
RESTART = "needs_restart"  # only a restart of the agent changes it: the running value is kept

KEY_CLASSES: Mapping[str, str] = {
    "node_id": DISPATCHER,
    "listen_host": RESTART,
    "listen_port": RESTART,
    "advertise_url": DISPATCHER,
    "state_dir": RESTART,
    "log_level": RESTART,
    "backend": RESTART,
    "devices": RESTART,
    "cpu_devices": RESTART,
    "metrics_interval_s": LIVE,
    "device_tool_timeout_s": RESTART,
    "llama_server_bin": CHILDREN,
    "llama_server_startup_timeout_s": LIVE,
    "llama_server_probe_interval_s": LIVE,
    "llama_server_stop_grace_s": LIVE,
    "llama_server_parallel": CHILDREN,
    "llama_server_extra_args": CHILDREN,
    "crash_limit": LIVE,
    "crash_window_s": LIVE,
    "crash_cooldown_s": LIVE,
    "api_keys": LIVE,
    "api_key_file": LIVE,
    "max_client_connections": LIVE,
    "header_read_timeout_s": LIVE,
    "client_idle_timeout_s": LIVE,
    "body_read_timeout_s": LIVE,
    "access_log": RESTART,
    "child_log_lines": RESTART,  # each device's ring and log file are made at discovery
    "log_dir": RESTART,
    "child_log_max_bytes": RESTART,
    "child_log_backups": RESTART,
    "max_pending_requests_per_device": LIVE,
    "max_concurrent_requests_per_device": LIVE,
    "max_request_body_bytes": LIVE,
    "request_timeout_s": LIVE,
    "liveness_interval_s": LIVE,  # from the next child started (its liveness check is made then)
    "liveness_timeout_s": LIVE,
    "max_switch_wait_s": LIVE,
    "drain_timeout_s": LIVE,
    "dispatcher_base_url": DISPATCHER,
    "dispatcher_token": DISPATCHER,
    "dispatcher_token_file": DISPATCHER,
    "heartbeat_interval_s": DISPATCHER,
    "dispatcher_timeout_s": DISPATCHER,
}

#: a model whose change of one of these restarts its children (they are on its command line)
MODEL_RESTART_KEYS = ("path", "args", "ctx_size", "embedding")


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What changed between two configs, by class (key names, sorted)."""

    live: tuple[str, ...] = ()
    children: tuple[str, ...] = ()
    dispatcher: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()
    models_added: tuple[str, ...] = ()
    models_removed: tuple[str, ...] = ()
    models_restarted: tuple[str, ...] = ()  # path, args, ctx_size or embedding changed
    models_updated: tuple[str, ...] = ()  # aliases or ttl_s only: at once

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in dataclasses.fields(self))

    @property
    def models_changed(self) -> bool:
        return bool(self.models_added or self.models_removed or self.models_restarted or self.models_updated)

    def to_json(self) -> dict[str, Any]:
        return {
            "applied": list(self.live),
            "children_restarted": list(self.children),
            "dispatcher": list(self.dispatcher),
            "needs_restart": list(self.needs_restart),
            "models": {"added": list(self.models_added), "removed": list(self.models_removed),
                       "restarted": list(self.models_restarted), "updated": list(self.models_updated)},
        }


def _model_change(old: ModelSpec, new: ModelSpec) -> str | None:
    if any(getattr(old, key) != getattr(new, key) for key in MODEL_RESTART_KEYS):
        return "restarted"
    if old != new:
        return "updated"
    return None


def diff(old: NodeConfig, new: NodeConfig) -> ConfigDiff:
    """Every difference between ``old`` and ``new``, classified (pure)."""
    by_class: dict[str, list[str]] = {LIVE: [], CHILDREN: [], DISPATCHER: [], RESTART: []}
    for key, cls in KEY_CLASSES.items():
        if getattr(old, key) != getattr(new, key):
            by_class[cls].append(key)
    added = [name for name in new.models if name not in old.models]
    removed = [name for name in old.models if name not in new.models]
    restarted, updated = [], []
    for name in new.models:
        if name in old.models:
            change = _model_change(old.models[name], new.models[name])
            if change == "restarted":
                restarted.append(name)
            elif change == "updated":
                updated.append(name)
    return ConfigDiff(
        live=tuple(sorted(by_class[LIVE])), children=tuple(sorted(by_class[CHILDREN])),
        dispatcher=tuple(sorted(by_class[DISPATCHER])), needs_restart=tuple(sorted(by_class[RESTART])),
        models_added=tuple(added), models_removed=tuple(removed), models_restarted=tuple(restarted),
        models_updated=tuple(updated))


def effective(old: NodeConfig, new: NodeConfig, changes: ConfigDiff) -> NodeConfig:
    """``new``, with the running value of every key that needs a restart."""
    return dataclasses.replace(new, **{key: getattr(old, key) for key in changes.needs_restart})


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of one reload: ``applied``, ``unchanged`` or ``rejected`` (with the error)."""

    result: str
    source: str
    error: str | None = None
    changes: ConfigDiff = field(default_factory=ConfigDiff)

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "source": self.source, "error": self.error, **self.changes.to_json()}


def rejected_line(error: ConfigError) -> str:
    """The one log line of a rejected reload: ``config reload rejected: FILE: key.path: problem``."""
    return f"config reload rejected: {error.file}: {error.path}: {error.problem}"


class ConfigStore:
    """The running config and the file it came from; :meth:`load` reads and checks the file again."""

    def __init__(self, config: NodeConfig, environ: Mapping[str, str] | None = None) -> None:
        self.current = config
        self.environ = environ
        # the start's working directory is where a relative path meant something
        self.path = None if config.source.startswith("<") else os.path.abspath(config.source)

    def load(self) -> NodeConfig:
        """The file's config, validated as at a start; raises :class:`ConfigError`."""
        if self.path is None:
            raise ConfigError(self.current.source, "(file)", "this node was not started from a config file")
        new = load_config(self.path, self.environ)
        _check_files(new, self.current)
        return new


def _check_files(new: NodeConfig, old: NodeConfig) -> None:
    """What a start reads besides the YAML: the key file, the token file, a changed ``llama_server_bin``."""
    load_api_keys(new)
    read_token(new)
    if new.llama_server_bin != old.llama_server_bin:
        try:
            find_llama_server(new.llama_server_bin)
        except LlamaServerNotFound as exc:
            raise ConfigError(new.source, "llama_server_bin", str(exc)) from None
