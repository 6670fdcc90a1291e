"""The scheduler on a simulated clock: the real policy against the old ones, on the same traces.

Run from the repository root::

    .venv/bin/python -m bench.simsched              # every trace, every policy: a markdown table
    .venv/bin/python -m bench.simsched --json       # the same figures as JSON
    .venv/bin/python -m bench.simsched --trace a --seeds 1,2,3
    .venv/bin/python -m bench.simsched --trace e2,e4 # the closed-loop traces (see below)
    .venv/bin/python -m bench.simsched --check      # a quick self-check of the simulator (exit 1 on a failure)

**What is real.** The ``new`` policy is the node's own code: a
:class:`rolemesh_node.coordinator.Coordinator` (and through it
:func:`rolemesh_node.scheduler.decide`, :class:`~rolemesh_node.costs.CostBook`,
:class:`~rolemesh_node.scheduler.SwitchPolicy`) on a
:class:`twisted.internet.task.Clock`, wired as :class:`rolemesh_node.node.Node`
wires it: ``coordinator.slot_event`` hears every slot. Only the device slots are
simulated (:class:`SimSlot`): the interface the coordinator uses (``phase``,
``model``, ``destined``, ``state``, ``inflight``, ``capacity``, ``grant``,
``switch_to``, ``snapshot``, listener events ``start``/``ready``/``failed``/
``released``) with a simulated child: a stop takes ``stop_s``, a load the
model's ``load_s``; ``slots`` requests run at once, one more (``capacity`` =
slots + 1, the node's default) waits inside the child; a request runs for
tokens ÷ the model's tokens per second per slot. ``--fail-rate`` makes loads fail.

**Baselines**, on the same simulated slots and traces:

* ``fifo`` — the first wave: a request is bound to a device on arrival (a device
  that holds or loads its model and has room first — room being the old default
  ``max_pending_requests_per_device``, slots + 2 — then the most free memory, the
  least pressure, a device with nothing loaded, the lowest index; where no device
  has room it queues on the least pressed one instead of the old 429), and each
  device serves its queue strictly FIFO: the head goes when the device has room
  and either runs the head's model or has nothing in flight (then it switches).
* ``reorder`` — reordering only (what llama-swap does): the same binding on
  arrival; a device serves every request waiting for its current model before
  any other; it switches, to the model of its oldest request, only when none
  waits for the current one and nothing is in flight. No bound on a wait.

**Traces** (fixed seeds; Poisson arrivals for ``--duration`` s, then the queued
work may finish for up to ``--drain`` s more; output lengths 32 + an exponential
of mean 200 tokens, at most 1,024). Model classes: ``8b`` loads in 4 s and makes
60 tokens/s per slot, ``14b`` 8 s and 40 tokens/s, ``70b`` 25 s and 20 tokens/s;
4 slots per device; stopping a child takes 0.5 s; devices have 80 GB.

* ``a`` — two 8B models 50/50 on one device, at 80 % of its one-model capacity;
* ``b`` — four models (8B, 14B, 8B, 70B) with Zipf(1) popularity on two devices,
  at 60 % of their capacity (no switch counted);
* ``c`` — a steady mix of three models (8B, 8B, 14B) at 40 % of two devices, and
  a burst of 10× the first model's rate for 30 s from t = 150 s;
* ``d`` — one 8B model on two devices, at 80 % of their capacity;
* ``e``, ``eN`` (not run by default) — closed loop, :mod:`bench.sched_real`'s
  "split" scenario in miniature: two tiny models on one ``-np 1`` device
  (capacity 2; a start takes 35 ms, a stop 5 ms, a request 3.5 ms), two clients
  on each model, each sending its next request N ms (default 2) after its
  answer. ``--trace e1,e2,e3,e4,e6`` shows what happens once a client's
  turnaround exceeds the service time of the request waiting inside the child.

**Figures** per (trace, policy): goodput (requests and tokens completed within
the arrival window, per second of it), latency p50/p99 from arrival to
completion (over every request that arrived; one still unfinished at the end
counts with its wait so far, shown as "≥"), switches (loads of another model
than the device's last) per completed request, wasted loads (a load after which
the device served nothing before it switched again), the longest wait for a
device (arrival → grant: a place on a ready child of its model), the longest
*switch wait* (the longest stretch of a request's wait during which no device
was ready with its model: what the policy bounds, since queueing behind
requests for the same model is not a switch), and the policy's stated bound:
``max_switch_wait_s`` (the policy's wait for the slowest model, from the true
load times) + ⌈(M−1)/D⌉ rounds of (one drain + one switch) for M models on D
devices, a drain being at most two of the trace's longest requests (four run,
a fifth waits inside the child) and a switch a stop plus the slowest load.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

if __name__ == "__main__" and not __package__:  # `python bench/simsched.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.task import Clock

from rolemesh_node.coordinator import Coordinator, NoDevice, Rejected
from rolemesh_node.costs import CostBook
from rolemesh_node.llama_server import ChildStartError
from rolemesh_node.scheduler import SwitchPolicy
from rolemesh_node.snapshot import DeviceSnapshot, Phase

GB = 10**9
DEVICE_MEMORY = 80 * GB
STOP_S = 0.5
SLOTS = 4
BASE_TOKENS, MEAN_EXTRA_TOKENS, MAX_TOKENS = 32, 200.0, 1024
POLICIES = ("fifo", "reorder", "new")


@dataclass(frozen=True)
class Profile:
    """A model class: how a simulated child of it behaves."""

    kind: str
    load_s: float
    tps: float  # tokens per second per slot
    size_bytes: int


PROFILES = {
    "8b": Profile("8b", 4.0, 60.0, int(4.9 * GB)),
    "14b": Profile("14b", 8.0, 40.0, int(9.0 * GB)),
    "70b": Profile("70b", 25.0, 20.0, int(42.0 * GB)),
}


@dataclass(frozen=True)
class Spec:
    """What the coordinator keeps per model and hands to ``switch_to`` (it reads ``.name``)."""

    name: str


@dataclass
class Request:
    id: int
    model: str
    arrived: float
    tokens: int
    granted: float | None = None
    done: float | None = None
    failed: str | None = None  # "rejected", "no_device", or the start error
    device: str | None = None
    client: int | None = None  # closed-loop traces: which client sent it
    seq: int = 0  # closed-loop traces: its place in the client's sequence


def mean_tokens() -> float:
    """E[32 + min(Exp(mean 200), 992)]."""
    cap = MAX_TOKENS - BASE_TOKENS
    return BASE_TOKENS + MEAN_EXTRA_TOKENS * (1.0 - math.exp(-cap / MEAN_EXTRA_TOKENS))


def draw_tokens(rng: random.Random) -> int:
    return BASE_TOKENS + min(int(rng.expovariate(1.0 / MEAN_EXTRA_TOKENS)), MAX_TOKENS - BASE_TOKENS)


# ------------------------------------------------------------------ traces


@dataclass(frozen=True)
class Client:
    """A closed-loop client: sends its next request ``think_s`` after the previous answer."""

    models: tuple[str, ...]  # cycled through
    think_s: float
    tokens: int


@dataclass
class Trace:
    name: str
    title: str
    models: dict[str, Profile]
    devices: int
    requests: list[Request]  # open-loop arrivals
    duration: float
    note: str = ""
    clients: list[Client] = field(default_factory=list)  # closed-loop clients (started at t = 0)
    slots: int = SLOTS
    stop_s: float = STOP_S


def capacity_rps(models: dict[str, Profile], weights: dict[str, float], devices: int) -> float:
    """Requests/s the devices could serve with this mix if no switch ever cost anything."""
    total = sum(weights.values())
    slot_s = sum(w / total * mean_tokens() / models[m].tps for m, w in weights.items())
    return devices * SLOTS / slot_s


def poisson(rng: random.Random, rate: float, start: float, end: float) -> Iterable[float]:
    t = start
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return
        yield t


def mix_arrivals(rng: random.Random, rate: float, weights: dict[str, float], start: float,
                 end: float) -> list[tuple[float, str]]:
    names = list(weights)
    cum = list(weights.values())
    return [(t, rng.choices(names, cum)[0]) for t in poisson(rng, rate, start, end)]


def build_trace(name: str, seed: int, duration: float, scale: float = 1.0) -> Trace:
    """One trace; ``scale`` multiplies every arrival rate (the burst's too)."""
    rng = random.Random(f"{name}-{seed}")
    if name == "a":
        models = {"a-8b": PROFILES["8b"], "b-8b": PROFILES["8b"]}
        weights = {"a-8b": 1.0, "b-8b": 1.0}
        devices = 1
        rate = 0.8 * capacity_rps(models, {"a-8b": 1.0}, 1) * scale
        arrivals = mix_arrivals(rng, rate, weights, 0.0, duration)
        title = "two 8B models 50/50, one device, 80 % load"
    elif name == "b":
        models = {"m1-8b": PROFILES["8b"], "m2-14b": PROFILES["14b"], "m3-8b": PROFILES["8b"],
                  "m4-70b": PROFILES["70b"]}
        weights = {m: 1.0 / (i + 1) for i, m in enumerate(models)}  # Zipf(1)
        devices = 2
        rate = 0.6 * capacity_rps(models, weights, devices) * scale
        arrivals = mix_arrivals(rng, rate, weights, 0.0, duration)
        title = "four models (8B, 14B, 8B, 70B), Zipf(1), two devices, 60 % load"
    elif name == "c":
        models = {"hot-8b": PROFILES["8b"], "x-8b": PROFILES["8b"], "y-14b": PROFILES["14b"]}
        weights = {m: 1.0 for m in models}
        devices = 2
        rate = 0.4 * capacity_rps(models, weights, devices) * scale
        arrivals = mix_arrivals(rng, rate, weights, 0.0, duration)
        burst_start = min(150.0, duration / 4)
        burst_rate = 10 * rate * weights["hot-8b"] / sum(weights.values())
        arrivals += [(t, "hot-8b") for t in poisson(rng, burst_rate - rate / 3, burst_start,
                                                    min(duration, burst_start + 30.0))]
        arrivals.sort()
        title = "steady mix of 3 (8B, 8B, 14B) at 40 % of two devices + a 10× burst of one for 30 s"
    elif name == "d":
        models = {"solo-8b": PROFILES["8b"]}
        weights = {"solo-8b": 1.0}
        devices = 2
        rate = 0.8 * capacity_rps(models, weights, devices) * scale
        arrivals = mix_arrivals(rng, rate, weights, 0.0, duration)
        title = "one 8B model, two devices, 80 % load"
    elif name.startswith("e"):
        # bench/sched_real.py's "split" scenario in miniature: two tiny models on one cpu device
        # (-np 1, capacity 2; a start takes 35 ms, a stop 5 ms; 8 tokens take 3.5 ms), two
        # closed-loop clients on each model; a client's turnaround (answer → next request) is
        # the trace's think time: "e" 2 ms, "e4" 4 ms, ...
        think_ms = float(name[1:] or 2)
        tiny = Profile("tiny", 0.035, 8 / 0.0035, 500_000)
        models = {"tiny-a": tiny, "tiny-b": tiny}
        clients = [Client((m,), think_ms / 1000.0, 8) for m in ("tiny-a", "tiny-a", "tiny-b", "tiny-b")]
        return Trace(name, f"closed loop, 2+2 clients on two tiny models, one -np 1 device, "
                           f"{think_ms:g} ms client turnaround", models, 1, [], min(duration, 10.0),
                     clients=clients, slots=1, stop_s=0.005)
    elif name == "check":
        models = {"p-8b": PROFILES["8b"], "q-8b": PROFILES["8b"]}
        devices = 1
        arrivals = mix_arrivals(rng, 0.5, {"p-8b": 1.0, "q-8b": 1.0}, 0.0, duration)
        title = "self-check"
    else:
        raise ValueError(f"unknown trace {name!r}")
    requests = [Request(i, m, t, draw_tokens(rng)) for i, (t, m) in enumerate(arrivals)]
    return Trace(name, title, models, devices, requests, duration)


TRACES = ("a", "b", "c", "d")


# ------------------------------------------------------------- the slots


@dataclass
class SimState:
    """What ``slot.state`` is: the coordinator reads ``.began`` of a starting one."""

    phase: Phase
    model: str | None = None
    next_model: str | None = None
    began: float = 0.0


class SimLease:
    __slots__ = ("slot", "model", "request", "released", "running_at")

    def __init__(self, slot: "SimSlot", model: str) -> None:
        self.slot = slot
        self.model = model
        self.request: Request | None = None
        self.released = False
        self.running_at: float | None = None

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slot._release(self)


class SimError(Exception):
    """The simulated slot was asked for something a real one refuses (a caller's bug)."""


class Readiness:
    """Per model: the stretches of time during which no device was ready with it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.ready: collections.Counter[str] = collections.Counter()
        self.gaps: dict[str, list[list[float]]] = collections.defaultdict(lambda: [[0.0, math.inf]])

    def changed(self, old: SimState, new: SimState) -> None:
        now = self.clock.seconds()
        if old.phase is Phase.READY and old.model is not None:
            self.ready[old.model] -= 1
            if self.ready[old.model] == 0:
                self.gaps[old.model].append([now, math.inf])
        if new.phase is Phase.READY and new.model is not None:
            if self.ready[new.model] == 0:
                self.gaps[new.model][-1][1] = now
            self.ready[new.model] += 1

    def switch_wait(self, model: str, start: float, end: float) -> float:
        """The longest stretch of [start, end] during which ``model`` was ready nowhere."""
        longest = 0.0
        for gap_start, gap_end in self.gaps[model]:
            lo, hi = max(start, gap_start), min(end, gap_end)
            if hi > lo:
                longest = max(longest, hi - lo)
        return longest


class SimSlot:
    """A device with a simulated ``llama-server`` child (the interface the coordinator uses)."""

    def __init__(self, clock: Clock, index: int, models: dict[str, Profile], readiness: Readiness,
                 slots: int = SLOTS, capacity: int | None = None, stop_s: float = STOP_S,
                 fail_rate: float = 0.0, rng: random.Random | None = None,
                 on_finish: Callable[[Request], None] | None = None,
                 listeners: list[Callable[[str, dict[str, Any]], None]] | None = None) -> None:
        self.clock = clock
        self.index = index
        self.id = f"gpu:{index}"
        self.profiles = models
        self.readiness = readiness
        self.slots = slots
        self.capacity = capacity if capacity is not None else slots + 1
        self.stop_s = stop_s
        self.fail_rate = fail_rate
        self.rng = rng or random.Random(index)
        self.listeners = listeners if listeners is not None else []
        self.on_finish = on_finish
        self.state = SimState(Phase.IDLE)
        self.leases: list[SimLease] = []
        self.starts = 0
        self.switches = 0
        self.wasted = 0  # loads after which nothing was served before the next switch
        self.served_since_load = 0
        self.last_loaded: str | None = None
        self.max_inflight = 0
        self.busy_slot_s = 0.0
        self.idle_since: float | None = None  # ready with nothing in flight since (as the real slot keeps it)
        self.done_since_grant = 0  # as the real slot: finished here / other models' arrivals since the last grant
        self.others_since_grant = 0

    # ------------------------------------------------ what the coordinator reads

    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def model(self) -> str | None:
        return self.state.model

    @property
    def destined(self) -> str | None:
        if self.state.phase in (Phase.STARTING, Phase.READY):
            return self.state.model
        if self.state.phase in (Phase.DRAINING, Phase.STOPPING):
            return self.state.next_model
        return None

    @property
    def inflight(self) -> int:
        return len(self.leases)

    def _enter(self, new: SimState) -> None:
        old = self.state
        self.state = new
        self.idle_since = self.clock.seconds() if new.phase is Phase.READY and not self.leases else None
        self.readiness.changed(old, new)

    def _emit(self, event: str, **fields: Any) -> None:
        for listener in list(self.listeners):
            listener(event, {"device": self.id, **fields})

    # -------------------------------------------------------------- requests

    def grant(self, model: str) -> SimLease:
        st = self.state
        if st.phase is not Phase.READY or st.model != model or self.inflight >= self.capacity:
            raise SimError(f"{self.id}: grant({model}) while {st.phase.value} {st.model} "
                           f"with {self.inflight}/{self.capacity} in flight")
        self.idle_since = None
        self.done_since_grant = self.others_since_grant = 0
        lease = SimLease(self, model)
        self.leases.append(lease)
        self.max_inflight = max(self.max_inflight, self.inflight)
        return lease

    def attach(self, lease: SimLease, request: Request) -> None:
        """The granted request starts (or waits inside the child behind ``slots`` others)."""
        lease.request = request
        request.granted = self.clock.seconds()
        request.device = self.id
        self.served_since_load += 1
        self._run()

    def _run(self) -> None:
        now = self.clock.seconds()
        for lease in self.leases[:self.slots]:
            if lease.running_at is None and lease.request is not None:
                lease.running_at = now
                service = lease.request.tokens / self.profiles[lease.model].tps
                self.clock.callLater(service, self._finish, lease)

    def _finish(self, lease: SimLease) -> None:
        assert lease.request is not None
        lease.request.done = self.clock.seconds()
        lease.release()
        if self.on_finish is not None:
            self.on_finish(lease.request)

    def note_arrival(self, model: str) -> None:
        if model != self.state.model:
            self.others_since_grant += 1

    def _release(self, lease: SimLease) -> None:
        self.leases.remove(lease)
        self.done_since_grant += 1
        if not self.leases and self.state.phase is Phase.READY:
            self.idle_since = self.clock.seconds()
        held = None if lease.running_at is None else self.clock.seconds() - lease.running_at
        if held is not None:
            self.busy_slot_s += held
        self._run()
        self._emit("released", model=lease.model, seconds=held, drained=self.inflight == 0)

    # ------------------------------------------------------------- switching

    def switch_to(self, spec: Any) -> None:
        name = spec.name
        st = self.state
        if st.phase in (Phase.READY, Phase.DRAINING):
            if st.model == name:
                if st.phase is Phase.DRAINING:
                    self._enter(SimState(Phase.READY, name))
                return
            if self.inflight:
                self._enter(SimState(Phase.DRAINING, st.model, name))
                return
            self._enter(SimState(Phase.STOPPING, st.model, name))
            self.clock.callLater(self.stop_s, self._load, name)
            return
        if st.phase in (Phase.IDLE, Phase.FAILED):
            self._load(name)
            return
        raise SimError(f"{self.id}: switch_to({name}) while {st.phase.value} {st.model}")

    def _load(self, name: str) -> None:
        if self.last_loaded is not None and self.last_loaded != name:
            self.switches += 1
        if self.last_loaded is not None and self.served_since_load == 0:
            self.wasted += 1
        self.last_loaded = name
        self.served_since_load = 0
        self.starts += 1
        now = self.clock.seconds()
        self._enter(SimState(Phase.STARTING, name, began=now))
        self._emit("start", model=name)
        self.clock.callLater(self.profiles[name].load_s, self._loaded, name, now)

    def _loaded(self, name: str, began: float) -> None:
        seconds = self.clock.seconds() - began
        if self.fail_rate and self.rng.random() < self.fail_rate:
            error = ChildStartError(self.id, name, "simulated start failure")
            self._enter(SimState(Phase.FAILED, name))
            self._emit("failed", model=name, reason=error.reason, error=error)
            return
        self._enter(SimState(Phase.READY, name))
        self._emit("ready", model=name, seconds=seconds, switch_s=seconds)

    # ------------------------------------------------------------- reporting

    def snapshot(self, *, waiting: int = 0, free_memory_bytes: int | None = None,
                 loaded_model_bytes: int | None = None) -> DeviceSnapshot:
        st = self.state
        return DeviceSnapshot(
            device_id=self.id, index=self.index, phase=st.phase, model=st.model, next_model=st.next_model,
            in_flight=self.inflight, capacity=self.capacity, slots=self.slots, max_pending=self.capacity + 1,
            free_memory_bytes=free_memory_bytes, loaded_model_bytes=loaded_model_bytes, idle_since=self.idle_since,
            clients_left=self.done_since_grant > 0 and self.others_since_grant >= self.done_since_grant,
            waiting=waiting,
            starts=self.starts, switches=self.switches)

    def free_memory(self) -> int:
        """What the backend would read: a child that runs (also one loading or stopping) holds its model."""
        held = self.state.phase in (Phase.STARTING, Phase.READY, Phase.DRAINING, Phase.STOPPING)
        return DEVICE_MEMORY - (self.profiles[self.model].size_bytes if held and self.model else 0)


# ------------------------------------------------------------- the drivers


class Driver:
    """One policy on a set of slots: takes requests, counts what happened."""

    def __init__(self, sim: "Sim") -> None:
        self.sim = sim
        self.clock = sim.clock
        self.slots = sim.slots

    def submit(self, request: Request) -> None:
        raise NotImplementedError

    def event(self, event: str, fields: dict[str, Any]) -> None:
        pass


class NewDriver(Driver):
    """The node's coordinator, wired as :class:`rolemesh_node.node.Node` wires it."""

    def __init__(self, sim: "Sim", policy: SwitchPolicy, max_pending: int, memory: bool = True) -> None:
        super().__init__(sim)
        self.memory = memory
        self.sizes = {m: p.size_bytes for m, p in sim.trace.models.items()}
        self.reasons: collections.Counter[str] = collections.Counter()
        self.coordinator = Coordinator(
            reactor=self.clock, models={m: Spec(m) for m in sim.trace.models}, policy=policy,
            max_pending=max_pending, slots={s.id: s for s in self.slots}, snapshots=self.snapshots,
            sizes=lambda: self.sizes, costs=CostBook())
        self.coordinator.listeners.append(self._decision)
        for slot in self.slots:
            slot.listeners.insert(0, self.coordinator.slot_event)

    def _decision(self, event: str, fields: dict[str, Any]) -> None:
        if event == "switch":
            self.reasons[fields["reason"]] += 1

    def snapshots(self) -> list[DeviceSnapshot]:
        out = []
        for slot in self.slots:
            out.append(slot.snapshot(
                waiting=self.coordinator.waiting(slot.destined or slot.model or ""),
                free_memory_bytes=slot.free_memory() if self.memory else None,
                loaded_model_bytes=self.sizes.get(slot.model) if slot.model and self.memory else None))
        return out

    def submit(self, request: Request) -> None:
        try:
            ticket = self.coordinator.submit(request.model)
        except Rejected:
            request.failed = "rejected"
            return
        except NoDevice:
            request.failed = "no_device"
            return

        def granted(lease: SimLease) -> None:
            lease.slot.attach(lease, request)

        def refused(failure: Any) -> None:
            request.failed = failure.getErrorMessage()

        ticket.d.addCallbacks(granted, refused)


class BoundDriver(Driver):
    """The baselines' common part: a request is bound to one device's queue on arrival."""

    def __init__(self, sim: "Sim", room: int) -> None:
        super().__init__(sim)
        self.room = room  # the old max_pending_requests_per_device: where a request may still queue
        self.queues: dict[str, collections.deque[Request]] = {s.id: collections.deque() for s in self.slots}
        self.by_id = {s.id: s for s in self.slots}
        self.specs = {m: Spec(m) for m in sim.trace.models}
        for slot in self.slots:
            slot.listeners.append(self.event)

    def target(self, slot: SimSlot) -> str | None:
        """The model the device runs or is about to run."""
        return slot.destined

    def pressure(self, slot: SimSlot) -> int:
        return slot.inflight + len(self.queues[slot.id])

    def place(self, model: str) -> SimSlot:
        """The first wave's placement (rolemesh_node/scheduler.py at e3a1a3b), queueing where it said 429."""
        roomy = [s for s in self.slots if self.pressure(s) < self.room]
        holders = [s for s in roomy if self.target(s) == model]
        if holders:
            return min(holders, key=lambda s: (self.pressure(s), s.index))
        if roomy:
            return min(roomy, key=lambda s: (-s.free_memory(), self.pressure(s),
                                             0 if s.model is None else 1, s.index))
        holders = [s for s in self.slots if self.target(s) == model]
        return min(holders or self.slots, key=lambda s: (self.pressure(s), s.index))

    def submit(self, request: Request) -> None:
        slot = self.place(request.model)
        self.queues[slot.id].append(request)
        self.pump(slot)

    def event(self, event: str, fields: dict[str, Any]) -> None:
        slot = self.by_id[fields["device"]]
        if event == "failed":
            self.failed(slot, fields["model"], str(fields.get("error")))
        if event in ("ready", "failed", "released", "stopped", "crash"):
            self.pump(slot)

    def grant(self, slot: SimSlot, request: Request) -> None:
        slot.attach(slot.grant(request.model), request)

    def failed(self, slot: SimSlot, model: str, error: str) -> None:
        raise NotImplementedError

    def pump(self, slot: SimSlot) -> None:
        raise NotImplementedError


class FifoDriver(BoundDriver):
    """Strict FIFO per device; the head switches the device once nothing is in flight.

    As in the first wave, a request taken off the queue holds its place on the
    device while the child loads (``assigned``), so requests behind it for the
    same model share the load.
    """

    def __init__(self, sim: "Sim", room: int) -> None:
        super().__init__(sim, room)
        self.assigned: dict[str, list[Request]] = {s.id: [] for s in self.slots}
        self.want: dict[str, str | None] = {s.id: None for s in self.slots}

    def target(self, slot: SimSlot) -> str | None:
        return self.want[slot.id]

    def pressure(self, slot: SimSlot) -> int:
        return slot.inflight + len(self.assigned[slot.id]) + len(self.queues[slot.id])

    def failed(self, slot: SimSlot, model: str, error: str) -> None:
        for request in self.assigned[slot.id]:
            request.failed = error
        self.assigned[slot.id] = []
        self.want[slot.id] = None

    def pump(self, slot: SimSlot) -> None:
        queue, assigned = self.queues[slot.id], self.assigned[slot.id]
        if slot.phase is Phase.READY and assigned and slot.model == self.want[slot.id]:
            for request in assigned:
                self.grant(slot, request)
            assigned.clear()
        while queue:
            head = queue[0]
            busy = slot.inflight + len(assigned)
            if busy >= slot.capacity:
                return
            if busy and self.want[slot.id] != head.model:
                return  # drain the running model before switching
            queue.popleft()
            if slot.phase is Phase.READY and slot.model == head.model:
                self.want[slot.id] = head.model
                self.grant(slot, head)
                continue
            assigned.append(head)
            if self.want[slot.id] != head.model or slot.phase in (Phase.IDLE, Phase.FAILED):
                self.want[slot.id] = head.model
                slot.switch_to(self.specs[head.model])


class ReorderDriver(BoundDriver):
    """Serve the current model while anything waits for it; then switch to the oldest request's model."""

    def failed(self, slot: SimSlot, model: str, error: str) -> None:
        queue = self.queues[slot.id]
        for request in [r for r in queue if r.model == model]:
            request.failed = error
            queue.remove(request)

    def pump(self, slot: SimSlot) -> None:
        queue = self.queues[slot.id]
        if not queue:
            return
        if slot.phase is Phase.READY:
            for request in [r for r in queue if r.model == slot.model]:
                if slot.inflight >= slot.capacity:
                    return
                queue.remove(request)
                self.grant(slot, request)
            if any(r.model == slot.model for r in queue) or slot.inflight:
                return
            slot.switch_to(self.specs[queue[0].model])
        elif slot.phase in (Phase.IDLE, Phase.FAILED):
            slot.switch_to(self.specs[queue[0].model])


# ------------------------------------------------------------------ the run


class Sim:
    def __init__(self, trace: Trace, policy: str, *, switch_policy: SwitchPolicy, max_pending: int,
                 drain: float, fail_rate: float = 0.0, seed: int = 0, memory: bool = True) -> None:
        self.trace = trace
        self.policy = policy
        self.drain = drain
        self.clock = Clock()
        self.readiness = Readiness(self.clock)
        self.requests = [Request(r.id, r.model, r.arrived, r.tokens) for r in trace.requests]
        rng = random.Random(f"fail-{seed}")
        self.slots = [SimSlot(self.clock, i, trace.models, self.readiness, slots=trace.slots, stop_s=trace.stop_s,
                              fail_rate=fail_rate, rng=rng, on_finish=self._finished)
                      for i in range(trace.devices)]
        self.switch_policy = switch_policy
        if policy == "new":
            self.driver: Driver = NewDriver(self, switch_policy, max_pending, memory)
        elif policy == "fifo":
            self.driver = FifoDriver(self, room=trace.slots + 2)
        elif policy == "reorder":
            self.driver = ReorderDriver(self, room=trace.slots + 2)
        else:
            raise ValueError(policy)
        self.ended_at = 0.0

    def _send(self, index: int, seq: int) -> None:
        """Closed loop: client ``index`` sends its request number ``seq``."""
        now = self.clock.seconds()
        if now >= self.trace.duration:
            return
        client = self.trace.clients[index]
        request = Request(len(self.requests), client.models[seq % len(client.models)], now, client.tokens,
                          client=index, seq=seq)
        self.requests.append(request)
        self.driver.submit(request)
        if request.failed:
            self.clock.callLater(client.think_s, self._send, index, seq + 1)

    def _finished(self, request: Request) -> None:
        if request.client is not None:
            self.clock.callLater(self.trace.clients[request.client].think_s, self._send, request.client,
                                 request.seq + 1)

    def run(self) -> None:
        clock = self.clock
        pending = collections.deque(self.requests)
        for index in range(len(self.trace.clients)):
            clock.callLater(0.0, self._send, index, 0)

        def arrive() -> None:
            request = pending.popleft()
            self.driver.submit(request)
            if pending:
                clock.callLater(pending[0].arrived - clock.seconds(), arrive)

        if pending:
            clock.callLater(pending[0].arrived, arrive)
        end = self.trace.duration + self.drain
        while clock.calls:
            if (not pending and clock.seconds() >= self.trace.duration
                    and all(r.done is not None or r.failed for r in self.requests)):
                break
            t = clock.calls[0].getTime()
            if t > end:
                break
            clock.rightNow = max(clock.rightNow, t)
            clock.advance(0)
        self.ended_at = clock.seconds()

    # ---------------------------------------------------------------- figures

    def figures(self) -> dict[str, Any]:
        t = self.trace
        reqs = self.requests
        end = self.ended_at
        done = [r for r in reqs if r.done is not None]
        in_window = [r for r in done if r.done <= t.duration]
        failed = [r for r in reqs if r.failed]
        unfinished = [r for r in reqs if r.done is None and not r.failed]
        lat = [r.done - r.arrived for r in done] + [end - r.arrived for r in unfinished]
        waits = [(r.granted if r.granted is not None else end) - r.arrived for r in reqs if not r.failed]
        switch_waits = [self.readiness.switch_wait(r.model, r.arrived, r.granted if r.granted is not None else end)
                        for r in reqs if not r.failed]
        switches = sum(s.switches for s in self.slots)
        out = {
            "trace": t.name, "policy": self.policy, "requests": len(reqs), "completed": len(done),
            "completed_in_window": len(in_window), "unfinished": len(unfinished), "failed": len(failed),
            "rejected": sum(1 for r in failed if r.failed == "rejected"),
            "goodput_rps": len(in_window) / t.duration,
            "goodput_tps": sum(r.tokens for r in in_window) / t.duration,
            "offered_rps": len(reqs) / t.duration,
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "latency_censored": bool(unfinished),
            "loads": sum(s.starts for s in self.slots), "switches": switches,
            "switches_per_request": switches / max(1, len(done)),
            "wasted_loads": sum(s.wasted for s in self.slots),
            "longest_wait_s": max(waits, default=0.0),
            "longest_switch_wait_s": max(switch_waits, default=0.0),
            "bound_s": self.bound(),
            # share of the devices' slot-seconds spent running requests, over the whole run (drain included)
            "utilization": sum(s.busy_slot_s for s in self.slots) / (len(self.slots) * t.slots * max(end, 1e-9)),
            "ended_at_s": end,
            "max_inflight": max(s.max_inflight for s in self.slots),
        }
        if isinstance(self.driver, NewDriver):
            out["switch_reasons"] = dict(self.driver.reasons)
        return out

    def bound(self) -> float:
        """The policy's stated bound on a switch wait for this trace (see the module docstring)."""
        t = self.trace
        longest = max((r.tokens / t.models[r.model].tps for r in self.requests), default=0.0)
        # the largest bounded wait the run can have derived: moving averages never exceed their largest sample
        costs = CostBook()
        for m, p in t.models.items():
            costs.record_switch(m, "any", p.load_s)
            costs.record_service(m, longest)
        sizes = {m: p.size_bytes for m, p in t.models.items()}
        wait = max(self.switch_policy.max_wait(m, costs, sizes) for m in t.models)
        drain = 2 * longest
        switch = t.stop_s + max(p.load_s for p in t.models.values())
        rounds = math.ceil((len(t.models) - 1) / t.devices)
        return wait + rounds * (drain + switch) if rounds else wait + switch


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ------------------------------------------------------------------ output


def fmt(v: float | None, nd: int = 1) -> str:
    if v is None:
        return "–"
    return f"{v:.{nd}f}"


def render(results: list[dict[str, Any]], traces: dict[str, Trace], args: argparse.Namespace) -> str:
    lines = [f"Simulated {args.duration:g} s of arrivals per trace (+ up to {args.drain:g} s to finish), "
             f"seeds {','.join(map(str, args.seed_list))}, SwitchPolicy("
             + ("" if args.max_switch_wait is None else f"max_switch_wait_s={args.max_switch_wait:g}")
             + f"), fail rate {args.fail_rate:g}"
             + ("" if args.scale == 1.0 else f", arrival rates × {args.scale:g}") + ".", ""]
    for name, trace in traces.items():
        lines.append(f"* **{name}** — {trace.title}: {', '.join(f'{m} ({p.kind})' for m, p in trace.models.items())}"
                     f"; {len(trace.requests)} requests")
    lines += ["", "| trace | seed | policy | done / arrived | unfinished | failed | req/s | tokens/s | p50 s | p99 s | "
                  "switches/req | wasted loads | busy % | longest wait s | longest switch wait s | bound s | within |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mark = "≥" if r["latency_censored"] else ""
        within = r["longest_switch_wait_s"] <= r["bound_s"]
        lines.append(
            f"| {r['trace']} | {r['seed']} | {r['policy']} | {r['completed']}/{r['requests']} | {r['unfinished']} | "
            f"{r['failed']} | {r['goodput_rps']:.3f} | {r['goodput_tps']:.0f} | {mark}{fmt(r['latency_p50_s'])} | "
            f"{mark}{fmt(r['latency_p99_s'])} | {r['switches_per_request']:.3f} | {r['wasted_loads']} | "
            f"{100 * r['utilization']:.0f} | "
            f"{fmt(r['longest_wait_s'])} | {fmt(r['longest_switch_wait_s'])} | {fmt(r['bound_s'])} | "
            f"{'yes' if within else '**no**'} |")
    lines += ["", "| target | trace | seed | measured | met |", "|---|---|---|---|---|"]
    for verdict in verdicts(results):
        lines.append(f"| {verdict['target']} | {verdict['trace']} | {verdict['seed']} | {verdict['measured']} | "
                     f"{'yes' if verdict['met'] else '**no**'} |")
    reasons = [r for r in results if r.get("switch_reasons")]
    if reasons:
        lines += ["", "Switch decisions of the new policy, by reason: "
                  + "; ".join(f"{r['trace']}/{r['seed']}: " + ", ".join(f"{k} {v}" for k, v in
                                                                     sorted(r["switch_reasons"].items()))
                              for r in reasons)]
    return "\n".join(lines) + "\n"


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["trace"], r["seed"], r["policy"]): r for r in results}
    out = []
    for (trace, seed, policy), r in sorted(by.items()):
        if policy != "new":
            continue
        fifo = by.get((trace, seed, "fifo"))
        if fifo is not None and trace in ("a", "b", "c"):
            ratio = r["goodput_rps"] / fifo["goodput_rps"] if fifo["goodput_rps"] else math.inf
            out.append({"target": "goodput ≥ 3× FIFO", "trace": trace, "seed": seed,
                        "measured": f"{ratio:.2f}× ({r['goodput_rps']:.3f} vs {fifo['goodput_rps']:.3f} req/s)",
                        "met": ratio >= 3.0})
        if fifo is not None and trace == "d":
            ok = (r["goodput_rps"] >= fifo["goodput_rps"] * 0.99
                  and (r["latency_p99_s"] or 0) <= (fifo["latency_p99_s"] or 0) * 1.05)
            out.append({"target": "no worse than FIFO (goodput, p99)", "trace": trace, "seed": seed,
                        "measured": f"{r['goodput_rps']:.3f} vs {fifo['goodput_rps']:.3f} req/s, p99 "
                                    f"{fmt(r['latency_p99_s'])} vs {fmt(fifo['latency_p99_s'])} s",
                        "met": ok})
        out.append({"target": "longest wait (arrival → grant) within the bound", "trace": trace, "seed": seed,
                    "measured": f"{r['longest_wait_s']:.1f} s vs {r['bound_s']:.1f} s",
                    "met": r["longest_wait_s"] <= r["bound_s"]})
        out.append({"target": "longest switch wait within the bound", "trace": trace, "seed": seed,
                    "measured": f"{r['longest_switch_wait_s']:.1f} s vs {r['bound_s']:.1f} s",
                    "met": r["longest_switch_wait_s"] <= r["bound_s"]})
    return out


