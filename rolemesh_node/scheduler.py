"""The scheduling policy: which waiting request goes to which device, and when a device switches model.

A pure function, :func:`decide`, of the moment: the requests waiting per model
(oldest first), one :class:`~rolemesh_node.snapshot.DeviceSnapshot` per
device, the measured costs (:class:`~rolemesh_node.costs.CostBook`) and the
:class:`SwitchPolicy`. Its answer is data — a :class:`Plan` of
:class:`Serve`, :class:`Switch` and :class:`Refuse` decisions and the time at
which it must be asked again — which :mod:`rolemesh_node.coordinator` carries
out. The steps, in order (also in ``docs/architecture.md``):

0. **Refuse** a model that no device can take (crash cooldown everywhere, or
   its file does not fit in any device's memory).
1. A device that has **drained** (draining, nothing in flight) switches to the
   model it drained for, if requests still wait for it; else it resumes its
   own model if that has waiters; else it is free.
2. **Free devices** (no child, a failed one, or a ready child whose model has
   had nothing waiting and nothing in flight for as long as the switch would
   cost — rent or buy: a client of the old model that comes back sooner would
   cost a second switch — unless its clients have visibly moved on: since its
   last request was granted, as many requests for other models arrived as its
   requests finished) are given to the waiting models that no device
   holds, oldest waiting request first; an empty device before one that would
   lose a loaded model, then the cheapest measured switch.
3. **Grouping.** Every ready device that is not switching serves the oldest
   requests for its model, up to its free capacity; requests for a model held
   by several devices go to the one with the most room. (Before step 4, so a
   device that has just loaded a model serves one round of its waiting
   requests before it can be drained again: a load is never wasted.)
4. **Bounded wait.** A waiting model that no device holds is *overdue* once
   it has waited ``max_switch_wait_s`` (counted from its oldest request's
   arrival, or from when the model lost its last device if that is later: a
   request that queued behind its own model's requests did not wait for a
   switch). An overdue model takes the ready device with the least work in
   flight (then the cheapest switch): that device admits nothing more and
   switches once its work in flight is done. Models become overdue in the
   order their requests arrived, so with two models per device a request
   waits at most ``max_switch_wait_s`` + one drain + one switch before its
   model is served.
5. **Replicas.** A model whose remaining requests would wait longer on the
   devices that hold it (remaining × service time ÷ their slots) than a load
   costs on a free device gets that device too (one more per plan). Before
   any request of the model has finished (no service time yet), an empty
   device loads it when more requests wait than its holders can take now.

Nothing here reads a clock or touches a device; the unit tests and the
simulator (``bench/simsched.py``) drive it on a ``Clock``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from .costs import CostBook
from .snapshot import DeviceSnapshot, Phase


class WaitingRequest(Protocol):
    arrived: float  # reactor seconds


@dataclass(frozen=True, slots=True)
class ModelQueue:
    """The requests waiting for one model, oldest first."""

    requests: Sequence[Any]  # WaitingRequest
    #: when the model last had no device holding it (None: a device holds it)
    uncovered_since: float | None = None


@dataclass(frozen=True, slots=True)
class SwitchPolicy:
    """How long a waiting model may wait for a device before one switches to it.

    ``max_switch_wait_s`` set: that. Unset: ``multiple`` × (the model's measured
    switch cost + the longest measured service time, which bounds the drain
    before the switch), kept within [``floor_s``, ``ceiling_s``] (``floor_s``
    while nothing is measured): the drain and the switch then take at most
    1/``multiple`` of the time a device spends on a model while another waits.
    """

    max_switch_wait_s: float | None = None
    multiple: float = 5.0
    floor_s: float = 1.0
    ceiling_s: float = 60.0
    min_grace_s: float = 0.005
    unknown_grace_s: float = 0.05

    def max_wait(self, model: str, costs: CostBook, sizes: Mapping[str, int | None] | None = None) -> float:
        if self.max_switch_wait_s is not None:
            return self.max_switch_wait_s
        switch = costs.switch_s(model, None, sizes)
        if switch is None:
            return self.floor_s
        drain = costs.max_service_s() or 0.0
        return min(self.ceiling_s, max(self.floor_s, self.multiple * (switch + drain)))


    def grace(self, model: str, device: str, costs: CostBook, sizes: Mapping[str, int | None] | None = None) -> float:
        """How long a ready device must idle on its model before it loads ``model`` instead.

        As long as the switch costs (the rent-or-buy rule: a request for the old
        model that comes back sooner would have paid a second switch), at least
        ``min_grace_s`` (``unknown_grace_s`` while nothing is measured), at most
        the bounded wait.
        """
        estimate = costs.switch_s(model, device, sizes)
        grace = self.unknown_grace_s if estimate is None else max(self.min_grace_s, estimate)
        return min(grace, self.max_wait(model, costs, sizes))


@dataclass(frozen=True, slots=True)
class Serve:
    """Send ``request`` to ``device`` now (it is ready for its model and has room)."""

    request: Any
    device: str


@dataclass(frozen=True, slots=True)
class Switch:
    """Make ``device`` serve ``model``.

    ``reason``: ``load`` (a free device for a model nobody holds), ``overdue``
    (the bounded wait ran out; the device drains first), ``replica`` (a hot
    model on one more device), ``drained`` (the drain it waited for is done),
    ``resume`` (a draining device takes its own model again).
    """

    device: str
    model: str
    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """No device can serve ``model``: its waiting requests get 503 with ``reasons``."""

    model: str
    reasons: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Plan:
    decisions: tuple[Serve | Switch | Refuse, ...] = ()
    #: when a waiting model becomes overdue: ask again then (None: nothing to wait for)
    wake_at: float | None = None

    @property
    def switches(self) -> tuple[Switch, ...]:
        return tuple(d for d in self.decisions if isinstance(d, Switch))


def unable_reason(model: str, device: DeviceSnapshot, size: int | None) -> str | None:
    """Why ``device`` cannot take ``model`` (None: it can)."""
    if model in device.cooldown_models:
        return "model is in crash cooldown here"
    if device.model == model and device.phase in (Phase.STARTING, Phase.READY, Phase.DRAINING):
        return None  # holds it (or is loading it): fits by definition
    if size is None or device.free_memory_bytes is None:
        return None  # unknown never excludes
    reclaim = 0
    if device.model is not None and device.model != model and device.loaded_model_bytes is not None:
        reclaim = device.loaded_model_bytes
    if size > device.free_memory_bytes + reclaim:
        return f"model needs {size} bytes, {device.free_memory_bytes} free"
    return None


class _Planner:
    """One call of :func:`decide`: the state the steps share."""

    def __init__(self, now: float, waiting: Mapping[str, ModelQueue], devices: Sequence[DeviceSnapshot],
                 costs: CostBook, policy: SwitchPolicy, sizes: Mapping[str, int | None]) -> None:
        self.now = now
        self.waiting = waiting
        self.devices = devices
        self.costs = costs
        self.policy = policy
        self.sizes = sizes
        self.out: list[Serve | Switch | Refuse] = []
        self.taken: dict[str, int] = {}
        self.claimed: dict[str, str] = {}
        self.served: dict[str, int] = {}  # device -> requests this plan sends it
        self.refused: set[str] = set()
        self.dest: dict[str, str | None] = {
            d.device_id: None if d.phase is Phase.DRAINING and d.in_flight == 0 else d.destined for d in devices}
        self.wake_at: float | None = None

    # ---------------------------------------------------------------- helpers

    def left(self, model: str | None) -> int:
        if model is None:
            return 0
        queue = self.waiting.get(model)
        return 0 if queue is None else len(queue.requests) - self.taken.get(model, 0)

    def covered(self, model: str) -> bool:
        return model in self.dest.values()

    def able(self, model: str, device: DeviceSnapshot) -> bool:
        return unable_reason(model, device, self.sizes.get(model)) is None

    def free(self, device: DeviceSnapshot, model: str) -> bool:
        """Can be given ``model`` without draining anything (and without thrashing)."""
        if device.device_id in self.claimed:
            return False
        if device.phase in (Phase.IDLE, Phase.FAILED):
            return True
        if device.phase not in (Phase.READY, Phase.DRAINING) or device.in_flight or self.left(device.model):
            return False
        if device.phase is Phase.DRAINING or device.idle_since is None or device.clients_left:
            return True
        free_at = device.idle_since + self.policy.grace(model, device.device_id, self.costs, self.sizes)
        if self.now >= free_at:
            return True
        self.wake(free_at)
        return False

    def wake(self, at: float) -> None:
        self.wake_at = at if self.wake_at is None else min(self.wake_at, at)

    def cost(self, model: str, device: DeviceSnapshot) -> float:
        estimate = self.costs.switch_s(model, device.device_id, self.sizes)
        return float("inf") if estimate is None else estimate

    def claim(self, device: DeviceSnapshot, model: str, reason: str) -> None:
        self.claimed[device.device_id] = model
        self.dest[device.device_id] = model
        self.out.append(Switch(device.device_id, model, reason))

    def waiting_models(self) -> list[str]:
        """Models with requests left, oldest request first."""
        models = [m for m, q in self.waiting.items() if self.left(m) > 0 and m not in self.refused]
        models.sort(key=lambda m: self.waiting[m].requests[self.taken.get(m, 0)].arrived)
        return models

    # ------------------------------------------------------------------ steps

    def refuse_impossible(self) -> None:
        for model in list(self.waiting):
            if not self.left(model):
                continue
            reasons: dict[str, str] = {}
            for device in self.devices:
                why = unable_reason(model, device, self.sizes.get(model))
                if why is None:
                    break
                reasons[device.device_id] = why
            else:
                self.refused.add(model)
                self.out.append(Refuse(model, reasons))

    def settle_drained(self) -> None:
        for device in self.devices:
            if device.phase is not Phase.DRAINING or device.in_flight:
                continue
            target = device.next_model
            if target is not None and self.left(target) and self.able(target, device):
                self.claim(device, target, "drained")
            elif device.model is not None and self.left(device.model):
                self.claim(device, device.model, "resume")

    def load_free_devices(self) -> None:
        for model in self.waiting_models():
            if self.covered(model):
                continue
            candidates = [d for d in self.devices if self.able(model, d) and self.free(d, model)]
            if candidates:
                best = min(candidates, key=lambda d: (
                    0 if d.phase in (Phase.IDLE, Phase.FAILED) else 1, self.cost(model, d),
                    -(d.free_memory_bytes if d.free_memory_bytes is not None else -1), d.index))
                self.claim(best, model, "load")

    def switch_overdue(self) -> None:
        for model in self.waiting_models():
            if self.covered(model):
                continue
            queue = self.waiting[model]
            since = queue.requests[self.taken.get(model, 0)].arrived
            if queue.uncovered_since is not None:
                since = max(since, queue.uncovered_since)
            due = since + self.policy.max_wait(model, self.costs, self.sizes)
            if self.now < due:
                self.wake(due)
                continue
            candidates = [d for d in self.devices if d.device_id not in self.claimed and d.phase is Phase.READY
                          and self.able(model, d)]
            if candidates:
                best = min(candidates, key=lambda d: (d.in_flight + self.served.get(d.device_id, 0),
                                                      self.cost(model, d), d.index))
                self.claim(best, model, "overdue")

    def serve_holders(self) -> None:
        room: dict[str, int] = {}
        holders: dict[str, list[DeviceSnapshot]] = {}
        for d in self.devices:
            if d.phase is Phase.READY and d.device_id not in self.claimed and d.free_capacity and d.model:
                room[d.device_id] = d.free_capacity
                holders.setdefault(d.model, []).append(d)
        for model, devices in holders.items():
            queue = self.waiting.get(model)
            if queue is None or model in self.refused:
                continue
            while self.left(model) and devices:
                best = max(devices, key=lambda d: (room[d.device_id], -d.index))
                taken = self.taken.get(model, 0)
                self.out.append(Serve(queue.requests[taken], best.device_id))
                self.served[best.device_id] = self.served.get(best.device_id, 0) + 1
                self.taken[model] = taken + 1
                room[best.device_id] -= 1
                if not room[best.device_id]:
                    devices.remove(best)

    def add_replicas(self) -> None:
        for model in self.waiting_models():
            holders = [d for d in self.devices if self.dest[d.device_id] == model]
            if not holders:
                continue
            candidates = [d for d in self.devices if self.able(model, d) and self.free(d, model)]
            if not candidates:
                continue
            best = min(candidates, key=lambda d: (d.phase is not Phase.IDLE, self.cost(model, d), d.index))
            service = self.costs.service_s(model)
            if service is not None:
                expected_wait = self.left(model) * service / sum(d.slots for d in holders)
                worth = expected_wait > self.cost(model, best)
            else:
                # nothing measured yet (a cold burst): an empty device loads it too when more wait
                # than its holders can take now (a starting one takes its capacity once ready; a
                # ready one was given what it has room for above)
                starting = sum(d.capacity for d in holders
                               if d.phase is Phase.STARTING or d.device_id in self.claimed)  # loads it now
                worth = best.phase is Phase.IDLE and self.left(model) > starting
            if worth:
                self.claim(best, model, "replica")


def decide(now: float, waiting: Mapping[str, ModelQueue], devices: Sequence[DeviceSnapshot], costs: CostBook,
           policy: SwitchPolicy, sizes: Mapping[str, int | None] | None = None) -> Plan:
    """What to do now (see the module docstring for the steps)."""
    if not any(q.requests for q in waiting.values()):
        return Plan()
    planner = _Planner(now, waiting, devices, costs, policy, sizes or {})
    planner.refuse_impossible()
    planner.settle_drained()
    planner.load_free_devices()
    planner.serve_holders()
    planner.switch_overdue()
    planner.add_replicas()
    return Plan(tuple(planner.out), planner.wake_at)


def estimate_wait_s(model: str, waiting: int, devices: Sequence[DeviceSnapshot], costs: CostBook,
                    policy: SwitchPolicy, sizes: Mapping[str, int | None] | None = None) -> float:
    """How long a new request for ``model`` can expect to wait (for ``Retry-After``)."""
    service = costs.service_s(model) or 0.0
    holders = [d for d in devices if d.destined == model]
    slots = sum(d.slots for d in holders)
    if slots:
        wait = (waiting + 1) * service / slots
        if not any(d.phase is Phase.READY for d in holders):
            wait += costs.switch_s(model, holders[0].device_id, sizes) or 0.0
        return wait
    # nobody holds it: at worst the bounded wait, a drain and a load
    switch = costs.switch_s(model, None, sizes) or 0.0
    return policy.max_wait(model, costs, sizes) + service + switch + waiting * service
