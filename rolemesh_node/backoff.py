"""Exponential backoff with jitter, as a pure policy.

:class:`Backoff` only computes delays; it holds no timer and no state, so the
same policy can drive registration retries, heartbeat back-off or anything
else, and a test can check a whole schedule without a clock::

    >>> policy = Backoff(base=1.0, factor=2.0, cap=30.0, jitter=0.0)
    >>> [policy.delay(n) for n in range(7)]
    [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]

Jitter spreads retries of many nodes that failed at the same moment (a
dispatcher restart) so they do not all come back in the same instant: with
``jitter=j`` the delay is drawn uniformly from ``[(1 - j) * d, d]`` where ``d``
is the un-jittered delay. The delay therefore never exceeds ``cap``.
"""

from __future__ import annotations

import math
import random as _random
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True, slots=True)
class Backoff:
    """``delay(attempt) = min(cap, base * factor ** attempt)``, minus up to ``jitter`` of it.

    :param base: the delay before the first retry (attempt 0), in seconds.
    :param factor: growth per attempt (``>= 1``).
    :param cap: the largest delay ever returned.
    :param jitter: the fraction (``0..1``) of a delay that may be taken off at random.
    :param random: a function returning floats in ``[0, 1)``; inject a fixed one in tests.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 60.0
    jitter: float = 0.5
    random: Callable[[], float] = field(default=_random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base > 0):
            raise ValueError(f"base must be a positive number of seconds, got {self.base!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"factor must be at least 1, got {self.factor!r}")
        if not (math.isfinite(self.cap) and self.cap >= self.base):
            raise ValueError(f"cap must be at least base ({self.base}), got {self.cap!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter!r}")

    def ceiling(self, attempt: int) -> float:
        """The delay for ``attempt`` (0-based) before jitter: ``min(cap, base * factor ** attempt)``."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        try:
            raw = self.base * self.factor ** attempt
        except OverflowError:
            return self.cap
        return min(self.cap, raw)

    def delay(self, attempt: int) -> float:
        """The delay in seconds to wait before retry number ``attempt`` (0-based)."""
        ceiling = self.ceiling(attempt)
        if self.jitter == 0:
            return ceiling
        r = min(max(self.random(), 0.0), 1.0)
        return ceiling * (1.0 - self.jitter * r)
