"""``ToolBackend``: what the accelerator backends share.

Each accelerator backend reads its vendor's tool first (NVML, amd-smi, sycl-ls…)
and, when that is missing, falls back to ``llama-server --list-devices``. This
base class holds the wiring (reactor, config, injectable tool runner, tool
timeout, once-only log notes) and the fallback path, so each backend only
writes its vendor-specific parts.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from ..config import NodeConfig
from .base import Backend, DeviceMetrics, DeviceRef
from .listdevices import DeviceLister, ParsedDevice, of_backend, to_refs
from .parsing import match_by_name
from .probe import Notes, Runner, describe, tool_env
from .tools import ToolError, run_tool


class ToolBackend(Backend):
    """A backend that reads external tools through an injectable runner."""

    #: extra environment for this backend's ``--list-devices`` runs
    list_devices_env: ClassVar[Mapping[str, str]] = {}

    def __init__(self, reactor: Any, config: NodeConfig | None = None, *, run: Runner = run_tool) -> None:
        self.reactor = reactor
        self.config = config if config is not None else NodeConfig()
        self.run = run
        self.timeout_s = self.config.device_tool_timeout_s
        self.log = Logger(namespace=f"rolemesh_node.devices.{self.name}")
        self.notes = Notes(self.log)
        self.lister = DeviceLister(reactor, self.config, run=run, extra_env=self.list_devices_env)
        #: what discovery read: a tool name, "list-devices", or None before/without devices
        self.source: str | None = None

    # -- tools -------------------------------------------------------------

    def tool(self, argv: Sequence[str], extra_env: Mapping[str, str] | None = None) -> Deferred[bytes]:
        """Run a vendor tool with the tool timeout and a pinning-free environment."""
        return self.run(self.reactor, list(argv), self.timeout_s, tool_env(extra_env))

    # -- the --list-devices fallback ------------------------------------------

    def refs_from_list(self, parsed: Sequence[ParsedDevice]) -> list[DeviceRef]:
        """DeviceRefs for devices only llama-server reported (override to add pinning data)."""
        return to_refs(parsed, self.name)

    @inlineCallbacks
    def discover_from_list(self, reasons: list[str]) -> Deferred[list[DeviceRef]]:
        """Devices from ``--list-devices``; one log line either way, naming every reason."""
        try:
            parsed = yield self.lister.get(fresh=True)
        except ToolError as exc:
            reasons.append(f"llama-server --list-devices: {exc.reason}")
            parsed = []
        refs = self.refs_from_list(parsed)
        if refs:
            self.source = "list-devices"
            self.log.info("{backend}: vendor tools unavailable ({reasons}); using llama-server --list-devices",
                          backend=self.name, reasons="; ".join(reasons))
        else:
            if not any(r.startswith("llama-server") for r in reasons):
                reasons.append(f"llama-server --list-devices: no {self.name} device")
            self.log.info("{backend}: no devices ({reasons})", backend=self.name, reasons="; ".join(reasons))
        return refs

    @inlineCallbacks
    def metrics_from_list(self, devices: Sequence[DeviceRef]) -> Deferred[dict[str, DeviceMetrics]]:
        """Memory figures from ``--list-devices`` (cached briefly); {} when it cannot run."""
        if not devices:
            return {}
        try:
            parsed = yield self.lister.get()
        except ToolError as exc:
            self.notes.warn("list-devices", "{backend}: cannot read device memory: {error}",
                            backend=self.name, error=describe(exc))
            return {}
        self.notes.clear("list-devices")
        entries = of_backend(parsed, self.name)
        by_name = {p.name: p for p in entries}
        out: dict[str, DeviceMetrics] = {}
        unnamed = []
        for dev in devices:
            entry = by_name.get(str(dev.extra.get("llama_device", "")))
            if entry is not None:
                out[dev.id] = entry.metrics()
            else:
                unnamed.append(dev)
        if unnamed:
            taken = {str(d.extra.get("llama_device")) for d in devices}
            rest = [(p, p.description) for p in entries if p.name not in taken]
            for dev_id, entry in match_by_name([(d.id, d.name) for d in unnamed], rest).items():
                out[dev_id] = entry.metrics()
        return out


__all__ = ["ToolBackend"]
