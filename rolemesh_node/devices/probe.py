"""I/O helpers the accelerator backends share: tool runner, environment, threads, logging.

* :data:`Runner` is the shape of :func:`~rolemesh_node.devices.tools.run_tool`;
  every backend takes one as ``run=`` so tests feed recorded outputs.
* :func:`tool_env` is the environment a discovery tool runs with: the agent's
  own, minus every pinning variable, so a stray ``CUDA_VISIBLE_DEVICES`` or
  ``ONEAPI_DEVICE_SELECTOR`` in the agent's environment cannot hide devices
  from discovery (``devices: [..]`` in the config is the way to restrict).
* :func:`in_thread` runs a blocking library call (NVML) on the reactor's thread
  pool, with a timeout.
* :class:`Notes` logs a problem once, not on every metrics tick.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Protocol, Sequence, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from .base import PINNING_VARIABLES, without

T = TypeVar("T")


class Runner(Protocol):
    """``run_tool``'s signature: run ``argv``, fire with stdout or fail with ToolError."""

    def __call__(self, reactor: Any, argv: Sequence[str], timeout_s: float,
                 env: dict[str, str] | None = None) -> Deferred[bytes]: ...


def tool_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a discovery/metrics tool: ``base`` (default the agent's) without pinning."""
    env = without(os.environ if base is None else base, *PINNING_VARIABLES)
    env.setdefault("LC_ALL", "C")
    if extra:
        env.update(extra)
    return env


def in_thread(reactor: Any, fn: Callable[[], T], timeout_s: float) -> Deferred[T]:
    """Run ``fn`` on ``reactor``'s thread pool; fail with TimeoutError after ``timeout_s``.

    A call that outlives its timeout keeps running in its thread (a C library
    call cannot be interrupted); its late result is dropped.
    """
    d: Deferred[T] = deferToThreadPool(reactor, reactor.getThreadPool(), fn)
    d.addTimeout(timeout_s, reactor)
    return d


def describe(error: BaseException | Any) -> str:
    """A one-line description of an error (a Failure's value or an exception)."""
    value = getattr(error, "value", error)
    text = str(value).strip()
    name = type(value).__name__
    if not text:
        return name
    return text if text.startswith(name) or ":" in text[:40] else f"{name}: {text}"


class Notes:
    """Say each problem once: ``warn(key, …)`` logs the first time, ``clear(key)`` re-arms."""

    def __init__(self, log: Logger) -> None:
        self.log = log
        self._said: set[str] = set()

    def info(self, key: str, fmt: str, **fields: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            self.log.info(fmt, **fields)

    def warn(self, key: str, fmt: str, **fields: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            self.log.warn(fmt, **fields)

    def clear(self, key: str) -> None:
        self._said.discard(key)


__all__ = ["Notes", "Runner", "describe", "in_thread", "tool_env"]
