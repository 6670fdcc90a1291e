"""The one typed view of a device and its child, read by everything that reports or decides.

:meth:`rolemesh_node.device_slot.DeviceSlot.snapshot` makes it (with the
device's latest memory figures from the node); the scheduler decides on it,
the inventory, the dispatcher heartbeat and ``/metrics`` report it. Nobody
else reaches into a slot's internals.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Phase(str, enum.Enum):
    """Where a device's child is in its life (the values go on the wire)."""

    IDLE = "idle"  # no child
    STARTING = "starting"  # a child is loading ``model``
    READY = "ready"  # the child serves ``model`` and takes new requests
    DRAINING = "draining"  # the child serves ``model`` but takes no new request: a switch waits for its work
    STOPPING = "stopping"  # the child is being stopped (then ``next_model`` is started, if any)
    FAILED = "failed"  # the last start failed or the child crashed; no child runs


#: phases in which the device holds (or is about to hold) its ``model``
HOLDING = frozenset({Phase.STARTING, Phase.READY})


@dataclass(frozen=True, slots=True)
class Cooldown:
    model: str
    until: float  # Unix time
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "until": self.until, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """A device at one moment: what the scheduler needs, and what operators see."""

    device_id: str
    index: int
    phase: Phase
    model: str | None  # the model the child runs, loads, drains or stops
    next_model: str | None = None  # draining or stopping: the model it switches to next
    in_flight: int = 0
    capacity: int = 1  # max_concurrent_requests_per_device
    slots: int = 1  # llama_server_parallel: requests the child runs at once
    max_pending: int = 2
    free_memory_bytes: int | None = None
    loaded_model_bytes: int | None = None
    cooldown_models: frozenset[str] = frozenset()
    idle_since: float | None = None  # reactor seconds: ready with nothing in flight since then
    #: its clients moved on: since its model's last grant, as many requests for other models
    #: arrived as its requests finished (no need to wait for them to come back)
    clients_left: bool = False
    # reporting only
    waiting: int = 0  # requests waiting node-wide for the model this device holds or switches to
    port: int | None = None
    pid: int | None = None
    started_at: float | None = None
    ready_at: float | None = None
    starts: int = 0
    crashes: int = 0
    switches: int = 0
    last_switch_s: float | None = None
    last_switch_at: float | None = None
    last_exit: str | None = None
    last_error: str | None = None
    stderr_tail: tuple[str, ...] = ()
    cooldowns: tuple[Cooldown, ...] = field(default_factory=tuple)

    @property
    def free_capacity(self) -> int:
        """Requests it can take now (only a ready child takes any)."""
        return max(0, self.capacity - self.in_flight) if self.phase is Phase.READY else 0

    @property
    def destined(self) -> str | None:
        """The model this device serves or is about to serve."""
        if self.phase in HOLDING:
            return self.model
        if self.phase in (Phase.DRAINING, Phase.STOPPING):
            return self.next_model
        return None

    def to_json(self) -> dict[str, Any]:
        """The ``child`` object of the inventory (docs/openapi.yaml ``ChildStatus``)."""
        return {
            "state": self.phase.value,
            "model": self.model,
            "next_model": self.next_model,
            "port": self.port,
            "pid": self.pid,
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "max_pending": self.max_pending,
            "max_concurrent": self.capacity,
            "starts": self.starts,
            "crashes": self.crashes,
            "switches": self.switches,
            "last_switch_s": self.last_switch_s,
            "last_switch_at": self.last_switch_at,
            "last_exit": self.last_exit,
            "last_error": self.last_error,
            "stderr_tail": list(self.stderr_tail),
            "cooldowns": [c.to_json() for c in self.cooldowns],
        }
