"""YAML configuration → typed, frozen objects, validated at start.

Every problem is reported as one :class:`ConfigError` whose ``str()`` is the
single line operators see::

    config error: FILE: key.path: problem

The loader walks the YAML node tree itself (rather than trusting
``yaml.safe_load``) so that a duplicated key — which PyYAML would silently
merge — is an error that names where it stands.

A few keys that differ from host to host while the file is shared (a
Kubernetes ConfigMap, a Nomad template) can be overridden by environment
variables (:data:`ENV_OVERRIDES`); :func:`load_config` applies them.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

import yaml

BACKENDS = ("auto", "cpu", "cuda", "rocm", "vulkan", "sycl", "metal")

# Flags that the agent owns on every child: an operator's model ``args`` may
# not set them (the host in particular is always 127.0.0.1).
RESERVED_CHILD_FLAGS = frozenset(
    {"--host", "--port", "-m", "--model", "-np", "--parallel", "--alias", "-a",
     "-c", "--ctx-size", "--embeddings", "--embedding"}
)


#: Environment variable -> the key it overrides. Only keys whose value is a
#: string, and only those that are one host's own (its name, its address): a
#: file shared by a fleet cannot hold them. The variable wins over the file.
ENV_OVERRIDES: Mapping[str, str] = MappingProxyType({
    "ROLEMESH_NODE_ID": "node_id",
    "ROLEMESH_ADVERTISE_URL": "advertise_url",
})


class ConfigError(Exception):
    """A configuration problem: ``config error: FILE: key.path: problem``."""

    def __init__(self, file: str, path: str, problem: str) -> None:
        super().__init__(file, path, problem)
        self.file = file
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"config error: {self.file}: {self.path}: {self.problem}"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model the node may serve."""

    name: str
    path: Path
    ctx_size: int | None = None
    args: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    embedding: bool = False
    ttl_s: float | None = None

    def available(self) -> bool:
        """True when the GGUF file is there and readable (checked on demand)."""
        return self.path.is_file() and os.access(self.path, os.R_OK)

    def size_bytes(self) -> int | None:
        try:
            return self.path.stat().st_size
        except OSError:
            return None


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The whole node configuration. Defaults are the documented ones."""

    source: str = "<defaults>"
    node_id: str | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 8088
    advertise_url: str | None = None
    state_dir: Path | None = None
    log_level: str = "info"
    # child output: a ring per device (lines), and files under log_dir rotated by size
    log_dir: Path | None = None
    child_log_lines: int = 2000
    child_log_max_bytes: int = 10 * 1024 * 1024
    child_log_backups: int = 5
    # devices
    backend: str = "auto"
    devices: tuple[int, ...] | None = None  # None = all
    cpu_devices: int = 1
    metrics_interval_s: float = 5.0
    device_tool_timeout_s: float = 10.0
    # llama-server children
    llama_server_bin: str | None = None
    llama_server_startup_timeout_s: float = 30.0
    llama_server_probe_interval_s: float = 0.5
    llama_server_stop_grace_s: float = 10.0
    llama_server_parallel: int = 1
    llama_server_extra_args: tuple[str, ...] = ()
    crash_limit: int = 3
    crash_window_s: float = 60.0
    crash_cooldown_s: float = 300.0
    # inbound auth and limits
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_key_file: Path | None = None
    max_client_connections: int = 1024
    header_read_timeout_s: float = 30.0
    body_read_timeout_s: float = 60.0
    client_idle_timeout_s: float = 120.0
    access_log: bool = True
    # request path
    # None: derived (see __post_init__): llama_server_parallel + 1 in flight,
    # one more place to wait. Derived once: dataclasses.replace() keeps the
    # values derived before (pass None to derive them again).
    max_pending_requests_per_device: int = None  # type: ignore[assignment]
    max_concurrent_requests_per_device: int = None  # type: ignore[assignment]
    max_request_body_bytes: int = 10 * 1024 * 1024
    request_timeout_s: float = 600.0
    # liveness of a child with work in flight (liveness.py): /health every
    # liveness_interval_s, answered within liveness_timeout_s
    liveness_interval_s: float = 5.0
    liveness_timeout_s: float = 3.0
    # scheduling: how long requests for a model no device holds may wait before a
    # busy device switches to it; None derives it from the measured switch cost
    # (scheduler.SwitchPolicy: 5 x the switch, within 1..60 s)
    max_switch_wait_s: float | None = None
    # stopping: how long requests in flight and waiting may take to finish
    # before the rest are ended (docs/operations.md, "Stopping")
    drain_timeout_s: float = 30.0
    # dispatcher
    dispatcher_base_url: str | None = None
    dispatcher_token: str | None = field(default=None, repr=False)
    dispatcher_token_file: Path | None = None
    heartbeat_interval_s: float = 10.0
    dispatcher_timeout_s: float = 5.0
    # models
    models: Mapping[str, ModelSpec] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        concurrent, pending = self.max_concurrent_requests_per_device, self.max_pending_requests_per_device
        if concurrent is None:
            # One request runs in each of the child's slots and one more waits
            # inside the child, so it never idles between two (docs/performance.md).
            concurrent = self.llama_server_parallel + 1
            if pending is not None:
                concurrent = min(concurrent, pending)
        if pending is None:
            pending = max(2, concurrent + 1)
        if concurrent > pending:  # parse_config reports it as a config error first
            raise ValueError(f"max_concurrent_requests_per_device ({concurrent}) exceeds "
                             f"max_pending_requests_per_device ({pending})")
        object.__setattr__(self, "max_concurrent_requests_per_device", concurrent)
        object.__setattr__(self, "max_pending_requests_per_device", pending)

    def resolve_model(self, name: str) -> ModelSpec | None:
        """The model called ``name``, directly or through an alias."""
        spec = self.models.get(name)
        if spec is not None:
            return spec
        for spec in self.models.values():
            if name in spec.aliases:
                return spec
        return None


# --------------------------------------------------------------------------
# validation helpers: each takes (value, path) and raises _Bad on a problem


class _Bad(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(path, f"expected a non-empty string, got {_type_name(value)}")
    return value


def _opt_str(value: Any, path: str) -> str | None:
    return None if value is None else _str(value, path)


def _int(value: Any, path: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(path, f"expected an integer, got {_type_name(value)}")
    if lo is not None and value < lo:
        raise _Bad(path, f"must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise _Bad(path, f"must be at most {hi}, got {value}")
    return value


def _positive_float(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(path, f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value) or value <= 0:
        raise _Bad(path, f"must be a positive number of seconds, got {value}")
    return float(value)


def _opt_seconds(value: Any, path: str) -> float | None:
    """null, or a number of seconds >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(path, f"expected a number of seconds or null, got {_type_name(value)}")
    if not math.isfinite(value) or value < 0:
        raise _Bad(path, f"must be a number of seconds >= 0, got {value}")
    return float(value)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(path, f"expected true or false, got {_type_name(value)}")
    return value


