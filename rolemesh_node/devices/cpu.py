"""The ``cpu`` backend: always there, memory from the OS.

A CPU-only host can expose several *logical* devices (``cpu_devices: N``), each
with its own child, so placement, queues and switching across devices work the
same as on a multi-GPU host. The logical devices share the host's memory and
split its cores but one: each child gets ``--threads (cores - 1) // N`` (at
least 1). The core left over is the agent's: llama-server's compute threads
spin between tasks, and with as many threads as cores they starve the agent
that relays every request (docs/performance.md measured +0.9 ms per request
and 429s taking 3.6 ms at p99 on 2 cores, against +0.4 ms and 0.4 ms with one
core left).

Reading ``/proc/meminfo`` and ``/proc/stat`` is a few microseconds of kernel
work, so it is done inline; on hosts without ``/proc`` the figures that cannot
be read are ``None``.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Mapping, Sequence

from twisted.internet.defer import Deferred, succeed

from .base import PINNING_VARIABLES, Backend, DeviceMetrics, DeviceRef, without


def _meminfo(path: str = "/proc/meminfo") -> tuple[int | None, int | None]:
    """(total, available) bytes of host memory, or Nones where unknown."""
    try:
        with open(path, "rb") as f:
            fields = {}
            for line in f:
                key, _, rest = line.partition(b":")
                parts = rest.split()
                if parts:
                    fields[key.decode()] = int(parts[0]) * 1024
        return fields.get("MemTotal"), fields.get("MemAvailable", fields.get("MemFree"))
    except (OSError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
        except (ValueError, OSError, AttributeError):
            return None, None


def _cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) jiffies since boot, or None where ``/proc/stat`` is missing."""
    try:
        with open(path, "rb") as f:
            first = f.readline().split()
        values = [int(v) for v in first[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values) - idle, sum(values)
    except (OSError, ValueError, IndexError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", "r", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, count: int = 1, cores: int | None = None) -> None:
        self.count = count
        self.cores = cores or os.cpu_count() or 1
        self._last_times = _cpu_times()

    def discover(self) -> Deferred[list[DeviceRef]]:
        total, _ = _meminfo()
        name = _cpu_name()
        return succeed([
            DeviceRef(backend=self.name, index=i, name=name, memory_total_bytes=total,
                      extra={"threads": self.threads_per_device, "shared_memory": True})
            for i in range(self.count)
        ])

    @property
    def threads_per_device(self) -> int:
        return max(1, (self.cores - 1) // self.count)

    def _utilization(self) -> float | None:
        now = _cpu_times()
        last, self._last_times = self._last_times, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return round(100.0 * (now[0] - last[0]) / (now[1] - last[1]), 1)

    def metrics(self, devices: Sequence[DeviceRef]) -> Deferred[dict[str, DeviceMetrics]]:
        total, free = _meminfo()
        used = total - free if total is not None and free is not None else None
        sample = DeviceMetrics(memory_total_bytes=total, memory_used_bytes=used, memory_free_bytes=free,
                               utilization_pct=self._utilization(), sampled_at=time.time())
        return succeed({d.id: sample for d in devices})

    def child_env(self, device: DeviceRef, base: Mapping[str, str]) -> dict[str, str]:
        env = without(base, *PINNING_VARIABLES)
        # A GPU-enabled llama-server build must not grab an accelerator for a cpu device.
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["HIP_VISIBLE_DEVICES"] = ""
        return env

    def child_args(self, device: DeviceRef) -> list[str]:
        return ["--threads", str(self.threads_per_device), "-ngl", "0"]
