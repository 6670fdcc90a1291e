"""``rolemesh-node-agent --check-config FILE``: validate a config without running the node.

It does what the node does with the file before anything starts — parse, validate, apply the environment
overrides, read the files the config names — and nothing more: no port, no reactor, no child, no device.

The config is often checked where it is written (a CI job checking a Kubernetes ConfigMap), not where it runs.
Files that exist only on the node — the API key file, the dispatcher token file, the model files, a
``llama_server_bin`` given as a path — are checked when present and listed as *not checked here* when absent.
A present file is checked as the node would use it: key and token files are read (the same code as at start,
so the same errors), a model file must be a readable GGUF file (the node itself would start and report the
model unavailable or fail to load it; a check should say so at once), ``llama_server_bin`` must be executable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .auth import load_api_keys
from .childlog import check_log_dir
from .config import ConfigError, NodeConfig, env_overrides, load_config

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class CheckReport:
    """A config that passed: which keys came from the environment, which files were not checked here."""

    config: NodeConfig
    from_env: tuple[tuple[str, str], ...]  # (key, environment variable)
    not_checked: tuple[tuple[str, Path], ...]  # (key path, absent file)

    def lines(self) -> list[str]:
        """What ``--check-config`` prints on stdout, one ``FILE: …`` line each."""
        source = self.config.source
        out = [f"{source}: config ok"]
        out += [f"{source}: {key}: from environment variable {var}" for key, var in self.from_env]
        out += [f"{source}: {key}: not checked here: {path} is absent" for key, path in self.not_checked]
        return out


def check_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> CheckReport:
    """Validate the config at ``path`` (raises :class:`ConfigError`, like the node at start)."""
    environ = os.environ if environ is None else environ
    config = load_config(path, environ)
    absent: list[tuple[str, Path]] = []
    if config.api_key_file is not None:
        if _present(config.api_key_file):
            load_api_keys(config)
        else:
            absent.append(("api_key_file", config.api_key_file))
    if config.dispatcher_token_file is not None:
        if _present(config.dispatcher_token_file):
            from .dispatcher import read_token  # where the node reads it; imported only when needed

            read_token(config)
        else:
            absent.append(("dispatcher_token_file", config.dispatcher_token_file))
    if config.llama_server_bin is not None and os.sep in config.llama_server_bin:
        binary = Path(config.llama_server_bin)
        if not _present(binary):
            absent.append(("llama_server_bin", binary))
        elif not (binary.is_file() and os.access(binary, os.X_OK)):
            raise ConfigError(config.source, "llama_server_bin", f"{binary} is not an executable file")
    if config.log_dir is not None:
        if _present(config.log_dir):
            problem = check_log_dir(config.log_dir)
            if problem is not None:
                raise ConfigError(config.source, "log_dir", problem)
        else:
            absent.append(("log_dir", config.log_dir))  # the node makes it
    for name, spec in config.models.items():
        key = f"models.{name}.path"
        if _present(spec.path):
            _check_model_file(config.source, key, spec.path)
        else:
            absent.append((key, spec.path))
    return CheckReport(config=config, from_env=tuple(env_overrides(environ).items()), not_checked=tuple(absent))


def _present(path: Path) -> bool:
    """There is something at ``path`` (a dangling link counts: it is broken here, not absent)."""
    return os.path.lexists(path)


def _check_model_file(source: str, key: str, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except IsADirectoryError:
        raise ConfigError(source, key, f"{path} is a directory, not a GGUF file") from None
    except OSError as exc:
        raise ConfigError(source, key, f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if magic != GGUF_MAGIC:
        raise ConfigError(source, key, f"{path} is not a GGUF file (it does not start with 'GGUF')")
