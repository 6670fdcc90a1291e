"""The node-wide waiting room on a Clock: real DeviceSlots with fake children, the real policy."""

import itertools
from pathlib import Path

import pytest
from twisted.internet.defer import CancelledError

from rolemesh_node.config import ModelSpec, NodeConfig
from rolemesh_node.coordinator import Coordinator, NoDevice, Rejected
from rolemesh_node.device_slot import DeviceSlot
from rolemesh_node.devices.base import DeviceRef
from rolemesh_node.devices.cpu import CpuBackend
from rolemesh_node.llama_server import ChildStartError
from rolemesh_node.scheduler import SwitchPolicy
from rolemesh_node.snapshot import Phase
from tests.fakes import FakeChild, ProcessClock


class Rig:
    """A coordinator over ``devices`` cpu slots whose children the test drives."""

    def __init__(self, tmp_path: Path, devices: int = 1, max_switch_wait_s: float | None = 10.0,
                 **config) -> None:
        FakeChild.instances = []
        self.reactor = ProcessClock()
        models = {}
        for name in ("a", "b", "c"):
            path = tmp_path / f"{name}.gguf"
            path.write_bytes(b"GGUF")
            models[name] = ModelSpec(name=name, path=path)
        self.config = NodeConfig(models=models, max_switch_wait_s=max_switch_wait_s, **config)
        ports = itertools.count(40000)
        self.slots: dict[str, DeviceSlot] = {}
        self.switches: list[tuple[str, str, str]] = []
        self.coordinator = Coordinator(
            reactor=self.reactor, models=models, policy=SwitchPolicy(max_switch_wait_s),
            max_pending=self.config.max_pending_requests_per_device, slots=self.slots,
            snapshots=lambda: [s.snapshot(waiting=self.coordinator.waiting(s.destined or "")) for s in
                               self.slots.values()],
            sizes=lambda: {})
        self.coordinator.listeners.append(
            lambda e, f: self.switches.append((f["device"], f["model"], f["reason"])))
        for i in range(devices):
            slot = DeviceSlot(device=DeviceRef("cpu", i), backend=CpuBackend(), config=self.config,
                              reactor=self.reactor, http=None, bin_path=lambda: "/bin/llama-server",
                              child_factory=FakeChild, port_picker=lambda: next(ports),
                              listeners=[self.coordinator.slot_event])
            self.slots[slot.id] = slot

    def submit(self, model: str) -> list:
        out: list = []
        self.coordinator.submit(model).d.addBoth(out.append)
        return out

    def child(self, device: str = "cpu:0"):
        return self.slots[device].child

    def ready(self, device: str = "cpu:0") -> None:
        self.child(device).become_ready()


def test_a_request_waits_for_the_load_and_is_served_when_ready(tmp_path):
    rig = Rig(tmp_path)
    got = rig.submit("a")
    assert got == [] and rig.slots["cpu:0"].phase is Phase.STARTING
    assert rig.coordinator.describe_wait(rig.coordinator.queues["a"][0]).startswith("loading model a on cpu:0")
    rig.reactor.advance(0.5)
    rig.ready()
    assert got[0].slot.id == "cpu:0" and got[0].model == "a"
    assert rig.coordinator.costs.switch_s("a", "cpu:0") == 0.5
    assert rig.switches == [("cpu:0", "a", "load")]


def test_requests_for_a_loaded_model_go_straight_to_its_device(tmp_path):
    rig = Rig(tmp_path, max_pending_requests_per_device=4)
    first = rig.submit("a")
    rig.ready()
    second = rig.submit("a")
    assert second[0].slot is first[0].slot and rig.slots["cpu:0"].inflight == 2
    third = rig.submit("a")  # capacity 2: waits
    assert third == [] and rig.coordinator.waiting("a") == 1
    first[0].release()
    assert third[0].slot.id == "cpu:0"


def test_grouping_serves_the_loaded_model_while_another_waits(tmp_path):
    rig = Rig(tmp_path, max_pending_requests_per_device=8)
    a1, a2 = rig.submit("a"), rig.submit("a")
    rig.ready()
    b1 = rig.submit("b")
    a3 = rig.submit("a")
    # FIFO per device would switch to b next; grouping serves a3 first
    a1[0].release()
    assert a3 and a3[0].model == "a" and b1 == []
    a2[0].release()
    a3[0].release()
    # nothing waits for a and nothing is in flight: b's turn once the device has idled for as long as a
    # switch costs (nothing measured: 50 ms) — a client of a coming back sooner keeps it
    assert rig.slots["cpu:0"].phase is Phase.READY
    rig.reactor.advance(0.049)
    assert rig.slots["cpu:0"].phase is Phase.READY
    rig.reactor.advance(0.001)
    assert rig.slots["cpu:0"].phase is Phase.STARTING and rig.slots["cpu:0"].model == "b"
    rig.ready()
    assert b1[0].model == "b"
    assert rig.switches == [("cpu:0", "a", "load"), ("cpu:0", "b", "load")]


