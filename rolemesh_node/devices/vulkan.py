"""The ``vulkan`` backend: any GPU with a Vulkan driver, read from ``vulkaninfo --summary``.

``vulkaninfo --summary`` (vulkan-tools ≥ 1.2.148) prints one block per physical
device, in the loader's enumeration order — the same order ggml-vulkan indexes
``GGML_VK_VISIBLE_DEVICES`` with::

    GPU0:
            apiVersion         = 1.3.277
            deviceType         = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU
            deviceName         = NVIDIA GeForce RTX 4090
            deviceUUID         = …

Decisions:

* **CPU-type devices are skipped** (``PHYSICAL_DEVICE_TYPE_CPU``: llvmpipe,
  lavapipe, SwiftShader). They are software rasterisers on the host CPU; the
  ``cpu`` backend serves CPUs better, and a Vulkan "GPU" that is really the CPU
  would compete with the CPU children.
* **One device per physical GPU**: when two drivers expose the same GPU (RADV
  and AMDVLK, or a doubled entry), the entries share a ``deviceUUID`` and only
  the first is kept, so one card never gets two children.
* **Memory** comes from ``llama-server --list-devices`` (Vulkan has no
  vendor-neutral memory tool), matched by device name; ``None`` without it.

Pinning: ``GGML_VK_VISIBLE_DEVICES=<index>`` (inside the child the GPU is
``Vulkan0``). Devices found only through ``--list-devices`` (no vulkaninfo)
carry ggml's numbering, which skips devices ggml filters out, so they are
pinned with ``--device VulkanN`` and no visibility variable instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks

from .base import PINNING_VARIABLES, DeviceMetrics, DeviceRef, without
from .common import ToolBackend
from .listdevices import ParsedDevice, of_backend, to_refs
from .parsing import match_by_name, text, to_int
from .tools import ToolError

VULKANINFO = ("vulkaninfo", "--summary")

_GPU_HEADER = re.compile(r"^\s*GPU(\d+):\s*$")
_FIELD = re.compile(r"^\s+(\w+)\s*=\s*(.*?)\s*$")
_TYPES = {
    "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU": "discrete",
    "PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU": "integrated",
    "PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU": "virtual",
    "PHYSICAL_DEVICE_TYPE_CPU": "cpu",
    "PHYSICAL_DEVICE_TYPE_OTHER": "other",
}


@dataclass(frozen=True, slots=True)
class VulkanGpu:
    """One ``GPUn:`` block of ``vulkaninfo --summary``."""

    index: int
    name: str
    device_type: str
    vendor_id: int | None = None
    driver_name: str | None = None
    uuid: str | None = None

    @property
    def is_cpu(self) -> bool:
        return self.device_type == "cpu"


def parse_vulkaninfo_summary(data: bytes | str) -> list[VulkanGpu]:
    """The ``GPUn:`` blocks of ``vulkaninfo --summary`` (pure; garbage → [])."""
    blocks: list[tuple[int, dict[str, str]]] = []
    current: dict[str, str] | None = None
    for line in text(data).splitlines():
        header = _GPU_HEADER.match(line)
        if header:
            current = {}
            blocks.append((int(header.group(1)), current))
            continue
        if current is None:
            continue
        field = _FIELD.match(line)
        if field:
            current[field.group(1)] = field.group(2)
        elif line.strip() and not line[:1].isspace():
            current = None  # a new top-level section ends the device block
    gpus = []
    for index, fields in blocks:
        if "deviceName" not in fields:
            continue
        raw_type = fields.get("deviceType", "").split()[0] if fields.get("deviceType") else ""
        gpus.append(VulkanGpu(
            index=index,
            name=fields["deviceName"],
            device_type=_TYPES.get(raw_type, raw_type.lower() or "unknown"),
            vendor_id=to_int(fields.get("vendorID")),
            driver_name=fields.get("driverName") or None,
            uuid=fields.get("deviceUUID") or None,
        ))
    return gpus


def usable(gpus: Sequence[VulkanGpu]) -> list[VulkanGpu]:
    """Drop CPU-type devices and second entries of one physical GPU (same deviceUUID)."""
    seen: set[str] = set()
    kept = []
    for gpu in gpus:
        if gpu.is_cpu:
            continue
        if gpu.uuid:
            if gpu.uuid in seen:
                continue
            seen.add(gpu.uuid)
        kept.append(gpu)
    return kept


class VulkanBackend(ToolBackend):
    """GPUs through Vulkan (any vendor)."""

    name = "vulkan"

    def refs_from_list(self, parsed: Sequence[ParsedDevice]) -> list[DeviceRef]:
        return to_refs(parsed, self.name, pin="device-arg")

    @inlineCallbacks
    def discover(self) -> Deferred[list[DeviceRef]]:
        reasons = []
        try:
            out = yield self.tool(VULKANINFO)
        except ToolError as exc:
            reasons.append(f"vulkaninfo: {exc.reason}")
            return (yield self.discover_from_list(reasons))
        gpus = parse_vulkaninfo_summary(out)
        if not gpus:
            reasons.append("vulkaninfo --summary: no GPU block in its output")
            return (yield self.discover_from_list(reasons))
        kept = usable(gpus)
        skipped = [g.name for g in gpus if g not in kept]
        if skipped:
            self.log.info("{backend}: skipping {skipped} (CPU-type or duplicate Vulkan devices)",
                          backend=self.name, skipped=skipped)
        self.source = "vulkaninfo"
        memory: dict[int, ParsedDevice] = {}
        if kept:
            try:
                parsed = yield self.lister.get(fresh=True)
            except ToolError as exc:
                self.notes.info("memory", "{backend}: device memory unknown: {error}",
                                backend=self.name, error=exc.reason)
            else:
                memory = match_by_name([(g.index, g.name) for g in kept],
                                       [(p, p.description) for p in of_backend(parsed, self.name)])
        refs = []
        for g in kept:
            listed = memory.get(g.index)
            extra: dict[str, Any] = {"source": "vulkaninfo", "device_type": g.device_type, "pin": "env",
                                     "child_device": "Vulkan0"}
            if g.driver_name:
                extra["driver"] = g.driver_name
            if listed is not None:
                extra["llama_device"] = listed.name
            refs.append(DeviceRef(backend=self.name, index=g.index, name=g.name,
                                  memory_total_bytes=listed.memory_total_bytes if listed else None,
                                  uuid=g.uuid, extra=extra))
        return refs

    def metrics(self, devices: Sequence[DeviceRef]) -> Deferred[dict[str, DeviceMetrics]]:
        return self.metrics_from_list(devices)

    def child_env(self, device: DeviceRef, base: Mapping[str, str]) -> dict[str, str]:
        env = without(base, *PINNING_VARIABLES)
        if device.extra.get("pin") != "device-arg":
            env["GGML_VK_VISIBLE_DEVICES"] = str(device.index)
        return env

    def child_args(self, device: DeviceRef) -> list[str]:
        if device.extra.get("pin") == "device-arg":
            return ["--device", str(device.extra["llama_device"])]
        return []


__all__ = ["VULKANINFO", "VulkanBackend", "VulkanGpu", "parse_vulkaninfo_summary", "usable"]
