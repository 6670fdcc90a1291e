"""The scheduling policy: a pure function of waiting requests, device snapshots and measured costs."""

from dataclasses import dataclass

import pytest

from rolemesh_node.costs import CostBook
from rolemesh_node.scheduler import (
    ModelQueue,
    Refuse,
    Serve,
    Switch,
    SwitchPolicy,
    decide,
    estimate_wait_s,
)
from rolemesh_node.snapshot import DeviceSnapshot, Phase

GB = 1024**3


@dataclass(frozen=True)
class Req:
    name: str
    arrived: float


def dev(device_id="cpu:0", phase=Phase.IDLE, model=None, *, next_model=None, in_flight=0, capacity=2, slots=1,
        free=None, loaded=None, cooldown=()):
    return DeviceSnapshot(device_id=device_id, index=int(device_id.split(":")[1]), phase=phase, model=model,
                          next_model=next_model, in_flight=in_flight, capacity=capacity, slots=slots,
                          free_memory_bytes=free, loaded_model_bytes=loaded, cooldown_models=frozenset(cooldown))


def queues(**models):
    """queues(a=[0.0, 1.0]) -> waiting requests for model a that arrived at t=0 and t=1."""
    return {m: ModelQueue([Req(f"{m}{i}", t) for i, t in enumerate(times)]) for m, times in models.items()}


def plan_of(now, waiting, devices, costs=None, policy=None, sizes=None):
    return decide(now, waiting, devices, costs or CostBook(), policy or SwitchPolicy(max_switch_wait_s=10.0),
                  sizes)


def names(plan):
    out = []
    for d in plan.decisions:
        if isinstance(d, Serve):
            out.append(("serve", d.request.name, d.device))
        elif isinstance(d, Switch):
            out.append(("switch", d.device, d.model, d.reason))
        else:
            out.append(("refuse", d.model))
    return out


def test_nothing_waits_nothing_to_do():
    plan = plan_of(0.0, {}, [dev()])
    assert plan.decisions == () and plan.wake_at is None


def test_an_idle_device_loads_the_oldest_waiting_model():
    plan = plan_of(5.0, queues(b=[2.0], a=[1.0]), [dev()])
    assert names(plan) == [("switch", "cpu:0", "a", "load")]
    assert plan.wake_at == 12.0  # b's head becomes overdue at 2 + 10


def test_a_ready_device_serves_its_model_up_to_its_capacity():
    plan = plan_of(1.0, queues(a=[0.1, 0.2, 0.3]), [dev(phase=Phase.READY, model="a", in_flight=1, capacity=3)])
    assert names(plan) == [("serve", "a0", "cpu:0"), ("serve", "a1", "cpu:0")]


def test_grouping_keeps_serving_the_loaded_model_while_another_waits():
    # b waits (not overdue yet) while a still has requests: the device stays on a
    plan = plan_of(3.0, queues(a=[2.5], b=[1.0]), [dev(phase=Phase.READY, model="a", in_flight=1)])
    assert names(plan) == [("serve", "a0", "cpu:0")]
    assert plan.wake_at == 11.0


def test_a_device_whose_model_has_nothing_waiting_or_in_flight_switches_at_once():
    plan = plan_of(3.0, queues(b=[2.9]), [dev(phase=Phase.READY, model="a", in_flight=0)])
    assert names(plan) == [("switch", "cpu:0", "b", "load")]


def test_an_idle_device_switches_only_after_idling_as_long_as_the_switch_costs():
    costs = CostBook()
    costs.record_switch("b", "cpu:0", 0.4)
    idle = DeviceSnapshot(device_id="cpu:0", index=0, phase=Phase.READY, model="a", idle_since=3.0, capacity=2)
    plan = plan_of(3.1, queues(b=[2.9]), [idle], costs)
    assert plan.decisions == () and plan.wake_at == pytest.approx(3.4)  # rent before buying
    plan = plan_of(3.4, queues(b=[2.9]), [idle], costs)
    assert names(plan) == [("switch", "cpu:0", "b", "load")]
    assert SwitchPolicy(max_switch_wait_s=0.1).grace("b", "cpu:0", costs) == 0.1  # never beyond the bound


