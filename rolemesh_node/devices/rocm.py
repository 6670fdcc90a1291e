"""The ``rocm`` backend: AMD GPUs through ``amd-smi``, ``rocm-smi`` as the fallback.

Sources, in order:

1. **amd-smi** (ROCm ≥ 6): ``amd-smi static --asic --bus --vram --json`` for the
   devices, ``amd-smi list -e --json`` for each GPU's HIP id, joined on the
   PCI BDF (amd-smi's order and HIP's differ on hosts with an integrated GPU;
   an older amd-smi without ``-e`` → the amd-smi id is used), ``amd-smi metric --usage --power --temperature
   --mem-usage --json`` for metrics. The JSON changed shape across ROCm
   releases: a bare list of GPUs (ROCm 6.0–6.3) or ``{"gpu_data": [...]}``
   (ROCm 6.4+/7); values are plain numbers, ``"16368 MB"`` strings or
   ``{"value": 16368, "unit": "MB"}`` objects; ``"N/A"`` means unknown. All
   are accepted.
2. **rocm-smi** ``--showproductname --showmeminfo vram --showuse --showtemp
   --showpower --json``: ``{"card0": {"Card Series": …, "VRAM Total Memory
   (B)": …}, …}``; key spellings vary by release and are matched loosely.
3. ``llama-server --list-devices`` (``ROCmn`` entries, numbered in HIP order).

Pinning, on Linux: ``ROCR_VISIBLE_DEVICES=<index>`` and ``HIP_VISIBLE_DEVICES=0``.
HIP applies its list *on top of* ROCr's, so ``HIP_VISIBLE_DEVICES`` must name
the device by its position among the ROCr-visible ones — 0, the only one;
setting both to ``<index>`` would hide every GPU for any index above 0. Other
systems: ``HIP_VISIBLE_DEVICES=<index>``. ``CUDA_VISIBLE_DEVICES`` is removed:
HIP reads it too, and a value meant for an NVIDIA card on a mixed host would
hide or pick an AMD GPU. Inside the child the GPU is ``ROCm0``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks

from ..config import NodeConfig
from .base import PINNING_VARIABLES, DeviceMetrics, DeviceRef, without
from .common import ToolBackend
from .parsing import get_ci, is_missing, load_json, to_bytes, to_float, to_int, unwrap
from .probe import Runner, describe
from .tools import ToolError, run_tool

AMD_SMI_STATIC = ("amd-smi", "static", "--asic", "--bus", "--vram", "--json")
AMD_SMI_LIST = ("amd-smi", "list", "-e", "--json")
AMD_SMI_METRIC = ("amd-smi", "metric", "--usage", "--power", "--temperature", "--mem-usage", "--json")
ROCM_SMI = ("rocm-smi", "--showproductname", "--showmeminfo", "vram", "--showuse", "--showtemp",
            "--showpower", "--json")


@dataclass(frozen=True, slots=True)
class AmdGpu:
    """One GPU of ``amd-smi static``."""

    gpu: int
    name: str
    memory_total_bytes: int | None
    bdf: str | None = None
    gfx: str | None = None


@dataclass(frozen=True, slots=True)
class RocmSmiCard:
    """One ``cardN`` of rocm-smi's JSON."""

    index: int
    name: str
    metrics: DeviceMetrics


def amd_smi_rows(doc: Any) -> list[dict[str, Any]]:
    """The per-GPU objects of an amd-smi JSON document, whatever its shape."""
    if isinstance(doc, dict):
        if isinstance(doc.get("gpu_data"), list):
            doc = doc["gpu_data"]
        elif "gpu" in doc:  # a single GPU printed as one object
            doc = [doc]
        else:
            return []
    if not isinstance(doc, list):
        return []
    return [row for row in doc if isinstance(row, dict)]


def _str(value: Any) -> str | None:
    value, _ = unwrap(value)
    if value is None or is_missing(value):
        return None
    return str(value).strip() or None


def parse_amd_smi_static(data: bytes | str) -> list[AmdGpu] | None:
    """GPUs of ``amd-smi static --json``; None when the output is not amd-smi JSON."""
    doc = load_json(data)
    if doc is None or (isinstance(doc, dict) and "gpu_data" not in doc and "gpu" not in doc):
        return None
    gpus = []
    for position, row in enumerate(amd_smi_rows(doc)):
        gpu = to_int(row.get("gpu"))
        asic = row.get("asic") if isinstance(row.get("asic"), dict) else {}
        board = row.get("board") if isinstance(row.get("board"), dict) else {}
        vram = row.get("vram") if isinstance(row.get("vram"), dict) else {}
        bus = row.get("bus") if isinstance(row.get("bus"), dict) else {}
        name = _str(asic.get("market_name")) or _str(board.get("product_name")) or "AMD GPU"
        gpus.append(AmdGpu(
            gpu=gpu if gpu is not None else position,
            name=name,
            memory_total_bytes=to_bytes(vram.get("size"), "MB"),
            bdf=_str(bus.get("bdf")) or _str(row.get("bdf")),
            gfx=_str(asic.get("target_graphics_version")),
        ))
    return gpus


