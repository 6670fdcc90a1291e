"""The ``metal`` backend: the one Apple GPU of a Mac, ``metal:0``.

Only on macOS (``sys.platform == "darwin"``; ``platform=`` overrides it for
tests). Apple GPUs share the host's memory, so the device's total memory is
``sysctl -n hw.memsize``; its name is the ``sppci_model`` (else ``_name``) of
the first entry of ``system_profiler SPDisplaysDataType -json``.

Metrics: when llama-server is available, ``--list-devices`` (``MTL0``, older
builds ``Metal``) gives Metal's own view — total is the GPU working-set limit
(``recommendedMaxWorkingSetSize``, less than ``hw.memsize``) and free what is
left of it; without it only the total (``hw.memsize``) is known.

Pinning: none — one device, no variable; the other backends' variables are
removed from the child's environment.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks

from ..config import NodeConfig
from .base import PINNING_VARIABLES, DeviceMetrics, DeviceRef, without
from .common import ToolBackend
from .listdevices import of_backend
from .parsing import load_json, text
from .probe import Runner
from .tools import ToolError, run_tool

SYSCTL_MEMSIZE = ("sysctl", "-n", "hw.memsize")
SYSTEM_PROFILER = ("system_profiler", "SPDisplaysDataType", "-json")


def parse_sysctl_memsize(data: bytes | str) -> int | None:
    """Bytes from ``sysctl -n hw.memsize`` (also accepts ``hw.memsize: N``)."""
    match = re.search(r"(?:^|[:\s])(\d+)\s*$", text(data).strip())
    return int(match.group(1)) if match and int(match.group(1)) > 0 else None


def parse_system_profiler_gpu(data: bytes | str) -> str | None:
    """The first GPU's name in ``system_profiler SPDisplaysDataType -json``."""
    doc = load_json(data)
    entries = doc.get("SPDisplaysDataType") if isinstance(doc, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        for key in ("sppci_model", "_name"):
            value = entry.get(key)
            if isinstance(value, str) and value.strip() and not value.startswith("kHW_"):
                return value.strip()
    return None


class MetalBackend(ToolBackend):
    """The Apple GPU of a Mac."""

    name = "metal"

    def __init__(self, reactor: Any, config: NodeConfig | None = None, *,
                 run: Runner = run_tool, platform: str | None = None) -> None:
        super().__init__(reactor, config, run=run)
        self.platform = platform or sys.platform
        self._memsize: int | None = None

    @inlineCallbacks
    def discover(self) -> Deferred[list[DeviceRef]]:
        if self.platform != "darwin":
            self.log.info("{backend}: no devices (not macOS: {platform})", backend=self.name, platform=self.platform)
            return []
        problems = []
        try:
            self._memsize = parse_sysctl_memsize((yield self.tool(SYSCTL_MEMSIZE)))
        except ToolError as exc:
            problems.append(f"sysctl: {exc.reason}")
        name = None
        try:
            name = parse_system_profiler_gpu((yield self.tool(SYSTEM_PROFILER)))
        except ToolError as exc:
            problems.append(f"system_profiler: {exc.reason}")
        if problems:
            self.log.warn("{backend}: partial device facts ({problems})", backend=self.name,
                          problems="; ".join(problems))
        extra: dict[str, Any] = {"source": "sysctl", "shared_memory": True, "child_device": "MTL0"}
        try:
            listed = of_backend((yield self.lister.get(fresh=True)), self.name)
        except ToolError:
            listed = []
        if listed:
            extra["llama_device"] = listed[0].name
        self.source = "sysctl"
        return [DeviceRef(backend=self.name, index=0, name=name or "Apple GPU",
                          memory_total_bytes=self._memsize, extra=extra)]

    @inlineCallbacks
    def metrics(self, devices: Sequence[DeviceRef]) -> Deferred[dict[str, DeviceMetrics]]:
        if not devices:
            return {}
        out = {}
        if self.lister.binary() is not None:
            out = yield self.metrics_from_list(devices)
        for dev in devices:
            if dev.id not in out:
                out[dev.id] = DeviceMetrics(memory_total_bytes=dev.memory_total_bytes or self._memsize)
        return out

    def child_env(self, device: DeviceRef, base: Mapping[str, str]) -> dict[str, str]:
        return without(base, *PINNING_VARIABLES)


__all__ = ["MetalBackend", "SYSCTL_MEMSIZE", "SYSTEM_PROFILER", "parse_sysctl_memsize",
           "parse_system_profiler_gpu"]
