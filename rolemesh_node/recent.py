"""The node's recent errors, for the status page: a small ring, newest last.

Fed by the device slots (a start that failed, a crash) and by the HTTP site
(a 5xx answer the node gave itself: ``no_device``, ``model_not_ready``…). An
error equal to the one before it (same source, device, model and message)
only bumps that entry's ``count`` and time, so a failing model under load
does not push everything else out.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any, Callable

SIZE = 50


@dataclass(slots=True)
class RecentError:
    at: float  # Unix time of the last occurrence
    source: str  # start, crash, request
    message: str
    device: str | None = None
    model: str | None = None
    count: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "source": self.source, "device": self.device, "model": self.model,
                "message": self.message, "count": self.count}


class RecentErrors:
    def __init__(self, size: int = SIZE, clock: Callable[[], float] = time.time) -> None:
        self._ring: collections.deque[RecentError] = collections.deque(maxlen=size)
        self.clock = clock

    def add(self, source: str, message: str, device: str | None = None, model: str | None = None) -> None:
        now = self.clock()
        message = message[:2000]
        last = self._ring[-1] if self._ring else None
        if last is not None and (last.source, last.message, last.device, last.model) == (source, message,
                                                                                           device, model):
            last.count += 1
            last.at = now
            return
        self._ring.append(RecentError(now, source, message, device, model))

    def slot_event(self, event: str, fields: dict[str, Any], last_error: str | None = None) -> None:
        """From a DeviceSlot: a failed start (``error``) or a crash (the slot's ``last_error``)."""
        if event == "failed":
            self.add("start", str(fields.get("error") or fields.get("reason") or "the start failed"),
                     fields.get("device"), fields.get("model"))
        elif event == "crash":
            self.add("crash", last_error or "crashed", fields.get("device"), fields.get("model"))

    def to_json(self) -> list[dict[str, Any]]:
        """Newest first."""
        return [e.to_json() for e in reversed(self._ring)]