def test_the_wait_bound_drains_a_busy_device_then_switches(tmp_path):
    rig = Rig(tmp_path, max_switch_wait_s=1.0, max_pending_requests_per_device=8)
    lease = rig.submit("a")
    rig.ready()
    b = rig.submit("b")
    rig.reactor.advance(0.5)
    busy = rig.submit("a")  # a keeps being served while b has waited less than the bound
    assert busy[0].model == "a"
    rig.reactor.advance(0.5)  # b's bound: the device drains
    slot = rig.slots["cpu:0"]
    assert slot.phase is Phase.DRAINING and slot.destined == "b" and rig.switches[-1] == ("cpu:0", "b", "overdue")
    late = rig.submit("a")
    assert late == []  # no new request of the draining model
    lease[0].release()
    assert slot.phase is Phase.DRAINING and FakeChild.instances[0].stop_calls == 0  # work in flight still runs
    busy[0].release()
    assert slot.phase is Phase.STARTING and slot.model == "b"
    rig.reactor.advance(0.25)
    rig.ready()
    assert b[0].model == "b"
    # b waited 1 s (the bound) + the drain (0 here) + the switch (0.25 s)
    assert rig.reactor.seconds() - 0.0 == pytest.approx(1.25)
    # a lost its device at t=1.25: its request is overdue a second later, not at once
    assert late == [] and slot.phase is Phase.READY
    b[0].release()
    rig.reactor.advance(0.25)  # nothing waits for b: a's turn once idle as long as a switch (0.25 s) costs
    assert slot.model == "a" and slot.phase is Phase.STARTING
    rig.ready()
    assert late[0].model == "a"


def test_a_request_cancelled_while_it_waits_leaves_and_the_drain_is_undone(tmp_path):
    rig = Rig(tmp_path, max_switch_wait_s=1.0)
    lease = rig.submit("a")
    rig.ready()
    ticket = rig.coordinator.submit("b")
    got = []
    ticket.d.addErrback(lambda f: got.append(f) or None)
    rig.reactor.advance(1.0)
    assert rig.slots["cpu:0"].phase is Phase.DRAINING
    ticket.d.cancel()
    assert got[0].check(CancelledError) and rig.coordinator.waiting("b") == 0
    lease[0].release()
    assert rig.slots["cpu:0"].phase is Phase.READY and rig.slots["cpu:0"].model == "a"  # resumed, no restart
    rig.reactor.advance(5.0)  # the liveness check due since the lease comes and finds nothing in flight
    assert len(FakeChild.instances) == 1 and rig.reactor.getDelayedCalls() == []


def test_a_hot_model_spills_onto_a_second_device_and_it_returns_when_the_burst_ends(tmp_path):
    rig = Rig(tmp_path, devices=2, max_pending_requests_per_device=8)
    first = rig.submit("a")
    rig.reactor.advance(0.1)
    rig.ready("cpu:0")  # switch cost measured: 0.1 s
    second = rig.submit("a")
    rig.reactor.advance(1.0)
    first[0].release()  # service time measured: 1.1 s
    burst = [rig.submit("a") for _ in range(3)]
    assert rig.slots["cpu:1"].phase is Phase.STARTING and rig.slots["cpu:1"].model == "a"
    assert ("cpu:1", "a", "replica") in rig.switches
    rig.ready("cpu:1")
    assert sorted(b[0].slot.id for b in burst if b) == ["cpu:0", "cpu:1", "cpu:1"]
    for lease in [second[0]] + [b[0] for b in burst]:
        lease.release()
    b = rig.submit("b")  # the burst is over: a device holding a goes to b (after idling as long as a load)
    rig.reactor.advance(0.1)
    assert rig.switches[-1][1:] == ("b", "load") and b == []
    rig.ready(rig.switches[-1][0])
    assert b[0].model == "b"


def test_a_crash_during_a_switch_fails_its_waiters_and_frees_the_device(tmp_path):
    rig = Rig(tmp_path, max_pending_requests_per_device=4)
    waiting = [rig.submit("a") for _ in range(3)]
    FakeChild.instances[0].fail_start(ChildStartError("cpu:0", "a", "llama-server exited during startup"))
    assert all(w[0].check(ChildStartError) for w in waiting)
    assert rig.coordinator.waiting("a") == 0 and rig.slots["cpu:0"].phase is Phase.FAILED
    b = rig.submit("b")  # the failed device takes the next model
    rig.ready()
    assert b[0].model == "b"


