"""The ``cuda`` backend: NVIDIA GPUs through NVML, ``nvidia-smi`` when NVML cannot load.

Sources, in order:

1. **NVML** (``pynvml`` from nvidia-ml-py): ``nvmlInit`` once, then the device
   count, name, UUID, memory, ``utilization.gpu``, temperature and power. Every
   NVML call runs on the reactor's thread pool with the tool timeout — a wedged
   driver can block an NVML call for a long time.
2. **nvidia-smi** ``--query-gpu=… --format=csv,noheader,nounits`` when NVML
   cannot load (library missing, driver not loaded…). ``[N/A]`` and
   ``[Not Supported]`` values become None.
3. ``llama-server --list-devices`` when neither is there (``CUDAn`` entries).

No driver and no tool gives no devices and one log line.

Pinning: ``CUDA_VISIBLE_DEVICES=<index>`` with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
NVML and nvidia-smi number GPUs in PCI bus order, while CUDA's default order is
"fastest first"; without ``PCI_BUS_ID`` index 1 could name another card on a
host with mixed GPUs. Inside the child the pinned GPU is CUDA device 0
(``CUDA0`` in llama-server's ``--device`` terms). No child flags are added: the
operator's model ``args`` decide ``-ngl``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks, succeed

from ..config import NodeConfig
from .base import PINNING_VARIABLES, DeviceMetrics, DeviceRef, without
from .common import ToolBackend
from .parsing import MIB, text, to_float, to_int
from .probe import Runner, describe, in_thread
from .tools import ToolError, run_tool

NVIDIA_SMI_FIELDS = (
    "index", "name", "uuid", "memory.total", "memory.used", "memory.free",
    "utilization.gpu", "temperature.gpu", "power.draw",
)
NVIDIA_SMI_ARGV = (
    "nvidia-smi", "--query-gpu=" + ",".join(NVIDIA_SMI_FIELDS), "--format=csv,noheader,nounits",
)


@dataclass(frozen=True, slots=True)
class SmiGpu:
    """One row of the nvidia-smi query."""

    index: int
    name: str
    uuid: str | None
    metrics: DeviceMetrics


def parse_nvidia_smi(data: bytes | str) -> list[SmiGpu]:
    """Rows of ``nvidia-smi --query-gpu=<NVIDIA_SMI_FIELDS> --format=csv,noheader,nounits``.

    Memory is in MiB, power in W. Lines that are not rows (errors, a header)
    are skipped; garbage gives [].
    """
    gpus = []
    for row in csv.reader(io.StringIO(text(data)), skipinitialspace=True):
        if len(row) < len(NVIDIA_SMI_FIELDS):
            continue
        index = to_int(row[0]) if row[0].strip().isdigit() else None
        if index is None:
            continue
        total, used, free = (to_float(v) for v in row[3:6])
        metrics = DeviceMetrics(
            memory_total_bytes=int(total * MIB) if total is not None else None,
            memory_used_bytes=int(used * MIB) if used is not None else None,
            memory_free_bytes=int(free * MIB) if free is not None else None,
            utilization_pct=to_float(row[6]),
            temperature_c=to_float(row[7]),
            power_w=to_float(row[8]),
        )
        uuid = row[2].strip()
        gpus.append(SmiGpu(index=index, name=row[1].strip(), uuid=uuid if uuid.startswith(("GPU-", "MIG-")) else None,
                           metrics=metrics))
    return gpus


def load_nvml() -> Any:
    """The ``pynvml`` module (nvidia-ml-py); raises ImportError when it is not installed."""
    import pynvml  # noqa: PLC0415 - imported lazily: a host without it still runs

    return pynvml


def _decode(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _maybe(call: Callable[[], Any]) -> Any:
    """``call()``, or None when NVML says the value is not supported / not readable."""
    try:
        return call()
    except Exception:  # NVMLError_NotSupported, _NoPermission, _GpuIsLost…
        return None


class CudaBackend(ToolBackend):
    """NVIDIA GPUs. ``nvml=`` injects an NVML module-like object (tests use a fake)."""

    name = "cuda"
    list_devices_env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

    def __init__(self, reactor: Any, config: NodeConfig | None = None, *,
                 nvml: Any = None, run: Runner = run_tool) -> None:
        super().__init__(reactor, config, run=run)
        self._nvml_given = nvml
        self._nvml: Any = None  # the initialised module, once nvmlInit succeeded
        self._nvml_ok: bool | None = None  # None until the one nvmlInit attempt settles
        self._nvml_waiting: list[Deferred[bool]] | None = None
        self.nvml_error: str | None = None

    # -- NVML ----------------------------------------------------------------

    def _init_nvml(self) -> Any:
        module = self._nvml_given if self._nvml_given is not None else load_nvml()
        module.nvmlInit()
        return module

    def _nvml_ready(self) -> Deferred[bool]:
        """Fire with True once NVML is initialised, False when it cannot be (``nvmlInit`` is tried once)."""
        if self._nvml_ok is not None:
            return succeed(self._nvml_ok)
        waiter: Deferred[bool] = Deferred()
        if self._nvml_waiting is not None:  # the attempt is under way: wait for it
            self._nvml_waiting.append(waiter)
            return waiter
        self._nvml_waiting = [waiter]

        def settle(ok: bool) -> None:
            self._nvml_ok = ok
            waiting, self._nvml_waiting = self._nvml_waiting or [], None
            for w in waiting:
                w.callback(ok)

        def initialised(module: Any) -> None:
            self._nvml = module
            settle(True)

        def failed(failure: Any) -> None:
            self.nvml_error = describe(failure)
            settle(False)

        in_thread(self.reactor, self._init_nvml, self.timeout_s).addCallbacks(initialised, failed)
        return waiter

    def _give_up_nvml(self, reason: str) -> None:
        """Stop using NVML (it initialised but cannot enumerate): nvidia-smi from now on."""
        self._nvml, self._nvml_ok, self.nvml_error = None, False, reason

    def _nvml_devices(self) -> list[DeviceRef]:
        nvml = self._nvml
        devices = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:  # a lost GPU: skip it, keep the others
                continue
            memory = _maybe(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
            uuid = _maybe(lambda: _decode(nvml.nvmlDeviceGetUUID(handle)))
            devices.append(DeviceRef(
                backend=self.name, index=index,
                name=_maybe(lambda: _decode(nvml.nvmlDeviceGetName(handle))) or "NVIDIA GPU",
                memory_total_bytes=int(memory.total) if memory is not None else None,
                uuid=uuid or None,
                extra={"source": "nvml", "child_device": "CUDA0"},
            ))
        return devices

    def _nvml_metrics(self, devices: Sequence[DeviceRef]) -> dict[str, DeviceMetrics]:
        nvml = self._nvml
        out = {}
        for dev in devices:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(dev.index)
            except Exception:
                continue
            memory = _maybe(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
            util = _maybe(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            temp = _maybe(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            power_mw = _maybe(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
            out[dev.id] = DeviceMetrics(
                memory_total_bytes=int(memory.total) if memory is not None else None,
                memory_used_bytes=int(memory.used) if memory is not None else None,
                memory_free_bytes=int(memory.free) if memory is not None else None,
                utilization_pct=float(util) if util is not None else None,
                temperature_c=float(temp) if temp is not None else None,
                power_w=round(power_mw / 1000.0, 3) if power_mw is not None else None,
            )
        return out

    # -- Backend -------------------------------------------------------------

    @inlineCallbacks
    def discover(self) -> Deferred[list[DeviceRef]]:
        reasons = []
        if (yield self._nvml_ready()):
            try:
                devices = yield in_thread(self.reactor, self._nvml_devices, self.timeout_s)
            except Exception as exc:
                self._give_up_nvml(f"enumeration failed: {describe(exc)}")
            else:
                self.source = "nvml"
                if not devices:
                    self.log.info("{backend}: NVML sees no GPU", backend=self.name)
                return devices
        reasons.append(f"NVML: {self.nvml_error}")
        try:
            out = yield self.tool(NVIDIA_SMI_ARGV)
        except ToolError as exc:
            reasons.append(f"nvidia-smi: {exc.reason}")
            return (yield self.discover_from_list(reasons))
        gpus = parse_nvidia_smi(out)
        if not gpus:
            self.log.warn("{backend}: nvidia-smi gave no GPU rows ({reasons}); no devices",
                          backend=self.name, reasons="; ".join(reasons), output=text(out)[:200])
            return []
        self.source = "nvidia-smi"
        self.log.info("{backend}: NVML unavailable ({error}); reading nvidia-smi",
                      backend=self.name, error=self.nvml_error)
        return [
            DeviceRef(backend=self.name, index=g.index, name=g.name, memory_total_bytes=g.metrics.memory_total_bytes,
                      uuid=g.uuid, extra={"source": "nvidia-smi", "child_device": "CUDA0"})
            for g in gpus
        ]

    @inlineCallbacks
    def metrics(self, devices: Sequence[DeviceRef]) -> Deferred[dict[str, DeviceMetrics]]:
        if not devices:
            return {}
        if self.source == "list-devices":
            return (yield self.metrics_from_list(devices))
        if (yield self._nvml_ready()):
            try:
                samples = yield in_thread(self.reactor, lambda: self._nvml_metrics(devices), self.timeout_s)
            except Exception as exc:
                self.notes.warn("nvml-metrics", "{backend}: NVML metrics failed: {error}",
                                backend=self.name, error=describe(exc))
                return {}
            self.notes.clear("nvml-metrics")
            return samples
        try:
            out = yield self.tool(NVIDIA_SMI_ARGV)
        except ToolError as exc:
            self.notes.warn("smi-metrics", "{backend}: nvidia-smi failed: {error}",
                            backend=self.name, error=describe(exc))
            return {}
        self.notes.clear("smi-metrics")
        by_index = {g.index: g for g in parse_nvidia_smi(out)}
        return {d.id: by_index[d.index].metrics for d in devices if d.index in by_index}

    def child_env(self, device: DeviceRef, base: Mapping[str, str]) -> dict[str, str]:
        env = without(base, *PINNING_VARIABLES)
        env["CUDA_VISIBLE_DEVICES"] = str(device.index)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env


__all__ = ["CudaBackend", "NVIDIA_SMI_ARGV", "SmiGpu", "load_nvml", "parse_nvidia_smi"]