def test_work_in_flight_is_not_drained_before_the_bound():
    plan = plan_of(3.0, queues(b=[2.0]), [dev(phase=Phase.READY, model="a", in_flight=2)])
    assert plan.decisions == () and plan.wake_at == 12.0


def test_the_wait_bound_makes_a_busy_device_drain_and_switch():
    plan = plan_of(12.0, queues(a=[11.9], b=[2.0]), [dev(phase=Phase.READY, model="a", in_flight=2)])
    # due: the device (full) is claimed for b: it drains, a gets no more
    assert names(plan) == [("switch", "cpu:0", "b", "overdue")]


def test_a_device_that_just_loaded_its_model_serves_a_round_before_it_drains():
    # b's requests waited for this load; a is overdue too: b's waiters are served, then the device drains
    plan = plan_of(31.0, {"a": ModelQueue([Req("a0", 10.0)], uncovered_since=10.0),
                          "b": ModelQueue([Req("b0", 1.0), Req("b1", 2.0), Req("b2", 3.0)])},
                   [dev(phase=Phase.READY, model="b", in_flight=0, capacity=2)], policy=SwitchPolicy(20.0))
    assert names(plan) == [("serve", "b0", "cpu:0"), ("serve", "b1", "cpu:0"), ("switch", "cpu:0", "a", "overdue")]


def test_overdue_counts_from_when_the_model_lost_its_device():
    waiting = {"a": ModelQueue([Req("a0", 1.0)], uncovered_since=8.0), "b": ModelQueue([Req("b0", 9.0)])}
    plan = plan_of(12.0, waiting, [dev(phase=Phase.READY, model="b", in_flight=1)])
    assert names(plan) == [("serve", "b0", "cpu:0")]  # a is due at 8 + 10, not 1 + 10
    assert plan.wake_at == 18.0


def test_the_overdue_model_takes_the_device_with_least_in_flight():
    devices = [dev("cpu:0", Phase.READY, "a", in_flight=2), dev("cpu:1", Phase.READY, "c", in_flight=1)]
    plan = plan_of(20.0, queues(a=[19.0], b=[1.0]), devices)
    assert names(plan) == [("switch", "cpu:1", "b", "overdue")]  # cpu:0 is full (capacity 2): a0 waits


def test_a_drained_device_switches_to_the_model_it_drained_for():
    d = dev(phase=Phase.DRAINING, model="a", next_model="b", in_flight=0)
    plan = plan_of(20.0, queues(a=[19.0], b=[1.0]), [d])
    assert names(plan) == [("switch", "cpu:0", "b", "drained")]


def test_a_drained_device_resumes_its_model_when_nobody_waits_for_the_other():
    d = dev(phase=Phase.DRAINING, model="a", next_model="b", in_flight=0)
    plan = plan_of(20.0, queues(a=[19.0]), [d])
    assert names(plan) == [("switch", "cpu:0", "a", "resume")]


def test_a_draining_device_with_work_takes_nothing():
    d = dev(phase=Phase.DRAINING, model="a", next_model="b", in_flight=1)
    plan = plan_of(20.0, queues(a=[19.0], b=[1.0]), [d])
    assert plan.decisions == ()


def test_requests_for_a_model_on_two_devices_go_where_there_is_most_room():
    devices = [dev("cpu:0", Phase.READY, "a", in_flight=1, capacity=2),
               dev("cpu:1", Phase.READY, "a", in_flight=0, capacity=2)]
    plan = plan_of(1.0, queues(a=[0.1, 0.2, 0.3, 0.4]), devices)
    assert names(plan) == [("serve", "a0", "cpu:1"), ("serve", "a1", "cpu:0"), ("serve", "a2", "cpu:1")]


def test_a_free_device_prefers_an_empty_one_over_evicting_a_loaded_model():
    devices = [dev("cpu:0", Phase.READY, "x", in_flight=0), dev("cpu:1", Phase.IDLE)]
    plan = plan_of(1.0, queues(a=[0.5]), devices)
    assert names(plan) == [("switch", "cpu:1", "a", "load")]


