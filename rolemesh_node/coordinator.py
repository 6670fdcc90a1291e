"""The node-wide waiting room: requests wait per model, and the scheduler's decisions are carried out.

A request is bound to a device only when a device can take it now (late
binding). :meth:`Coordinator.submit` answers at once with a :class:`Ticket`
whose Deferred fires with a :class:`~rolemesh_node.device_slot.Lease`, or
raises :class:`Rejected` (429, the model's waiting bound is reached) or
:class:`NoDevice` (503). Waiting requests are handed out by
:func:`rolemesh_node.scheduler.decide`, asked again whenever something changes
(a request arrives or leaves, a child becomes ready, fails, drains or stops)
and when the oldest waiting request of a model becomes overdue (a timer on the
reactor's clock).

Three shortcuts skip the full decision where its answer is known: a request for
a model that nobody waits for goes straight to a ready device with room that
holds the model; a place freed on a ready device goes to the oldest request
waiting for its model; a request joining a backlog of its model asks for no
decision unless some device is free (a decision could only load it somewhere).
They are what :func:`decide` would answer: a device that must switch is already
draining (the overdue timer made it so). One thing moves between decisions: a
derived ``max_switch_wait_s`` follows the measured costs, and the overdue timer
is armed from the costs at the last decision (so fewer decisions on the hot path
move an overdue switch by as much as the averages moved, within the stated bound,
which is computed from the largest value the averages can take).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .config import ModelSpec
from .costs import CostBook
from .llama_server import ChildStartError
from .scheduler import ModelQueue, Refuse, Serve, Switch, SwitchPolicy, decide, estimate_wait_s, unable_reason
from .snapshot import DeviceSnapshot, Phase

log = Logger()


class NoDevice(Exception):
    """No device can serve the model; ``reasons`` says why for each."""

    def __init__(self, model: str, reasons: Mapping[str, str]) -> None:
        super().__init__(model, reasons)
        self.model = model
        self.reasons = dict(reasons)

    def __str__(self) -> str:
        if not self.reasons:
            return f"no device is available for model {self.model!r}"
        why = "; ".join(f"{dev}: {reason}" for dev, reason in self.reasons.items())
        return f"no device can serve model {self.model!r}: {why}"


class ModelRemoved(Exception):
    """The model was removed from the config while the request waited: 503 ``model_removed``."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model

    def __str__(self) -> str:
        return f"model {self.model!r} was removed from this node's config while the request waited"


class Rejected(Exception):
    """The model's waiting bound is reached: 429 with ``Retry-After``."""

    def __init__(self, model: str, limit: int, devices: int, retry_after_s: int) -> None:
        super().__init__(model, limit, devices, retry_after_s)
        self.model = model
        self.limit = limit
        self.devices = devices
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return (f"model {self.model!r} is busy: {self.limit} requests in flight or waiting "
                f"(max_pending_requests_per_device x {self.devices} device(s) able to serve it)")


class Ticket:
    """One request waiting for a place; ``d`` fires with its Lease (cancel it to leave)."""

    __slots__ = ("coordinator", "model", "arrived", "d")

    def __init__(self, coordinator: "Coordinator", model: str, arrived: float) -> None:
        self.coordinator = coordinator
        self.model = model
        self.arrived = arrived
        self.d: Deferred[Any] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[Any]) -> None:
        self.coordinator._withdraw(self)


