"""Crash back-off: a model that keeps dying on a device is refused for a while.

``limit`` failures (crashes or failed starts) of one model within
``window_s`` put that model in cooldown for ``cooldown_s``: requests for it on
that device are refused with the reason, instead of restarting it in a loop.
Pure bookkeeping over an injected clock.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Cooldown:
    model: str
    until: float  # clock seconds
    reason: str


class CrashTracker:
    def __init__(self, clock: Any, limit: int, window_s: float, cooldown_s: float) -> None:
        self.clock = clock
        self.limit = limit
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self._failures: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._cooldowns: dict[str, Cooldown] = {}

    def record(self, model: str, reason: str) -> Cooldown | None:
        """Count one failure of ``model``; return the cooldown it triggers, if any."""
        now = self.clock.seconds()
        times = self._failures[model]
        times.append(now)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) >= self.limit:
            times.clear()
            cooldown = Cooldown(model, now + self.cooldown_s,
                                f"{self.limit} failures within {self.window_s:g}s, last: {reason}")
            self._cooldowns[model] = cooldown
            return cooldown
        return None

    def cooldown(self, model: str) -> Cooldown | None:
        """The active cooldown of ``model``, or None."""
        cooldown = self._cooldowns.get(model)
        if cooldown is not None and cooldown.until <= self.clock.seconds():
            del self._cooldowns[model]
            return None
        return cooldown

    def active(self) -> list[Cooldown]:
        return [c for c in (self.cooldown(m) for m in list(self._cooldowns)) if c is not None]
