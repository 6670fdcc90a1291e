"""The backend-agnostic device model: ``DeviceRef``, ``DeviceMetrics``, ``Backend``.

The scheduler only ever sees these types, so placement never depends on which
vendor a device comes from. A backend discovers its devices, samples their
metrics, and says how a ``llama-server`` child is pinned to one of them
(environment variables and command-line flags).

Contract for implementations: ``discover`` and ``metrics`` return Deferreds and
never block the reactor thread — vendor tools run through
:func:`rolemesh_node.devices.tools.run_tool` (a child process with a timeout)
and libraries such as NVML through ``deferToThread``. A missing driver or tool
gives no devices (and one log line), never an exception to the caller.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

from twisted.internet.defer import Deferred


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """One device a child can be pinned to: ``cuda:0``, ``cpu:1``, ``rocm:0``…"""

    backend: str
    index: int
    name: str = ""
    memory_total_bytes: int | None = None
    uuid: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.backend}:{self.index}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "backend": self.backend,
            "index": self.index,
            "name": self.name,
            "memory_total_bytes": self.memory_total_bytes,
        }
        if self.uuid:
            out["uuid"] = self.uuid
        if self.extra:
            out["extra"] = dict(self.extra)
        return out


@dataclass(frozen=True, slots=True)
class DeviceMetrics:
    """A sample of one device's state. ``None`` means "not known here"."""

    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    sampled_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "memory_total_bytes": self.memory_total_bytes,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_free_bytes": self.memory_free_bytes,
            "utilization_pct": self.utilization_pct,
            "temperature_c": self.temperature_c,
            "power_w": self.power_w,
            "sampled_at": self.sampled_at,
        }


class Backend(ABC):
    """Discovery, metrics and pinning for one kind of device."""

    #: the name used in config (``backend: cuda``) and in device ids
    name: ClassVar[str]

    @abstractmethod
    def discover(self) -> Deferred[list[DeviceRef]]:
        """All devices of this backend on the host (empty when none / no driver)."""

    @abstractmethod
    def metrics(self, devices: Sequence[DeviceRef]) -> Deferred[dict[str, DeviceMetrics]]:
        """A fresh sample per device id; devices that cannot be read are left out."""

    @abstractmethod
    def child_env(self, device: DeviceRef, base: Mapping[str, str]) -> dict[str, str]:
        """The full environment for a child pinned to ``device``, built from ``base``."""

    def child_args(self, device: DeviceRef) -> list[str]:
        """Extra ``llama-server`` flags for a child pinned to ``device``."""
        return []


def without(env: Mapping[str, str], *names: str) -> dict[str, str]:
    """A copy of ``env`` without the variables ``names`` (pinning hygiene)."""
    return {k: v for k, v in env.items() if k not in names}


#: every variable any backend uses to pin a child; a backend clears the others'
#: so a stray value inherited from the agent's environment cannot confuse a child
PINNING_VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
    "GGML_VK_VISIBLE_DEVICES",
    "ONEAPI_DEVICE_SELECTOR",
)