class Coordinator:
    """Holds the waiting requests; carries out the scheduler's plans on the device slots."""

    def __init__(self, *, reactor: Any, models: Mapping[str, ModelSpec], policy: SwitchPolicy, max_pending: int,
                 slots: Mapping[str, Any], snapshots: Callable[[], list[DeviceSnapshot]],
                 sizes: Callable[[], Mapping[str, int | None]], costs: CostBook | None = None) -> None:
        self.reactor = reactor
        self.models = models
        self.policy = policy
        self.max_pending = max_pending
        self.slots = slots  # device id -> DeviceSlot (filled in by discovery)
        self._snapshots = snapshots
        self._sizes = sizes
        self.costs = costs if costs is not None else CostBook()
        self.queues: dict[str, collections.deque[Ticket]] = {}
        self.uncovered_since: dict[str, float] = {}
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._timer: Any = None
        self._pumping = False
        self._again = False
        self._stopped = False

    # ------------------------------------------------------------ requests

    def waiting(self, model: str) -> int:
        queue = self.queues.get(model)
        return 0 if queue is None else len(queue)

    def submit(self, model: str) -> Ticket:
        """A place for one request for ``model`` (raises Rejected or NoDevice)."""
        ticket = Ticket(self, model, self.reactor.seconds())
        for slot in self.slots.values():
            slot.note_arrival(model)
        queue = self.queues.get(model)
        if not queue:
            if self._grant_at_once(ticket):
                return ticket
            if self._wait_behind_holders(ticket):
                return ticket
        elif len(queue) + sum(s.inflight for s in self.slots.values() if s.model == model) < self.max_pending:
            # A backlog below any bound (its model was judged able when the backlog began; a cooldown
            # since then was answered by the decision it caused): no snapshot needed to admit it.
            queue.append(ticket)
            self._pump_after_arrival()
            return ticket
        snapshots = self._snapshots()
        sizes = self._sizes()
        able = 0
        reasons: dict[str, str] = {}
        for snap in snapshots:
            why = unable_reason(model, snap, sizes.get(model))
            if why is None:
                able += 1
            else:
                reasons[snap.device_id] = why
        if not able:
            raise NoDevice(model, reasons)
        waiting = len(queue) if queue else 0
        in_flight = sum(s.in_flight for s in snapshots if s.model == model)
        limit = self.max_pending * able
        if waiting + in_flight >= limit:
            wait = estimate_wait_s(model, waiting, snapshots, self.costs, self.policy, sizes)
            raise Rejected(model, limit, able, max(1, math.ceil(wait)))
        queue = self._queue(model)
        first = not queue
        queue.append(ticket)
        if first:
            self.pump()
        else:
            self._pump_after_arrival()
        return ticket

    def _wait_behind_holders(self, ticket: Ticket) -> bool:
        """The first to wait for a model that ready devices hold, all of them full, below the waiting
        bound (those devices alone make it): it waits for the next place on one of them without a
        decision — none could differ unless a device is free (``_pump_after_arrival``), and a model
        that a device holds is not waiting for a switch (no bounded wait to arm). False: the full way."""
        model = ticket.model
        holders = in_flight = 0
        for slot in self.slots.values():
            if slot.model == model:
                in_flight += slot.inflight
                if slot.phase is Phase.READY:
                    holders += 1
        if not holders or in_flight >= self.max_pending * holders:
            return False
        self._queue(model).append(ticket)
        self._pump_after_arrival()
        return True

    def _pump_after_arrival(self) -> None:
        """One more request behind others of its model: the head, and so the bounded wait, is
        unchanged, and no device holding it has room (else the backlog would be served), so a
        decision can only differ when some device is free to load it (or a replica of it)."""
        for slot in self.slots.values():
            phase = slot.phase
            if phase is Phase.IDLE or phase is Phase.FAILED or (
                    (phase is Phase.READY or phase is Phase.DRAINING) and not slot.inflight):
                self.pump()
                return

    def requeue(self, model: str, arrived: float) -> Ticket:
        """A request that was granted a place but never reached its child (the
        connection was refused: the child had just died) waits again, first in
        its model's line, with its arrival time kept. It was admitted once, so
        the waiting bound does not apply; it cannot run twice, since nothing
        was sent. If no device can take the model any more, the next decision
        refuses it like the others (503)."""
        ticket = Ticket(self, model, arrived)
        if self._stopped:
            ticket.d.errback(ChildStartError("-", model, "the agent is stopping"))
            return ticket
        queue = self.queues.get(model)
        if not queue and self._grant_at_once(ticket):
            return ticket
        self._queue(model).appendleft(ticket)
        self.pump()
        return ticket

    def _queue(self, model: str) -> collections.deque[Ticket]:
        """The model's waiting line, made when its first request waits."""
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = collections.deque()
        return queue

    def _grant_at_once(self, ticket: Ticket) -> bool:
        """Nobody waits for its model: a ready device serving it with room (the one with the fewest
        in flight) takes it now. False when there is none."""
        model = ticket.model
        best = None
        for slot in self.slots.values():
            if slot.phase is Phase.READY and slot.model == model and slot.inflight < slot.capacity:
                if best is None or slot.inflight < best.inflight:
                    best = slot
        if best is None:
            return False
        ticket.d.callback(best.grant(model))
        return True

    def _withdraw(self, ticket: Ticket) -> None:
        queue = self.queues.get(ticket.model)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            self.pump()  # a switch may no longer be needed, or another model's turn comes

    def describe_wait(self, ticket: Ticket) -> str:
        """What a waiting request waits for, in words (for a streamed request's SSE comments)."""
        now = self.reactor.seconds()
        for slot in self.slots.values():
            state = slot.state
            if slot.phase is Phase.STARTING and slot.model == ticket.model:
                return f"loading model {ticket.model} on {slot.id}, {now - state.began:.1f} s"
            if slot.destined == ticket.model and slot.phase in (Phase.DRAINING, Phase.STOPPING):
                return f"switching {slot.id} to model {ticket.model}, waited {now - ticket.arrived:.1f} s"
        queue = self.queues.get(ticket.model) or ()
        ahead = 0
        for other in queue:
            if other is ticket:
                break
            ahead += 1
        return f"waiting for model {ticket.model} ({ahead} ahead), waited {now - ticket.arrived:.1f} s"

    # ------------------------------------------------------------ events

    def slot_event(self, event: str, fields: dict[str, Any]) -> None:
        """A DeviceSlot listener."""
        if event == "released":
            seconds = fields.get("seconds")
            if seconds is not None:
                self.costs.record_service(fields["model"], seconds)
            slot = self.slots.get(fields["device"])
            if slot is not None and slot.phase is Phase.READY:
                queue = self.queues.get(slot.model)
                if queue and slot.inflight < slot.capacity:
                    ticket = queue.popleft()
                    ticket.d.callback(slot.grant(slot.model))
                    return
            if any(self.queues.values()) or (slot is not None and slot.phase is Phase.DRAINING):
                self.pump()
        elif event == "ready":
            self.costs.record_switch(fields["model"], fields["device"], fields.get("seconds") or 0.0)
            self.pump()
        elif event == "failed":
            self._start_failed(fields["model"], fields["device"], fields.get("error"))
            self.pump()
        elif event in ("crash", "stopped"):
            self.pump()

    def _start_failed(self, model: str, device: str, error: Any) -> None:
        """A start of ``model`` failed: its waiting requests get 503, unless another device holds it."""
        if any(slot.destined == model for slot in self.slots.values()):
            return
        if not isinstance(error, ChildStartError):
            error = ChildStartError(device, model, str(error or "the start failed"))
        self._fail_waiting(model, error)

    def _fail_waiting(self, model: str, error: Exception) -> None:
        queue = self.queues.pop(model, None)
        self.uncovered_since.pop(model, None)
        while queue:
            queue.popleft().d.errback(error)

    # ------------------------------------------------------------ decisions

    def pump(self) -> None:
        """Ask the policy what to do now and do it (re-entrant calls are folded into one more round)."""
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            rounds = 0
            while True:
                self._again = False
                self._pump_once()
                rounds += 1
                if not self._again or rounds >= 100:
                    break
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        if self._stopped:
            return
        queues = {m: ModelQueue(q, self.uncovered_since.get(m)) for m, q in self.queues.items() if q}
        wake_at = None
        if queues:
            now = self.reactor.seconds()
            plan = decide(now, queues, self._snapshots(), self.costs, self.policy, self._sizes())
            for decision in plan.decisions:
                if isinstance(decision, Serve):
                    self._serve(decision)
                elif isinstance(decision, Switch):
                    self._switch(decision)
                elif isinstance(decision, Refuse):
                    self._fail_waiting(decision.model, NoDevice(decision.model, decision.reasons))
            self._note_coverage(now)
            wake_at = plan.wake_at
        self._resume_drained()
        self._arm(wake_at)

    def _resume_drained(self) -> None:
        """A device that drained for a switch nobody needs any more serves its own model again
        (not one that drains for a reload: that one stops or restarts by itself)."""
        for slot in self.slots.values():
            if slot.phase is Phase.DRAINING and not slot.inflight and not getattr(slot.state, "forced", False) \
                    and slot.model in self.models:
                slot.switch_to(self.models[slot.model])

    def _serve(self, decision: Serve) -> None:
        ticket: Ticket = decision.request
        queue = self.queues.get(ticket.model)
        if not queue or ticket.d.called:
            return
        if queue[0] is ticket:
            queue.popleft()
        elif ticket in queue:
            queue.remove(ticket)
        else:
            return
        ticket.d.callback(self.slots[decision.device].grant(ticket.model))

    def _switch(self, decision: Switch) -> None:
        slot = self.slots[decision.device]
        log.debug("device {device}: -> {model} ({reason})", device=decision.device, model=decision.model,
                  reason=decision.reason)
        for listener in self.listeners:
            listener("switch", {"device": decision.device, "model": decision.model, "reason": decision.reason,
                                "from": slot.model})
        slot.switch_to(self.models[decision.model])

    def _note_coverage(self, now: float) -> None:
        held = {slot.destined for slot in self.slots.values()}
        for model, queue in self.queues.items():
            if model in held or not queue:
                self.uncovered_since.pop(model, None)
            else:
                self.uncovered_since.setdefault(model, now)

    def _arm(self, wake_at: float | None) -> None:
        if self._timer is not None and self._timer.active():
            if wake_at is not None and self._timer.getTime() == wake_at:
                return
            self._timer.cancel()
        self._timer = None
        if wake_at is not None:
            delay = max(0.0, wake_at - self.reactor.seconds())
            self._timer = self.reactor.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self.pump()

    # ------------------------------------------------------------ reload

    def set_models(self, models: Mapping[str, ModelSpec], policy: SwitchPolicy, max_pending: int) -> None:
        """A reloaded config: an added model can be asked for at once; the requests waiting for a
        removed one get :class:`ModelRemoved`. The limits apply to the next request."""
        self.models = models
        self.policy = policy
        self.max_pending = max_pending
        for model in [m for m in self.queues if m not in models]:
            self._fail_waiting(model, ModelRemoved(model))
        self.pump()

    # ------------------------------------------------------------ stop

    def stop(self, reason: str = "the agent is stopping") -> None:
        """Refuse every waiting request; take no more decisions."""
        self._stopped = True
        self._arm(None)
        for model in list(self.queues):
            self._fail_waiting(model, ChildStartError("-", model, reason))

    # ------------------------------------------------------------ reporting

    def queue_counts(self) -> dict[str, int]:
        """Per model with waiting requests: how many."""
        return {m: len(q) for m, q in self.queues.items() if q}

    def queue_json(self) -> dict[str, dict[str, Any]]:
        """Per model with waiting requests: how many, and how long the oldest has waited."""
        now = self.reactor.seconds()
        return {m: {"waiting": len(q), "oldest_wait_s": round(now - q[0].arrived, 3)}
                for m, q in self.queues.items() if q}