# -------------------------------------------------------------- self-check


def self_check(args: argparse.Namespace) -> int:
    """Invariants of the simulator itself, on a short trace, for every policy."""
    problems = []
    trace = build_trace("check", 1, 120.0)
    for policy in POLICIES:
        for fail_rate in (0.0, 0.2):
            sim = Sim(trace, policy, switch_policy=SwitchPolicy(), max_pending=10**6, drain=600.0,
                      fail_rate=fail_rate, seed=1)
            sim.run()
            f = sim.figures()
            where = f"{policy} fail={fail_rate}"
            if f["completed"] + f["failed"] + f["unfinished"] != f["requests"]:
                problems.append(f"{where}: requests not accounted for")
            if f["unfinished"]:
                problems.append(f"{where}: {f['unfinished']} unfinished after the drain")
            if fail_rate == 0.0 and f["failed"]:
                problems.append(f"{where}: {f['failed']} failed without failures")
            if f["max_inflight"] > SLOTS + 1:
                problems.append(f"{where}: {f['max_inflight']} in flight on one device")
            for r in sim.requests:
                if r.done is not None and (r.granted is None or not r.arrived <= r.granted <= r.done):
                    problems.append(f"{where}: request {r.id} times out of order")
                    break
                if r.done is not None:
                    service = r.tokens / trace.models[r.model].tps
                    if r.done - r.granted < service - 1e-6:
                        problems.append(f"{where}: request {r.id} served faster than its tokens allow")
                        break
            if any(s.leases for s in sim.slots):
                problems.append(f"{where}: leases left on a slot")
    # one device, one model, requests spaced out: no queueing, latency = load (first) or service
    sim = Sim(Trace("unit", "", {"u-8b": PROFILES["8b"]}, 1,
                    [Request(0, "u-8b", 1.0, 120), Request(1, "u-8b", 100.0, 60)], 200.0),
              "new", switch_policy=SwitchPolicy(), max_pending=10, drain=100.0)
    sim.run()
    r0, r1 = sim.requests
    if not (abs(r0.done - (1.0 + 4.0 + 2.0)) < 1e-6 and abs(r1.done - (100.0 + 1.0)) < 1e-6):
        problems.append(f"unit trace: done at {r0.done}, {r1.done} (expected 7.0, 101.0)")
    for p in problems:
        print("FAIL:", p)
    print("self-check:", "ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


# -------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.simsched", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default=",".join(TRACES),
                   help="comma-separated traces (default a,b,c,d; also e, eN: closed loop with N ms turnaround)")
    p.add_argument("--policy", default=",".join(POLICIES), help="comma-separated policies (fifo,reorder,new)")
    p.add_argument("--seeds", default="1", help="comma-separated trace seeds (default 1)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every trace's arrival rate (default 1: the loads named above)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals per trace (default 600)")
    p.add_argument("--drain", type=float, default=600.0,
                   help="seconds after the arrivals end for queued work to finish (default 600)")
    p.add_argument("--max-switch-wait", type=float, default=None,
                   help="SwitchPolicy max_switch_wait_s (default: unset, the node's default: 5× the measured "
                        "switch cost within [1, 60] s)")
    p.add_argument("--max-pending", type=int, default=10**6,
                   help="the coordinator's max_pending (per device; default: no 429)")
    p.add_argument("--fail-rate", type=float, default=0.0, help="probability that a load fails (default 0)")
    p.add_argument("--no-memory", action="store_true",
                   help="give the new policy no memory figures (as a backend that cannot read them): "
                        "every model fits everywhere")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.add_argument("--check", action="store_true", help="run the simulator's self-check and exit")
    a = p.parse_args(argv)
    a.seed_list = [int(s) for s in a.seeds.split(",") if s]
    a.trace_list = [t for t in a.trace.split(",") if t]
    a.policy_list = [x for x in a.policy.split(",") if x]
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.check:
        return self_check(args)
    started = time.monotonic()
    policy = SwitchPolicy(max_switch_wait_s=args.max_switch_wait)
    results = []
    traces: dict[str, Trace] = {}
    for name in args.trace_list:
        for seed in args.seed_list:
            trace = build_trace(name, seed, args.duration, args.scale)
            traces.setdefault(name, trace)
            for pol in args.policy_list:
                sim = Sim(trace, pol, switch_policy=policy, max_pending=args.max_pending, drain=args.drain,
                          fail_rate=args.fail_rate, seed=seed, memory=not args.no_memory)
                sim.run()
                results.append({"seed": seed, **sim.figures()})
    elapsed = time.monotonic() - started
    if args.json:
        print(json.dumps({"args": {k: v for k, v in vars(args).items()}, "elapsed_s": round(elapsed, 2),
                          "results": results, "verdicts": verdicts(results)}, indent=1, default=str))
    else:
        print(render(results, traces, args))
        print(f"({elapsed:.1f} s of CPU time for the whole run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