def _str_list(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Bad(path, f"expected a list of strings, got {_type_name(value)}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)  # args such as ["-ngl", 99] are common and harmless
        out.append(_str(item, f"{path}[{i}]"))
    return tuple(out)


_HOST_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def _is_http_url(text: str) -> bool:
    """``http(s)://host[:port][/path]`` with a host name or IP literal and a valid port.

    Catches what an unexpanded template leaves behind (``http://$(POD_IP):8088``)
    and an IPv6 address without brackets."""
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        return False
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        return False
    if ":" in host:  # only an IPv6 literal in brackets gets here
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return False
        return True
    return set(host) <= _HOST_CHARS


def _without_userinfo(text: str) -> str:
    """``text`` with any ``user:password@`` replaced (config errors are printed)."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if "@" not in parts.netloc:
        return text
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _url(value: Any, path: str) -> str | None:
    if value is None:
        return None
    text = _str(value, path).rstrip("/")
    if not _is_http_url(text):
        raise _Bad(path, f"expected an http:// or https:// URL, got {_without_userinfo(str(value))!r}")
    return text


def _child_args(value: Any, path: str) -> tuple[str, ...]:
    args = _str_list(value, path)
    for i, arg in enumerate(args):
        flag = arg.split("=", 1)[0]
        if flag in RESERVED_CHILD_FLAGS:
            raise _Bad(f"{path}[{i}]", f"{flag} is set by the agent and may not be given here")
    return args


def _api_keys(value: Any, path: str) -> tuple[str, ...]:
    keys = _str_list(value, path)
    for i, key in enumerate(keys):
        if len(key) < 16 or any(c.isspace() for c in key):
            # the problem names the index, never the key (config errors are printed)
            raise _Bad(f"{path}[{i}]", "an API key must be at least 16 characters without white space")
    return keys


def _devices(value: Any, path: str) -> tuple[int, ...] | None:
    if value == "all" or value is None:
        return None
    if not isinstance(value, list) or not value:
        raise _Bad(path, "expected 'all' or a non-empty list of device indices")
    indices = tuple(_int(v, f"{path}[{i}]", lo=0) for i, v in enumerate(value))
    if len(set(indices)) != len(indices):
        raise _Bad(path, "a device index is listed twice")
    return indices


LOG_LEVELS = ("debug", "info", "warn", "error")


def _log_level(value: Any, path: str) -> str:
    text = _str(value, path)
    if text not in LOG_LEVELS:
        raise _Bad(path, f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text


def _backend(value: Any, path: str) -> str:
    text = _str(value, path)
    if text not in BACKENDS:
        raise _Bad(path, f"unknown backend {text!r}; expected one of {', '.join(BACKENDS)}")
    return text


def _opt_path(base: Path) -> Callable[[Any, str], Path | None]:
    def convert(value: Any, path: str) -> Path | None:
        if value is None:
            return None
        return _resolve(base, _str(value, path))
    return convert


def _resolve(base: Path, text: str) -> Path:
    p = Path(os.path.expanduser(text))
    return p if p.is_absolute() else base / p


_NODE_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def _node_id(value: Any, path: str) -> str | None:
    if value is None:
        return None
    text = _str(value, path)
    if len(text) > 128 or not set(text) <= _NODE_ID_CHARS:
        raise _Bad(path, "expected up to 128 characters of letters, digits, '-', '_', '.', ':'")
    return text


def _model(name: str, value: Any, path: str, base: Path) -> ModelSpec:
    if not isinstance(value, dict):
        raise _Bad(path, f"expected a mapping with at least 'path', got {_type_name(value)}")
    known = {"path", "ctx_size", "args", "aliases", "embedding", "ttl_s"}
    for key in value:
        if key not in known:
            raise _Bad(f"{path}.{key}", f"unknown key; expected one of {', '.join(sorted(known))}")
    if "path" not in value:
        raise _Bad(f"{path}.path", "missing (the GGUF file of this model)")
    ctx = value.get("ctx_size")
    ttl = value.get("ttl_s")
    return ModelSpec(
        name=name,
        path=_resolve(base, _str(value["path"], f"{path}.path")),
        ctx_size=None if ctx is None else _int(ctx, f"{path}.ctx_size", lo=16),
        args=_child_args(value.get("args", []), f"{path}.args"),
        aliases=_str_list(value.get("aliases", []), f"{path}.aliases"),
        embedding=_bool(value.get("embedding", False), f"{path}.embedding"),
        ttl_s=None if ttl is None else _positive_float(ttl, f"{path}.ttl_s"),
    )


def _models(value: Any, path: str, base: Path) -> dict[str, ModelSpec]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(path, f"expected a mapping of model name to spec, got {_type_name(value)}")
    models: dict[str, ModelSpec] = {}
    taken: dict[str, str] = {}
    for name, spec in value.items():
        if not isinstance(name, str) or not name.strip():
            raise _Bad(f"{path}.{name}", "a model name must be a non-empty string")
        models[name] = _model(name, spec, f"{path}.{name}", base)
        for label in (name, *models[name].aliases):
            if label in taken and taken[label] != name:
                raise _Bad(f"{path}.{name}", f"name or alias {label!r} is already used by model {taken[label]!r}")
            taken[label] = name
    return models


# key → converter; the converter gets (value, key path)
def _fields(base: Path) -> dict[str, Callable[[Any, str], Any]]:
    return {
        "node_id": _node_id,
        "listen_host": _str,
        "listen_port": lambda v, p: _int(v, p, lo=0, hi=65535),
        "advertise_url": _url,
        "state_dir": _opt_path(base),
        "log_level": _log_level,
        "log_dir": _opt_path(base),
        "child_log_lines": lambda v, p: _int(v, p, lo=10, hi=1_000_000),
        "child_log_max_bytes": lambda v, p: _int(v, p, lo=4096),
        "child_log_backups": lambda v, p: _int(v, p, lo=0, hi=1000),
        "backend": _backend,
        "devices": _devices,
        "cpu_devices": lambda v, p: _int(v, p, lo=1, hi=64),
        "metrics_interval_s": _positive_float,
        "device_tool_timeout_s": _positive_float,
        "llama_server_bin": _opt_str,
        "llama_server_startup_timeout_s": _positive_float,
        "llama_server_probe_interval_s": _positive_float,
        "llama_server_stop_grace_s": _positive_float,
        "llama_server_parallel": lambda v, p: _int(v, p, lo=1, hi=256),
        "llama_server_extra_args": _child_args,
        "crash_limit": lambda v, p: _int(v, p, lo=1),
        "crash_window_s": _positive_float,
        "crash_cooldown_s": _positive_float,
        "api_keys": _api_keys,
        "api_key_file": _opt_path(base),
        "max_client_connections": lambda v, p: _int(v, p, lo=1),
        "header_read_timeout_s": _positive_float,
        "body_read_timeout_s": _positive_float,
        "client_idle_timeout_s": _positive_float,
        "access_log": _bool,
        "max_pending_requests_per_device": lambda v, p: _int(v, p, lo=1),
        "max_concurrent_requests_per_device": lambda v, p: _int(v, p, lo=1),
        "max_request_body_bytes": lambda v, p: _int(v, p, lo=1024),
        "request_timeout_s": _positive_float,
        "liveness_interval_s": _positive_float,
        "liveness_timeout_s": _positive_float,
        "max_switch_wait_s": _opt_seconds,
        "drain_timeout_s": _positive_float,
        "dispatcher_base_url": _url,
        "dispatcher_token": _opt_str,
        "dispatcher_token_file": _opt_path(base),
        "heartbeat_interval_s": _positive_float,
        "dispatcher_timeout_s": _positive_float,
        "models": lambda v, p: _models(v, p, base),
    }


# --------------------------------------------------------------------------
# YAML


def _check_duplicates(node: yaml.Node, path: str) -> None:
    """Raise _Bad for a key that appears twice in any mapping under ``node``."""
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            child = f"{path}.{key}" if path else str(key)
            if key in seen:
                raise _Bad(child, f"duplicate key (line {key_node.start_mark.line + 1}); "
                                  "each key may appear once")
            seen.add(key)
            _check_duplicates(value_node, child)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]")


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """The keys that ``environ`` overrides: ``{key: variable}`` (see :data:`ENV_OVERRIDES`)."""
    return {key: var for var, key in ENV_OVERRIDES.items() if var in environ}


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None,
                 environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Parse and validate YAML text. Relative paths resolve against ``base_dir``.

    ``environ`` (none by default: the text alone decides) supplies the
    :data:`ENV_OVERRIDES`; a variable that is set replaces the key's value
    from the text, which must be valid all the same."""
    base = base_dir if base_dir is not None else Path.cwd()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _check_duplicates(root, "")
        data = yaml.safe_load(text)
    except _Bad as bad:
        raise ConfigError(source, bad.path, bad.problem) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(document)"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(source, where, f"invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, "(document)", f"expected a mapping of settings, got {_type_name(data)}")
    fields = _fields(base)
    values: dict[str, Any] = {}
    try:
        for key, value in data.items():
            if not isinstance(key, str) or key not in fields:
                raise _Bad(str(key), "unknown key (see docs/configuration.md)")
            values[key] = fields[key](value, key)
        overrides = environ if environ is not None else {}
        for key, var in env_overrides(overrides).items():
            values[key] = _from_env(fields[key], key, var, overrides[var])
        if values.get("dispatcher_token") and values.get("dispatcher_token_file"):
            raise _Bad("dispatcher_token_file", "give dispatcher_token or dispatcher_token_file, not both")
        defaults = NodeConfig()
        probe = values.get("llama_server_probe_interval_s", defaults.llama_server_probe_interval_s)
        startup = values.get("llama_server_startup_timeout_s", defaults.llama_server_startup_timeout_s)
        if probe >= startup:
            raise _Bad("llama_server_probe_interval_s",
                       f"must be shorter than llama_server_startup_timeout_s ({startup})")
        pending = values.get("max_pending_requests_per_device")
        concurrent = values.get("max_concurrent_requests_per_device")
        if pending is not None and concurrent is not None and concurrent > pending:
            raise _Bad("max_concurrent_requests_per_device",
                       f"must not exceed max_pending_requests_per_device ({pending})")
    except _Bad as bad:
        raise ConfigError(source, bad.path, bad.problem) from None
    if "models" in values:
        values["models"] = MappingProxyType(values["models"])  # frozen all the way down
    return NodeConfig(source=source, **values)


def _from_env(convert: Callable[[Any, str], Any], key: str, var: str, value: str) -> Any:
    try:
        return convert(value, key)
    except _Bad as bad:
        raise _Bad(bad.path, f"{bad.problem} (from environment variable {var})") from None


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read, parse and validate the YAML file at ``path``, with the
    :data:`ENV_OVERRIDES` found in ``environ`` (default: ``os.environ``)."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "(file)", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(source, "(file)", "is a directory, not a YAML file") from None
    except PermissionError:
        raise ConfigError(source, "(file)", "permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "(file)", "not UTF-8 text") from None
    return parse_config(text, source, Path(source).resolve().parent,
                        os.environ if environ is None else environ)
