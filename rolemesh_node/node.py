"""The node's state: its backend, devices, device slots and latest metrics.

:class:`Node` is the one object the HTTP layer and the dispatcher link talk
to. It owns no sockets; :mod:`rolemesh_node.service` wires it to the reactor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.logger import Logger

from . import __version__
from .config import ModelSpec, NodeConfig
from .coordinator import Coordinator, Ticket
from .costs import CostBook
from .device_slot import DeviceSlot
from .devices.base import Backend, DeviceMetrics, DeviceRef
from .devices.select import select_backend
from .llama_server import LlamaServerNotFound, find_llama_server
from .model_files import ModelFiles
from .recent import RecentErrors
from .scheduler import SwitchPolicy
from .snapshot import DeviceSnapshot, Phase

log = Logger()


class NotReady(Exception):
    """Device discovery has not finished yet."""


@dataclass(frozen=True, slots=True)
class Serving:
    """Whether the node serves requests now, and if not, why (``GET /ready``).

    ``status`` is ``ready`` or a word for the reason: ``starting``,
    ``no_devices``, ``no_llama_server``, ``draining``, ``stopping``. ``reason`` is for
    people; it names no path or secret (``/ready`` is unauthenticated)."""

    ready: bool
    status: str
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "status": self.status, "reason": self.reason}


class Node:
    def __init__(
        self,
        config: NodeConfig,
        reactor: Any,
        http: Any,
        node_id: str,
        select: Callable[[Any, NodeConfig], Deferred[tuple[Backend, list[DeviceRef]]]] = select_backend,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.http = http
        self.node_id = node_id
        self._select = select
        self.started_at = time.time()
        self._started_monotonic = reactor.seconds()
        self.backend: Backend | None = None
        self.devices: list[DeviceRef] = []
        self.slots: dict[str, DeviceSlot] = {}
        self.metrics: dict[str, DeviceMetrics] = {}
        self.discovered = False
        self.stopping = False
        #: set while the node drains before stopping (rolemesh_node.drain): new requests get 503
        self.draining: Any = None
        self.bin_error: str | None = None
        self._bin: str | None = None
        self._discovery: Deferred[Any] | None = None
        self.files = ModelFiles(config.models.values())
        self.costs = CostBook()
        self.coordinator = Coordinator(
            reactor=reactor, models=config.models, policy=SwitchPolicy(config.max_switch_wait_s),
            max_pending=config.max_pending_requests_per_device, slots=self.slots, snapshots=self.snapshots,
            sizes=self.sizes, costs=self.costs)
        #: the last errors (failed starts, crashes, 5xx answers), for the status page
        self.errors = RecentErrors()
        #: heard by every slot, also those made later (metrics add theirs before discovery ends)
        self.slot_listeners: list[Callable[[str, dict[str, Any]], None]] = [self.coordinator.slot_event,
                                                                            self._rollout_event, self._note_error]
        self._rollout_pending = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Deferred[Any]:
        """Discover devices and make their slots; fires when done."""
        try:
            self._bin = find_llama_server(self.config.llama_server_bin)
            log.info("using llama-server at {path}", path=self._bin)
        except LlamaServerNotFound as exc:
            self.bin_error = str(exc)
            log.error("{error}; requests will be answered 503 until it is installed", error=self.bin_error)
        self._discovery = self._discover()
        return self._discovery

    @inlineCallbacks
    def _discover(self) -> Any:
        backend, devices = yield self._select(self.reactor, self.config)
        self.backend = backend
        self.devices = devices
        for device in devices:
            self.slots[device.id] = DeviceSlot(
                device=device, backend=backend, config=self.config, reactor=self.reactor, http=self.http,
                bin_path=self.bin_path, listeners=self.slot_listeners, file_version=self.files.version)
        self.discovered = True
        if not devices:
            log.error("no devices found for backend {backend}; nothing can be served", backend=backend.name)
        yield self.refresh_metrics()

    def bin_path(self) -> str:
        """The llama-server binary (looked up again if it was missing at start)."""
        if self._bin is None:
            self._bin = find_llama_server(self.config.llama_server_bin)
            self.bin_error = None
        return self._bin

    @inlineCallbacks
    def refresh_metrics(self) -> Any:
        """Sample every device once (never fails; a failed sample keeps the last one);
        look at the model files again (a file replaced on disk restarts its children)."""
        changed = self.files.refresh()
        if changed:
            log.info("model file(s) of {models} changed on disk; their children restart once their requests in "
                     "flight are done", models=", ".join(changed))
            self.roll_out()
        if self.backend is None or not self.devices:
            return
        try:
            sample = yield self.backend.metrics(self.devices)
        except Exception as exc:
            log.warn("reading device metrics failed: {error}", error=exc)
            return
        self.metrics.update(sample)

    def stop(self) -> Deferred[Any]:
        """Refuse the waiting requests and stop every child; fires when all have exited
        (then the device logs are closed: their followers end, their files are closed)."""
        self.stopping = True
        if self._discovery is not None and not self._discovery.called:
            self._discovery.cancel()
        self.coordinator.stop()
        stopped = DeferredList([slot.stop() for slot in self.slots.values()], consumeErrors=True)
        return stopped.addBoth(self._close_logs)

    def _close_logs(self, result: Any) -> Any:
        for slot in self.slots.values():
            slot.output.close()
        return result

    def _note_error(self, event: str, fields: dict[str, Any]) -> None:
        slot = self.slots.get(fields.get("device", ""))
        self.errors.slot_event(event, fields, None if slot is None else slot.last_error)

    def serving(self) -> Serving:
        """Does the node serve requests now? The one place that decides
        ``/ready``: a new reason not to serve (draining…) is one more check here."""
        if self.stopping:
            return Serving(False, "stopping", "the node is stopping")
        if self.draining is not None:
            return Serving(False, "draining", "the node is draining before it stops")
        if not self.discovered:
            return Serving(False, "starting", "device discovery has not finished")
        if not self.devices:
            return Serving(False, "no_devices", "no device was found (see the log)")
        if self.bin_error is not None:
            try:
                self.bin_path()  # installed since? (it is looked up again on every ask until found)
            except LlamaServerNotFound:
                return Serving(False, "no_llama_server", "llama-server was not found (see /v1/node/inventory)")
        return Serving(True, "ready")

    # ------------------------------------------------------------ reload

    def apply_config(self, config: NodeConfig) -> None:
        """Serve ``config`` from now on (a reload; the caller chose which keys may change).

        Added models can be asked for at once; requests waiting for a removed one get 503
        ``model_removed`` and its children stop once their requests in flight are done; limits
        apply to new requests. Children whose command line changed (model settings, the child
        settings) restart after their requests in flight, one device at a time
        (:meth:`roll_out`); every other child is left alone."""
        old = self.config
        self.config = config
        if config.llama_server_bin != old.llama_server_bin:
            self._bin = None  # looked up again (the reload checked that it is found)
            try:
                self.bin_path()
            except LlamaServerNotFound as exc:
                self.bin_error = str(exc)
        self.files.set_specs(config.models.values())
        self.coordinator.set_models(config.models, SwitchPolicy(config.max_switch_wait_s),
                                    config.max_pending_requests_per_device)
        for slot in self.slots.values():
            slot.apply_config(config)
            slot.reconcile(restart=False)  # removed models: all at once
        self.roll_out()

    def roll_out(self) -> None:
        """Restart the stale children (:meth:`DeviceSlot.stale`), one device at a time."""
        self._rollout_pending = True
        self._roll()

    def _rollout_event(self, event: str, fields: dict[str, Any]) -> None:
        if self._rollout_pending and event in ("ready", "failed", "crash", "stopped"):
            self._roll()

    def _roll(self) -> None:
        if self.stopping or self.draining is not None:
            return
        slots = list(self.slots.values())
        if any(slot.restarting or slot.phase is Phase.STARTING for slot in slots):
            return  # one at a time: the next once this one is ready again (or failed)
        for slot in slots:
            if slot.stale():
                slot.reconcile()
                if slot.restarting:
                    return
        self._rollout_pending = any(slot.stale() for slot in slots)

    # ------------------------------------------------------------ scheduling

    def sizes(self) -> dict[str, int | None]:
        """Each model's file size (as last looked at)."""
        return {name: self.files.size_bytes(spec) for name, spec in self.config.models.items()}

    def snapshots(self) -> list[DeviceSnapshot]:
        """The one view of every device, read by the scheduler and every report."""
        out = []
        for slot in self.slots.values():
            metrics = self.metrics.get(slot.id)
            loaded = self.config.models.get(slot.model) if slot.model else None
            out.append(slot.snapshot(
                waiting=self.coordinator.waiting(slot.destined or slot.model or ""),
                free_memory_bytes=None if metrics is None else metrics.memory_free_bytes,
                loaded_model_bytes=None if loaded is None else self.files.size_bytes(loaded)))
        return out

    def waiting_by_model(self) -> dict[str, int]:
        """Requests waiting for a device, per model that has any."""
        return self.coordinator.queue_counts()

    def submit(self, model: ModelSpec) -> Ticket:
        """A place for one request (raises NotReady, NoDevice or Rejected)."""
        if not self.discovered:
            raise NotReady("device discovery has not finished")
        return self.coordinator.submit(model.name)

    # ------------------------------------------------------------ reporting

    def model_state(self, spec: ModelSpec, snapshots: list[DeviceSnapshot] | None = None) -> dict[str, Any]:
        """Where ``spec`` stands on this node: ``state``, ``available``, ``loaded_on``, and ``cooldown``
        (when it is in crash cooldown on some device: until when, why, where).

        ``cooldown`` is the state when it is in cooldown on every device and
        loaded on none: requests for it get 503 ``no_device`` until ``until``."""
        if snapshots is None:
            snapshots = self.snapshots()
        devices = [s.device_id for s in snapshots
                   if s.model == spec.name and s.phase in (Phase.READY, Phase.DRAINING)]
        starting = any(s.model == spec.name and s.phase is Phase.STARTING for s in snapshots)
        cooling = [(c, s.device_id) for s in snapshots for c in s.cooldowns if c.model == spec.name]
        available, _ = self.files.check(spec)
        if not available:
            state = "unavailable"
        elif devices:
            state = "loaded"
        elif starting:
            state = "loading"
        elif cooling and len({dev for _, dev in cooling}) == len(snapshots):
            state = "cooldown"
        else:
            state = "available"
        doc: dict[str, Any] = {"state": state, "available": available, "loaded_on": devices}
        if cooling:
            first = min(cooling, key=lambda item: item[0].until)[0]
            doc["cooldown"] = {"until": first.until, "reason": first.reason,
                               "devices": sorted(dev for _, dev in cooling)}
        return doc

    def model_json(self, spec: ModelSpec, snapshots: list[DeviceSnapshot] | None = None) -> dict[str, Any]:
        """One model, OpenAI style (``object: model``), with its state here."""
        entry = {
            "id": spec.name,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "rolemesh-node",
            "aliases": list(spec.aliases),
            "embedding": spec.embedding,
            **self.model_state(spec, snapshots),
        }
        if not entry["available"]:
            entry["reason"] = f"model file {spec.path} is missing or unreadable"
        return entry

    def models_json(self) -> dict[str, Any]:
        snapshots = self.snapshots()
        return {"object": "list", "data": [self.model_json(spec, snapshots) for spec in self.config.models.values()]}

    def uptime_s(self) -> float:
        return self.reactor.seconds() - self._started_monotonic

    def devices_json(self, snapshot_list: list[DeviceSnapshot] | None = None) -> list[dict[str, Any]]:
        """Each device: its static facts, latest metrics and child (the inventory's ``devices``)."""
        if snapshot_list is None:
            snapshot_list = self.snapshots()
        snapshots = {snap.device_id: snap for snap in snapshot_list}
        devices = []
        for device in self.devices:
            metrics = self.metrics.get(device.id)
            snap = snapshots.get(device.id)
            devices.append({
                **device.to_json(),
                "metrics": None if metrics is None else metrics.to_json(),
                "child": None if snap is None else snap.to_json(),
            })
        return devices

    def status_json(self, link: Any = None) -> dict[str, Any]:
        """What the status page shows, in one document (``GET /v1/node/status``); ``link``: the dispatcher link."""
        waiting = self.coordinator.queue_json()
        service = self.costs.service_table()
        snapshot_list = self.snapshots()
        models = []
        for spec in self.config.models.values():
            queued = waiting.get(spec.name, {})
            state = self.model_state(spec, snapshot_list)
            models.append({
                "name": spec.name,
                "state": state["state"],
                "loaded_on": state["loaded_on"],
                "waiting": queued.get("waiting", 0),
                "oldest_wait_s": queued.get("oldest_wait_s"),
                "service_s": service.get(spec.name, {}).get("seconds"),
            })
        return {
            "node_id": self.node_id,
            "version": __version__,
            "time": time.time(),
            "uptime_s": round(self.uptime_s(), 3),
            "backend": None if self.backend is None else self.backend.name,
            "serving": self.serving().to_json(),
            "llama_server_error": self.bin_error,
            "dispatcher": None if link is None else {"state": link.state.value},
            "devices": self.devices_json(snapshot_list),
            "models": models,
            "switch_costs": self.costs.switch_table(),
            "errors": self.errors.to_json(),
        }

    def inventory_json(self) -> dict[str, Any]:
        snapshot_list = self.snapshots()
        devices = self.devices_json(snapshot_list)
        service = self.costs.service_table()
        models = []
        for spec in self.config.models.values():
            models.append({
                "name": spec.name,
                "path": str(spec.path),
                "size_bytes": spec.size_bytes(),
                "ctx_size": spec.ctx_size,
                "aliases": list(spec.aliases),
                "embedding": spec.embedding,
                "ttl_s": spec.ttl_s,
                "waiting": self.coordinator.waiting(spec.name),
                "service_s": service.get(spec.name, {}).get("seconds"),
                **self.model_state(spec, snapshot_list),
            })
        return {
            "node_id": self.node_id,
            "version": __version__,
            "started_at": self.started_at,
            "uptime_s": round(self.uptime_s(), 3),
            "backend": None if self.backend is None else self.backend.name,
            "discovered": self.discovered,
            "llama_server_bin": self._bin,
            "llama_server_error": self.bin_error,
            "limits": {
                "max_pending_requests_per_device": self.config.max_pending_requests_per_device,
                "max_concurrent_requests_per_device": self.config.max_concurrent_requests_per_device,
                "max_request_body_bytes": self.config.max_request_body_bytes,
                "max_switch_wait_s": self.config.max_switch_wait_s,
            },
            "devices": devices,
            "models": models,
            "switch_costs": self.costs.switch_table(),
        }