def parse_amd_smi_hip_ids(data: bytes | str) -> dict[int | str, int]:
    """HIP ids from ``amd-smi list -e --json``, keyed by PCI BDF (lower case) and by amd-smi GPU id.

    Rows without ``hip_id`` (``amd-smi list`` without ``-e``, older releases) are skipped.
    """
    ids: dict[int | str, int] = {}
    for row in amd_smi_rows(load_json(data)):
        gpu, hip, bdf = to_int(row.get("gpu")), to_int(row.get("hip_id")), _str(row.get("bdf"))
        if hip is None:
            continue
        if gpu is not None:
            ids[gpu] = hip
        if bdf:
            ids[bdf.lower()] = hip
    return ids


def hip_index(gpu: AmdGpu, hip_ids: Mapping[int | str, int]) -> int:
    """The HIP id of ``gpu``: joined on its PCI BDF (a stable identity), else its amd-smi id."""
    if gpu.bdf and gpu.bdf.lower() in hip_ids:
        return hip_ids[gpu.bdf.lower()]
    return hip_ids.get(gpu.gpu, gpu.gpu)


def _first(section: Any, *keys: str) -> Any:
    if not isinstance(section, dict):
        return None
    for key in keys:
        value, _ = unwrap(section.get(key))
        if not is_missing(value) and value is not None:
            return section.get(key)
    return None


def parse_amd_smi_metric(data: bytes | str) -> dict[int, DeviceMetrics]:
    """amd-smi GPU id → metrics, from ``amd-smi metric --json`` (either shape)."""
    out = {}
    for position, row in enumerate(amd_smi_rows(load_json(data))):
        gpu = to_int(row.get("gpu"))
        mem = row.get("mem_usage")
        total = to_bytes(_first(mem, "total_vram"), "MB")
        used = to_bytes(_first(mem, "used_vram"), "MB")
        free = to_bytes(_first(mem, "free_vram"), "MB")
        if free is None and total is not None and used is not None:
            free = max(total - used, 0)
        if used is None and total is not None and free is not None:
            used = max(total - free, 0)
        out[gpu if gpu is not None else position] = DeviceMetrics(
            memory_total_bytes=total, memory_used_bytes=used, memory_free_bytes=free,
            utilization_pct=to_float(_first(row.get("usage"), "gfx_activity", "gfx_usage")),
            temperature_c=to_float(_first(row.get("temperature"), "edge", "hotspot", "junction")),
            power_w=to_float(_first(row.get("power"), "socket_power", "current_socket_power",
                                    "average_socket_power")),
        )
    return out


def _key_like(card: Mapping[str, Any], *patterns: str) -> Any:
    for pattern in patterns:
        for key, value in card.items():
            if re.fullmatch(pattern, str(key).strip(), re.IGNORECASE) and not is_missing(value):
                return value
    return None


def parse_rocm_smi(data: bytes | str) -> list[RocmSmiCard] | None:
    """Cards of ``rocm-smi … --json``; None when the output is not rocm-smi JSON."""
    doc = load_json(data)
    if not isinstance(doc, dict):
        return None
    cards = []
    for key, card in doc.items():
        match = re.fullmatch(r"card(\d+)", str(key))
        if not match or not isinstance(card, dict):
            continue
        total = to_int(get_ci(card, "VRAM Total Memory (B)"))
        used = to_int(get_ci(card, "VRAM Total Used Memory (B)"))
        name = (_str(get_ci(card, "Card Series", "Device Name", "Card Model", "Card SKU")) or "AMD GPU")
        cards.append(RocmSmiCard(
            index=int(match.group(1)),
            name=name,
            metrics=DeviceMetrics(
                memory_total_bytes=total,
                memory_used_bytes=used,
                memory_free_bytes=total - used if total is not None and used is not None else None,
                utilization_pct=to_float(get_ci(card, "GPU use (%)")),
                temperature_c=to_float(_key_like(card, r"temperature \(sensor edge\) \(c\)",
                                                 r"temperature \(sensor junction\) \(c\)")),
                power_w=to_float(_key_like(card, r"(current|average) (socket )?graphics package power \(w\)",
                                           r".*graphics package power \(w\)")),
            ),
        ))
    cards.sort(key=lambda c: c.index)
    return cards