def test_a_hot_model_gets_a_replica_when_waiting_costs_more_than_a_load():
    costs = CostBook()
    costs.record_switch("a", "cpu:0", 0.5)
    costs.record_service("a", 1.0)
    devices = [dev("cpu:0", Phase.READY, "a", in_flight=2, capacity=2, slots=1), dev("cpu:1", Phase.IDLE)]
    plan = plan_of(1.0, queues(a=[0.1, 0.2, 0.3]), devices, costs)
    assert names(plan) == [("switch", "cpu:1", "a", "replica")]  # 3 x 1.0 s / 1 slot > 0.5 s load


def test_a_cold_burst_spills_onto_an_empty_device_whether_or_not_the_first_is_ready_yet():
    # nothing measured: one request more than the holder can take now is enough, starting or ready
    starting = [dev("cpu:0", Phase.STARTING, "a", capacity=1), dev("cpu:1", Phase.IDLE)]
    assert names(plan_of(1.0, queues(a=[0.1]), starting)) == []
    assert names(plan_of(1.0, queues(a=[0.1, 0.2]), starting)) == [("switch", "cpu:1", "a", "replica")]
    ready = [dev("cpu:0", Phase.READY, "a", in_flight=1, capacity=1), dev("cpu:1", Phase.IDLE)]
    assert names(plan_of(1.0, queues(a=[0.2]), ready)) == [("switch", "cpu:1", "a", "replica")]
    # a device this very plan loads counts as starting: one request loads one device, not two
    idle = [dev("cpu:0", capacity=1), dev("cpu:1", capacity=1)]
    assert names(plan_of(1.0, queues(a=[0.1]), idle)) == [("switch", "cpu:0", "a", "load")]
    assert names(plan_of(1.0, queues(a=[0.1, 0.2]), idle)) == [("switch", "cpu:0", "a", "load"),
                                                               ("switch", "cpu:1", "a", "replica")]


def test_no_replica_when_waiting_is_cheaper_than_a_load():
    costs = CostBook()
    costs.record_switch("a", "cpu:0", 5.0)
    costs.record_service("a", 0.1)
    devices = [dev("cpu:0", Phase.READY, "a", in_flight=2, capacity=2), dev("cpu:1", Phase.IDLE)]
    plan = plan_of(1.0, queues(a=[0.1, 0.2]), devices, costs)
    assert plan.decisions == ()


def test_no_replica_on_a_device_whose_model_has_waiters():
    costs = CostBook()
    costs.record_switch("a", "cpu:0", 0.1)
    costs.record_service("a", 1.0)
    devices = [dev("cpu:0", Phase.READY, "a", in_flight=2), dev("cpu:1", Phase.READY, "b", in_flight=2)]
    plan = plan_of(1.0, queues(a=[0.1, 0.2], b=[0.5]), devices, costs)
    assert plan.decisions == ()


def test_a_replica_returns_to_another_model_once_its_burst_is_over():
    devices = [dev("cpu:0", Phase.READY, "a", in_flight=1), dev("cpu:1", Phase.READY, "a", in_flight=0)]
    plan = plan_of(1.0, queues(b=[0.9]), devices)
    assert names(plan) == [("switch", "cpu:1", "b", "load")]


def test_cooldown_everywhere_refuses_the_model():
    devices = [dev("cpu:0", cooldown=["a"]), dev("cpu:1", cooldown=["a"])]
    plan = plan_of(1.0, queues(a=[0.5], b=[0.6]), devices)
    assert names(plan)[0] == ("refuse", "a")
    assert isinstance(plan.decisions[0], Refuse) and "cooldown" in plan.decisions[0].reasons["cpu:0"]
    assert ("switch", "cpu:0", "b", "load") in names(plan)


def test_a_model_that_does_not_fit_goes_where_it_fits():
    devices = [dev("cuda:0", free=4 * GB), dev("cuda:1", Phase.READY, "big", free=3 * GB, loaded=5 * GB)]
    plan = plan_of(1.0, queues(m=[0.5]), devices, sizes={"m": 6 * GB})
    assert names(plan) == [("switch", "cuda:1", "m", "load")]