def test_a_crash_while_serving_restarts_for_the_waiters(tmp_path):
    rig = Rig(tmp_path)
    lease = rig.submit("a")
    rig.ready()
    rig.submit("a")
    waiting = rig.submit("a")
    rig.child().die(code=139)
    lease[0].release()
    assert rig.slots["cpu:0"].phase is Phase.STARTING and len(FakeChild.instances) == 2
    rig.ready()
    assert waiting[0].model == "a"


def test_the_waiting_bound_answers_429_with_an_estimated_retry_after(tmp_path):
    rig = Rig(tmp_path, max_pending_requests_per_device=3, max_concurrent_requests_per_device=2)
    leases = [rig.submit("a") for _ in range(3)]
    rig.ready()
    rig.reactor.advance(2.0)
    leases[0][0].release()  # service time 2 s
    rig.submit("a")  # 2 in flight + 1 waiting = 3
    with pytest.raises(Rejected) as refused:
        rig.coordinator.submit("a")
    assert refused.value.retry_after_s == 4  # (1 waiting + 1) x 2 s / 1 slot
    assert "max_pending_requests_per_device x 1 device" in str(refused.value)


def test_the_bound_grows_with_the_devices_able_to_serve(tmp_path):
    rig = Rig(tmp_path, devices=2, max_pending_requests_per_device=2, max_concurrent_requests_per_device=1)
    for _ in range(4):
        rig.submit("a")
    with pytest.raises(Rejected):
        rig.coordinator.submit("a")


@pytest.mark.allow_errors
def test_cooldown_everywhere_is_503_at_once(tmp_path):
    rig = Rig(tmp_path, crash_limit=1)
    waiting = rig.submit("a")
    FakeChild.instances[0].fail_start(ChildStartError("cpu:0", "a", "exited"))
    assert waiting[0].check(ChildStartError)
    with pytest.raises(NoDevice) as refused:
        rig.coordinator.submit("a")
    assert "cooldown" in str(refused.value)


def test_stop_refuses_every_waiting_request(tmp_path):
    rig = Rig(tmp_path)
    waiting = rig.submit("a")
    rig.coordinator.stop()
    assert waiting[0].check(ChildStartError) and "stopping" in str(waiting[0].value)
    assert rig.reactor.getDelayedCalls() == []


def test_a_request_joining_a_backlog_asks_for_a_decision_only_when_a_device_is_free(tmp_path, monkeypatch):
    import rolemesh_node.coordinator as coordinator_module

    rig = Rig(tmp_path, devices=2, max_pending_requests_per_device=8)
    calls = []
    real = coordinator_module.decide
    monkeypatch.setattr(coordinator_module, "decide", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = [rig.submit("a") for _ in range(3)]  # a cold burst: cpu:0 loads a, cpu:1 a replica
    rig.ready("cpu:0")
    rig.ready("cpu:1")
    assert all(f for f in first)
    [rig.submit("a") for _ in range(2)]  # both devices full (capacity 2 each): a backlog of one
    before = len(calls)
    joined = rig.submit("a")  # behind it, no device free: no decision needed
    assert len(calls) == before and joined == [] and rig.coordinator.waiting("a") == 2
    rig.slots["cpu:1"].leases[0].release()  # a place frees: the oldest waiter takes it at once
    assert rig.coordinator.waiting("a") == 1 and joined == []
    for lease in list(rig.slots["cpu:1"].leases):
        lease.release()  # cpu:1 serves the last one, then has room
    assert joined and rig.coordinator.waiting("a") == 0


def test_the_first_request_to_wait_behind_full_holders_asks_for_no_decision(tmp_path, monkeypatch):
    import rolemesh_node.coordinator as coordinator_module

    rig = Rig(tmp_path, max_pending_requests_per_device=3)
    served = rig.submit("a")
    rig.ready()
    assert served and rig.submit("a")  # cpu:0 holds a, full now (capacity 2)
    calls = []
    real = coordinator_module.decide
    monkeypatch.setattr(coordinator_module, "decide", lambda *a, **k: calls.append(1) or real(*a, **k))
    waiting = rig.submit("a")  # no queue yet, no room, a ready holder: it waits, no snapshot, no decision
    assert calls == [] and waiting == [] and rig.coordinator.waiting("a") == 1
    with pytest.raises(Rejected):  # the holder's bound (3) is reached: the full way, and its 429
        rig.coordinator.submit("a")
    served[0].release()  # a place frees on the holder: the waiter takes it
    assert waiting and waiting[0].slot.id == "cpu:0" and rig.coordinator.waiting("a") == 0
