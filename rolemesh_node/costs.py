"""What switching and serving cost, as measured: the scheduler's only source of time estimates.

* **Switch cost** per (model, device): how long a start took, from the spawn
  (after the old child stopped) to readiness. Estimated for a pair never
  measured from the same model on another device, else from another model on
  that device scaled by file size; ``None`` when nothing is known.
* **Service time** per model: how long a request held its place on a device
  (grant to release), as seen by the node.

Both are exponentially weighted moving averages (``ALPHA``), so a figure
follows the machine's current speed without jumping on one odd sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

ALPHA = 0.3


@dataclass(slots=True)
class _Average:
    value: float
    count: int = 1
    last: float = 0.0

    def add(self, sample: float) -> None:
        self.value += ALPHA * (sample - self.value)
        self.count += 1
        self.last = sample


class CostBook:
    def __init__(self) -> None:
        self._switch: dict[tuple[str, str], _Average] = {}
        self._service: dict[str, _Average] = {}

    # ------------------------------------------------------------ recording

    def record_switch(self, model: str, device: str, seconds: float) -> None:
        seconds = max(0.0, seconds)
        avg = self._switch.get((model, device))
        if avg is None:
            self._switch[(model, device)] = _Average(seconds, last=seconds)
        else:
            avg.add(seconds)

    def record_service(self, model: str, seconds: float) -> None:
        seconds = max(0.0, seconds)
        avg = self._service.get(model)
        if avg is None:
            self._service[model] = _Average(seconds, last=seconds)
        else:
            avg.add(seconds)

    # ------------------------------------------------------------ estimates

    def switch_s(self, model: str, device: str | None = None,
                 sizes: Mapping[str, int | None] | None = None) -> float | None:
        """The expected load time of ``model`` on ``device`` (any device when None)."""
        if device is not None:
            avg = self._switch.get((model, device))
            if avg is not None:
                return avg.value
        same_model = [a.value for (m, _), a in self._switch.items() if m == model]
        if same_model:
            return max(same_model)
        if sizes and sizes.get(model):
            size = sizes[model]
            rates = [a.value / sizes[m] for (m, d), a in self._switch.items()
                     if sizes.get(m) and (device is None or d == device)]
            if rates:
                return max(rates) * size  # type: ignore[operator]
        return None

    def max_service_s(self) -> float | None:
        """The longest measured service time of any model (what a drain may take)."""
        return max((a.value for a in self._service.values()), default=None)

    def service_s(self, model: str) -> float | None:
        avg = self._service.get(model)
        return None if avg is None else avg.value

    # ------------------------------------------------------------ reporting

    def switch_table(self) -> list[dict[str, Any]]:
        """Measured switch costs, for the inventory and ``/metrics``."""
        return [{"model": m, "device": d, "seconds": round(a.value, 4), "last_s": round(a.last, 4),
                 "count": a.count} for (m, d), a in sorted(self._switch.items())]

    def service_table(self) -> dict[str, dict[str, Any]]:
        return {m: {"seconds": round(a.value, 4), "count": a.count} for m, a in sorted(self._service.items())}
