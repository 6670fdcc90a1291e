"""Placement: which device serves a request for a model. A pure function.

Policy (also in ``docs/architecture.md``):

1. Skip devices that cannot take the model: in crash cooldown for it, or it
   does not fit (GGUF file size above the device's free memory plus what the
   model it would replace occupies — only where both figures are known).
2. Among the rest with room in their queue, a device that already runs (or is
   starting) the model comes first; among several, the least pressure
   (in flight + waiting) wins.
3. Otherwise the device with the most free memory; ties go to the least queue
   pressure, then to a device with no model loaded (so a loaded model is not
   evicted needlessly), then to the lowest index.
4. No device with room but some could serve → :class:`AllBusy` (429).
   No device could serve at all → :class:`NoDevice` (503) with the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SlotView:
    """What placement needs to know of one device."""

    device_id: str
    index: int
    model: str | None  # running or starting
    serving: bool  # its child is ready or starting (the model is (being) loaded)
    in_flight: int
    waiting: int
    max_pending: int
    free_memory_bytes: int | None = None
    loaded_model_bytes: int | None = None
    cooldown_models: frozenset[str] = field(default_factory=frozenset)

    @property
    def pressure(self) -> int:
        return self.in_flight + self.waiting

    @property
    def has_room(self) -> bool:
        return self.pressure < self.max_pending


class NoDevice(Exception):
    """No device can serve the model; ``reasons`` says why for each."""

    def __init__(self, model: str, reasons: dict[str, str]) -> None:
        super().__init__(model, reasons)
        self.model = model
        self.reasons = reasons

    def __str__(self) -> str:
        if not self.reasons:
            return f"no device is available for model {self.model!r}"
        why = "; ".join(f"{dev}: {reason}" for dev, reason in self.reasons.items())
        return f"no device can serve model {self.model!r}: {why}"


class AllBusy(Exception):
    """Every device that could serve the model has a full queue."""

    def __init__(self, model: str, devices: list[str]) -> None:
        super().__init__(model, devices)
        self.model = model
        self.devices = devices

    def __str__(self) -> str:
        return f"all devices that can serve {self.model!r} are busy ({', '.join(self.devices)})"


def _fits(view: SlotView, model: str, size: int | None) -> bool:
    if size is None or view.free_memory_bytes is None:
        return True
    reclaim = 0
    if view.model is not None and view.model != model and view.loaded_model_bytes is not None:
        reclaim = view.loaded_model_bytes
    return size <= view.free_memory_bytes + reclaim


def place(model: str, model_bytes: int | None, views: list[SlotView]) -> str:
    """The id of the device that should serve ``model``."""
    reasons: dict[str, str] = {}
    able: list[SlotView] = []
    for view in views:
        if model in view.cooldown_models:
            reasons[view.device_id] = "model is in crash cooldown here"
        elif view.model == model and view.serving:
            able.append(view)  # already holds it: fits by definition
        elif not _fits(view, model, model_bytes):
            reasons[view.device_id] = (f"model needs {model_bytes} bytes, "
                                       f"{view.free_memory_bytes} free")
        else:
            able.append(view)
    if not able:
        raise NoDevice(model, reasons)
    roomy = [v for v in able if v.has_room]
    if not roomy:
        raise AllBusy(model, [v.device_id for v in able])
    loaded = [v for v in roomy if v.model == model and v.serving]
    if loaded:
        return min(loaded, key=lambda v: (v.pressure, v.index)).device_id
    best = min(roomy, key=lambda v: (
        -(v.free_memory_bytes if v.free_memory_bytes is not None else -1),
        v.pressure,
        0 if v.model is None else 1,
        v.index,
    ))
    return best.device_id