def test_starting_device_counts_as_holding_its_model():
    plan = plan_of(1.0, queues(a=[0.5]), [dev("cpu:0", Phase.STARTING, "a"), dev("cpu:1")])
    assert plan.decisions == ()


def test_a_model_fits_on_the_device_that_is_loading_it():
    loading = dev("cuda:0", Phase.STARTING, "big", free=38 * GB, loaded=42 * GB)
    plan = plan_of(1.0, queues(big=[0.5, 0.6]), [loading], sizes={"big": 42 * GB})
    assert plan.decisions == ()  # waits for the load; not refused


def test_an_idle_device_whose_clients_moved_on_switches_without_waiting():
    costs = CostBook()
    costs.record_switch("b", "cpu:0", 0.4)
    idle = DeviceSnapshot(device_id="cpu:0", index=0, phase=Phase.READY, model="a", idle_since=3.0, capacity=2,
                          clients_left=True)
    plan = plan_of(3.1, queues(b=[2.9]), [idle], costs)
    assert names(plan) == [("switch", "cpu:0", "b", "load")]


def test_derived_wait_bound_follows_the_measured_switch_cost():
    costs = CostBook()
    policy = SwitchPolicy()
    assert policy.max_wait("a", costs) == 1.0  # nothing measured: the floor
    costs.record_switch("a", "cuda:0", 4.0)
    assert policy.max_wait("a", costs) == 20.0
    costs.record_service("a", 2.0)  # the drain before a switch counts too
    assert policy.max_wait("a", costs) == 30.0
    costs.record_switch("b", "cuda:0", 25.0)
    assert policy.max_wait("b", costs) == 60.0  # the ceiling
    assert SwitchPolicy(max_switch_wait_s=0.0).max_wait("b", costs) == 0.0


def test_switch_cost_estimates_fall_back_to_other_devices_and_sizes():
    costs = CostBook()
    costs.record_switch("a", "cuda:0", 2.0)
    assert costs.switch_s("a", "cuda:1") == 2.0
    assert costs.switch_s("b", "cuda:0", {"a": 1 * GB, "b": 3 * GB}) == pytest.approx(6.0)
    assert costs.switch_s("b", "cuda:0") is None


def test_estimated_wait_for_retry_after():
    costs = CostBook()
    costs.record_service("a", 0.5)
    devices = [dev("cpu:0", Phase.READY, "a", in_flight=2, slots=1)]
    assert estimate_wait_s("a", 3, devices, costs, SwitchPolicy()) == pytest.approx(2.0)
    costs.record_switch("b", "cpu:0", 2.0)
    # nobody holds b: the bound (5 x (2 s switch + 0.5 s longest service)), b's service (unknown) and a load
    assert estimate_wait_s("b", 0, devices, costs, SwitchPolicy()) == pytest.approx(12.5 + 0.0 + 2.0)


def test_two_models_alternate_under_the_bound_on_one_device():
    """Drive the policy by hand: a and b each always have a request waiting (the served model's
    request is always fresh, the other's head keeps its age); the device switches once per bound."""
    policy = SwitchPolicy(max_switch_wait_s=1.0)
    costs = CostBook()
    now, model, switches, uncovered, head = 0.0, "a", 0, {"b": 0.0}, {"a": 0.0, "b": 0.0}
    longest = 0.0
    for _ in range(400):  # 4 s in steps of 10 ms
        head[model] = now - 0.005
        waiting = {m: ModelQueue([Req(m, head[m])], uncovered.get(m)) for m in ("a", "b")}
        plan = decide(now, waiting, [dev(phase=Phase.READY, model=model, in_flight=1)], costs, policy)
        switch = [d for d in plan.decisions if isinstance(d, Switch)]
        if switch:
            assert switch[0].reason == "overdue" and switch[0].model != model
            longest = max(longest, now - head[switch[0].model])
            uncovered = {model: now}
            model = switch[0].model
            switches += 1
        now += 0.01
    assert 3 <= switches <= 4
    assert longest <= 1.0 + 0.02  # the bound, to the step (10 ms) and the request age (5 ms)
