"""The ``sycl`` backend: Intel GPUs through oneAPI Level Zero, read from ``sycl-ls``.

``sycl-ls`` prints one line per (backend, device). Three formats are in the wild:

* oneAPI ≥ 2024.1:
  ``[level_zero:gpu][level_zero:0] Intel(R) Level-Zero, Intel(R) Arc(TM) A770 Graphics 1.3 [1.3.26241]``
* 2022–2024.0: ``[ext_oneapi_level_zero:gpu:0] Intel(R) Level-Zero, Intel(R) Arc(TM) A770 Graphics 1.3 [1.3.26918]``
* 2021: ``[level_zero:0] GPU : Intel(R) Level-Zero 1.1 [1.1.19792]`` (no device name)

Only ``level_zero`` GPUs are devices here (llama.cpp's SYCL backend runs on
Level Zero); the number in ``[level_zero:N]`` is what
``ONEAPI_DEVICE_SELECTOR=level_zero:N`` selects. sycl-ls runs without
``ONEAPI_DEVICE_SELECTOR`` so a value inherited by the agent cannot hide devices.

Memory: total from ``llama-server --list-devices`` (``SYCLn`` entries, matched
by name, run with ``ZES_ENABLE_SYSMAN=1`` so free memory is real). Metrics:
``xpu-smi dump -d <ids> -m 0,1,3,18 -n 1`` (utilization, power, temperature,
memory used) when xpu-smi is installed — its device ids are matched to Level
Zero devices by name through ``xpu-smi discovery -j`` — else ``--list-devices``.

Pinning: ``ONEAPI_DEVICE_SELECTOR=level_zero:<index>`` and
``ZES_ENABLE_SYSMAN=1`` (llama.cpp needs Sysman for free-memory queries).
Inside the child the GPU is ``SYCL0``. Devices found only through
``--list-devices`` are pinned with ``--device SYCLn`` (ggml's numbering).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks

from .base import PINNING_VARIABLES, DeviceMetrics, DeviceRef, without
from .common import ToolBackend
from .listdevices import ParsedDevice, of_backend, to_refs
from .parsing import MIB, load_json, match_by_name, text, to_float, to_int
from .probe import describe
from .tools import ToolError

SYCL_LS = ("sycl-ls",)
XPU_SMI_DISCOVERY = ("xpu-smi", "discovery", "-j")
#: 0 GPU Utilization (%), 1 GPU Power (W), 3 GPU Core Temperature, 18 GPU Memory Used (MiB)
XPU_SMI_METRICS = "0,1,3,18"

_NEW = re.compile(r"^\[(?P<backend>\w+):(?P<type>\w+)\]\[\w+:(?P<index>\d+)\]\s*(?P<rest>.*)$")
_MID = re.compile(r"^\[(?P<backend>\w+):(?P<type>\w+):(?P<index>\d+)\]\s*(?P<rest>.*)$")
_OLD = re.compile(r"^\[(?P<backend>\w+):(?P<index>\d+)\]\s*(?P<type>\w+)\s*:\s*(?P<rest>.*)$")
_VERSION_TAIL = re.compile(
    r"\s+(?:OpenCL\s+)?\d+(?:\.\d+)+(?:\s+\(Build \d+\))?(?:\s+NEO)?\s*\[[^\]]*\]\s*$"
)


@dataclass(frozen=True, slots=True)
class SyclDevice:
    """One line of ``sycl-ls``."""

    backend: str  # level_zero, opencl, cuda, hip, native_cpu…
    type: str  # gpu, cpu, acc, fpga…
    index: int
    name: str
    platform: str


def parse_sycl_ls(data: bytes | str) -> list[SyclDevice]:
    """Every device line of ``sycl-ls`` in any of its three formats (pure; garbage → [])."""
    devices = []
    for line in text(data).splitlines():
        line = line.strip()
        match = _NEW.match(line) or _MID.match(line) or _OLD.match(line)
        if not match:
            continue
        backend = match.group("backend").lower().removeprefix("ext_oneapi_")
        rest = _VERSION_TAIL.sub("", match.group("rest").strip())
        platform, _, name = rest.partition(", ")
        devices.append(SyclDevice(
            backend=backend, type=match.group("type").lower(), index=int(match.group("index")),
            name=(name or platform).strip(), platform=platform.strip(),
        ))
    return devices


def level_zero_gpus(devices: Sequence[SyclDevice]) -> list[SyclDevice]:
    """The devices ``ONEAPI_DEVICE_SELECTOR=level_zero:N`` can select."""
    return [d for d in devices if d.backend == "level_zero" and d.type == "gpu"]


def parse_xpu_smi_discovery(data: bytes | str) -> list[tuple[int, str]]:
    """(device id, name) pairs of ``xpu-smi discovery -j``."""
    doc = load_json(data)
    rows = doc.get("device_list") if isinstance(doc, dict) else doc
    out = []
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict):
            dev_id = to_int(row.get("device_id"))
            if dev_id is not None:
                out.append((dev_id, str(row.get("device_name") or "")))
    return out


@dataclass(frozen=True, slots=True)
class XpuSample:
    """One device row of ``xpu-smi dump``."""

    utilization_pct: float | None
    power_w: float | None
    temperature_c: float | None
    memory_used_bytes: int | None


def parse_xpu_smi_dump(data: bytes | str) -> dict[int, XpuSample]:
    """xpu-smi device id → sample, from ``xpu-smi dump … -m 0,1,3,18`` CSV (columns found by header)."""
    rows = [r for r in csv.reader(io.StringIO(text(data)), skipinitialspace=True) if r]
    header_at = next((i for i, r in enumerate(rows) if any(c.strip() == "DeviceId" for c in r)), None)
    if header_at is None:
        return {}
    header = {c.strip(): i for i, c in enumerate(rows[header_at])}

    def col(row: list[str], name: str) -> str | None:
        i = header.get(name)
        return row[i] if i is not None and i < len(row) else None

    out = {}
    for row in rows[header_at + 1:]:
        dev_id = to_int(col(row, "DeviceId"))
        if dev_id is None:
            continue
        used = to_float(col(row, "GPU Memory Used (MiB)"))
        out[dev_id] = XpuSample(  # a later row of the same device wins (fresher)
            utilization_pct=to_float(col(row, "GPU Utilization (%)")),
            power_w=to_float(col(row, "GPU Power (W)")),
            temperature_c=to_float(col(row, "GPU Core Temperature (Celsius Degree)")),
            memory_used_bytes=int(used * MIB) if used is not None else None,
        )
    return out


class SyclBackend(ToolBackend):
    """Intel GPUs through SYCL / Level Zero."""

    name = "sycl"
    list_devices_env = {"ZES_ENABLE_SYSMAN": "1"}

    def refs_from_list(self, parsed: Sequence[ParsedDevice]) -> list[DeviceRef]:
        return to_refs(parsed, self.name, pin="device-arg")

    @inlineCallbacks
    def _xpu_ids(self, gpus: Sequence[SyclDevice]) -> Deferred[dict[int, int]]:
        """Level Zero index → xpu-smi device id (by name, else by position); {} without xpu-smi."""
        try:
            out = yield self.tool(XPU_SMI_DISCOVERY)
        except ToolError:
            return {}
        listed = parse_xpu_smi_discovery(out)
        return match_by_name([(g.index, g.name) for g in gpus], listed, by_position=True)

    @inlineCallbacks
    def discover(self) -> Deferred[list[DeviceRef]]:
        reasons = []
        try:
            out = yield self.tool(SYCL_LS)
        except ToolError as exc:
            reasons.append(f"sycl-ls: {exc.reason}")
            return (yield self.discover_from_list(reasons))
        listed = parse_sycl_ls(out)
        if not listed and text(out).strip():
            reasons.append("sycl-ls: output not understood")
            return (yield self.discover_from_list(reasons))
        gpus = level_zero_gpus(listed)
        self.source = "sycl-ls"
        if not gpus:
            self.log.info("{backend}: sycl-ls lists no Level Zero GPU", backend=self.name)
            return []
        memory: dict[int, ParsedDevice] = {}
        try:
            parsed = yield self.lister.get(fresh=True)
        except ToolError as exc:
            self.notes.info("memory", "{backend}: device memory unknown: {error}", backend=self.name, error=exc.reason)
        else:
            memory = match_by_name([(g.index, g.name) for g in gpus],
                                   [(p, p.description) for p in of_backend(parsed, self.name)])
        xpu = yield self._xpu_ids(gpus)
        refs = []
        for g in gpus:
            extra: dict[str, Any] = {"source": "sycl-ls", "pin": "env", "child_device": "SYCL0"}
            if g.index in memory:
                extra["llama_device"] = memory[g.index].name
            if g.index in xpu:
                extra["xpu_smi_id"] = xpu[g.index]
            refs.append(DeviceRef(backend=self.name, index=g.index, name=g.name,
                                  memory_total_bytes=memory[g.index].memory_total_bytes if g.index in memory else None,
                                  extra=extra))
        return refs

    @inlineCallbacks
    def metrics(self, devices: Sequence[DeviceRef]) -> Deferred[dict[str, DeviceMetrics]]:
        if not devices:
            return {}
        ids = {d.id: d.extra["xpu_smi_id"] for d in devices if "xpu_smi_id" in d.extra}
        samples: dict[int, XpuSample] = {}
        if ids:
            argv = ("xpu-smi", "dump", "-d", ",".join(str(i) for i in sorted(set(ids.values()))),
                    "-m", XPU_SMI_METRICS, "-n", "1")
            try:
                samples = parse_xpu_smi_dump((yield self.tool(argv)))
            except ToolError as exc:
                self.notes.warn("xpu-smi", "{backend}: xpu-smi dump failed: {error}",
                                backend=self.name, error=describe(exc))
            else:
                self.notes.clear("xpu-smi")
        listed = {} if len(samples) >= len(devices) else (yield self.metrics_from_list(devices))
        out = {}
        for dev in devices:
            sample = samples.get(ids[dev.id]) if dev.id in ids else None
            from_list = listed.get(dev.id)
            if sample is None:
                if from_list is not None:
                    out[dev.id] = from_list
                continue
            total = dev.memory_total_bytes or (from_list.memory_total_bytes if from_list else None)
            used = sample.memory_used_bytes
            out[dev.id] = DeviceMetrics(
                memory_total_bytes=total, memory_used_bytes=used,
                memory_free_bytes=max(total - used, 0) if total is not None and used is not None else None,
                utilization_pct=sample.utilization_pct, temperature_c=sample.temperature_c, power_w=sample.power_w,
            )
        return out

    def child_env(self, device: DeviceRef, base: Mapping[str, str]) -> dict[str, str]:
        env = without(base, *PINNING_VARIABLES)
        if device.extra.get("pin") != "device-arg":
            env["ONEAPI_DEVICE_SELECTOR"] = f"level_zero:{device.index}"
        env["ZES_ENABLE_SYSMAN"] = "1"
        return env

    def child_args(self, device: DeviceRef) -> list[str]:
        if device.extra.get("pin") == "device-arg":
            return ["--device", str(device.extra["llama_device"])]
        return []


__all__ = [
    "SYCL_LS", "SyclBackend", "SyclDevice", "XpuSample", "level_zero_gpus", "parse_sycl_ls",
    "parse_xpu_smi_discovery", "parse_xpu_smi_dump",
]