class RocmBackend(ToolBackend):
    """AMD GPUs. ``platform=`` overrides ``sys.platform`` (pinning differs off Linux)."""

    name = "rocm"

    def __init__(self, reactor: Any, config: NodeConfig | None = None, *,
                 run: Runner = run_tool, platform: str | None = None) -> None:
        super().__init__(reactor, config, run=run)
        self.platform = platform or sys.platform

    @inlineCallbacks
    def _hip_ids(self) -> Deferred[dict[int | str, int]]:
        try:
            out = yield self.tool(AMD_SMI_LIST)
        except ToolError:
            return {}  # older amd-smi without `list -e`: amd-smi ids are the HIP ids
        return parse_amd_smi_hip_ids(out)

    @inlineCallbacks
    def discover(self) -> Deferred[list[DeviceRef]]:
        reasons = []
        try:
            out = yield self.tool(AMD_SMI_STATIC)
        except ToolError as exc:
            reasons.append(f"amd-smi: {exc.reason}")
        else:
            gpus = parse_amd_smi_static(out)
            if gpus is not None:
                hip = (yield self._hip_ids()) if gpus else {}
                self.source = "amd-smi"
                if not gpus:
                    self.log.info("{backend}: amd-smi lists no GPU", backend=self.name)
                return [
                    DeviceRef(backend=self.name, index=hip_index(g, hip), name=g.name,
                              memory_total_bytes=g.memory_total_bytes,
                              extra={"source": "amd-smi", "amdsmi_gpu": g.gpu, "child_device": "ROCm0",
                                     **({"bdf": g.bdf} if g.bdf else {}), **({"gfx": g.gfx} if g.gfx else {})})
                    for g in gpus
                ]
            reasons.append("amd-smi: output not understood")
        try:
            out = yield self.tool(ROCM_SMI)
        except ToolError as exc:
            reasons.append(f"rocm-smi: {exc.reason}")
        else:
            cards = parse_rocm_smi(out)
            if cards is not None:
                self.source = "rocm-smi"
                if reasons:
                    self.log.info("{backend}: {reasons}; reading rocm-smi", backend=self.name,
                                  reasons="; ".join(reasons))
                return [
                    DeviceRef(backend=self.name, index=c.index, name=c.name,
                              memory_total_bytes=c.metrics.memory_total_bytes,
                              extra={"source": "rocm-smi", "rocm_smi_card": c.index, "child_device": "ROCm0"})
                    for c in cards
                ]
            reasons.append("rocm-smi: output not understood")
        return (yield self.discover_from_list(reasons))

    @inlineCallbacks
    def metrics(self, devices: Sequence[DeviceRef]) -> Deferred[dict[str, DeviceMetrics]]:
        if not devices:
            return {}
        if self.source == "list-devices":
            return (yield self.metrics_from_list(devices))
        use_amd = self.source != "rocm-smi"
        argv = AMD_SMI_METRIC if use_amd else ROCM_SMI
        try:
            out = yield self.tool(argv)
        except ToolError as exc:
            self.notes.warn("metrics", "{backend}: {tool} failed: {error}", backend=self.name,
                            tool=argv[0], error=describe(exc))
            return {}
        self.notes.clear("metrics")
        if use_amd:
            by_gpu = parse_amd_smi_metric(out)
            key = "amdsmi_gpu"
        else:
            by_gpu = {c.index: c.metrics for c in (parse_rocm_smi(out) or [])}
            key = "rocm_smi_card"
        return {d.id: by_gpu[d.extra.get(key, d.index)] for d in devices if d.extra.get(key, d.index) in by_gpu}

    def child_env(self, device: DeviceRef, base: Mapping[str, str]) -> dict[str, str]:
        env = without(base, *PINNING_VARIABLES)
        if self.platform.startswith("linux"):
            env["ROCR_VISIBLE_DEVICES"] = str(device.index)
            env["HIP_VISIBLE_DEVICES"] = "0"
        else:
            env["HIP_VISIBLE_DEVICES"] = str(device.index)
        return env


__all__ = [
    "AMD_SMI_LIST", "AMD_SMI_METRIC", "AMD_SMI_STATIC", "AmdGpu", "ROCM_SMI", "RocmBackend", "RocmSmiCard",
    "amd_smi_rows", "hip_index", "parse_amd_smi_hip_ids", "parse_amd_smi_metric", "parse_amd_smi_static",
    "parse_rocm_smi",
]
