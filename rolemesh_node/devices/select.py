"""Pick the backend for this host and the devices to use.

``backend: auto`` tries the accelerator backends in a fixed order — cuda, rocm,
sycl, vulkan, metal — and takes the first that finds a device; a host with none
falls back to ``cpu``. A named backend is used as it is (no devices when its
driver is missing, said in one log line). ``devices: [..]`` keeps only those
indices.
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from ..config import NodeConfig
from .base import Backend, DeviceRef
from .cpu import CpuBackend

log = Logger()

#: backend name -> (module, class); each class is built as ``Cls(reactor, config)``
ACCELERATORS: dict[str, tuple[str, str]] = {
    "cuda": ("rolemesh_node.devices.cuda", "CudaBackend"),
    "rocm": ("rolemesh_node.devices.rocm", "RocmBackend"),
    "sycl": ("rolemesh_node.devices.sycl", "SyclBackend"),
    "vulkan": ("rolemesh_node.devices.vulkan", "VulkanBackend"),
    "metal": ("rolemesh_node.devices.metal", "MetalBackend"),
}
AUTO_ORDER: Sequence[str] = ("cuda", "rocm", "sycl", "vulkan", "metal")


def make_backend(name: str, reactor: Any, config: NodeConfig) -> Backend:
    """Build the backend called ``name`` (not ``auto``)."""
    if name == "cpu":
        return CpuBackend(count=config.cpu_devices)
    module, cls = ACCELERATORS[name]
    return getattr(importlib.import_module(module), cls)(reactor, config)


def filter_devices(devices: Sequence[DeviceRef], wanted: Sequence[int] | None) -> list[DeviceRef]:
    """Keep the devices whose index is in ``wanted`` (all when None); log the missing ones."""
    if wanted is None:
        return list(devices)
    present = {d.index for d in devices}
    missing = [i for i in wanted if i not in present]
    if missing:
        log.warn("configured devices {missing} not found; present: {present}",
                 missing=missing, present=sorted(present))
    return [d for d in devices if d.index in wanted]


@inlineCallbacks
def select_backend(reactor: Any, config: NodeConfig) -> Deferred[tuple[Backend, list[DeviceRef]]]:
    """Fire with (backend, devices) for this host, following ``config.backend``."""
    names = AUTO_ORDER if config.backend == "auto" else (config.backend,)
    for name in names:
        backend = make_backend(name, reactor, config)
        try:
            devices = yield backend.discover()
        except Exception as exc:  # a backend must not fail discovery, but never trust it
            log.warn("backend {backend}: discovery failed: {error}", backend=name, error=exc)
            devices = []
        if devices or config.backend != "auto":
            chosen = filter_devices(devices, config.devices)
            log.info("backend {backend}: {count} device(s): {ids}", backend=name,
                     count=len(chosen), ids=[d.id for d in chosen])
            return backend, chosen
    backend = make_backend("cpu", reactor, config)
    devices = yield backend.discover()
    chosen = filter_devices(devices, config.devices)
    log.info("backend auto: no accelerator found, using cpu with {count} device(s)", count=len(chosen))
    return backend, chosen
