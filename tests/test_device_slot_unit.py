"""DeviceSlot: the child's state table, grants, draining switches, crash back-off and TTL (Clock, fake children)."""

from pathlib import Path

import pytest

from rolemesh_node.config import ModelSpec, NodeConfig
from rolemesh_node.device_slot import TRANSITIONS, DeviceSlot, ModelCoolingDown, SlotError
from rolemesh_node.devices.base import DeviceRef
from rolemesh_node.devices.cpu import CpuBackend
from rolemesh_node.llama_server import ChildStartError
from rolemesh_node.snapshot import Phase
from tests.fakes import FakeChild, ProcessClock


@pytest.fixture
def models(tmp_path: Path):
    out = {}
    for name, ttl in (("a", None), ("b", None), ("t", 30.0)):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"GGUF")
        out[name] = ModelSpec(name=name, path=path, ttl_s=ttl)
    return out


def make_slot(models, **config):
    FakeChild.instances = []
    reactor = ProcessClock()
    ports = iter(range(40000, 40100))
    cfg = NodeConfig(models=models, **config)
    events = []
    slot = DeviceSlot(device=DeviceRef("cpu", 0), backend=CpuBackend(), config=cfg, reactor=reactor,
                      http=None, bin_path=lambda: "/bin/llama-server", child_factory=FakeChild,
                      port_picker=lambda: next(ports), listeners=[lambda e, f: events.append((e, f))])
    slot.events = events
    return slot, reactor


def results(d):
    out = []
    d.addBoth(out.append)
    return out


def event_names(slot):
    return [e for e, _ in slot.events if e != "released"]


def test_every_phase_has_a_row_in_the_transition_table():
    assert set(TRANSITIONS) == set(Phase)


def test_switch_to_starts_and_becomes_ready(models):
    slot, _ = make_slot(models)
    assert slot.phase is Phase.IDLE and slot.model is None
    slot.switch_to(models["a"])
    assert slot.phase is Phase.STARTING and slot.model == "a" and slot.destined == "a"
    FakeChild.instances[0].become_ready()
    assert slot.phase is Phase.READY and event_names(slot) == ["start", "ready"]
    ready = dict(slot.events)["ready"]
    assert ready["model"] == "a" and ready["seconds"] == 0.0


def test_concurrent_ensure_server_shares_one_start(models):
    slot, _ = make_slot(models)
    first, second = results(slot.ensure_server(models["a"])), results(slot.ensure_server(models["a"]))
    assert len(FakeChild.instances) == 1
    FakeChild.instances[0].become_ready()
    assert first == second == [FakeChild.instances[0]]
    assert results(slot.ensure_server(models["a"])) == [FakeChild.instances[0]]
    assert len(FakeChild.instances) == 1


def test_child_argv_pins_host_port_and_appends_model_args(models, tmp_path):
    spec = ModelSpec(name="x", path=models["a"].path, ctx_size=512, args=("-ngl", "99"), embedding=True)
    slot, _ = make_slot({"x": spec}, llama_server_parallel=3)
    slot.switch_to(spec)
    argv = FakeChild.instances[0].kwargs["argv"]
    start = argv.index("/bin/llama-server")
    assert argv[start + 1:start + 5] == ["--host", "127.0.0.1", "--port", "40000"]
    assert argv[argv.index("-np") + 1] == "3" and argv[argv.index("-c") + 1] == "512"
    assert "--embeddings" in argv and argv[-2:] == ["-ngl", "99"]
    assert argv[argv.index("--alias") + 1] == "x"
    assert FakeChild.instances[0].kwargs["env"]["CUDA_VISIBLE_DEVICES"] == ""


def test_grant_needs_a_ready_child_of_that_model_with_room(models):
    slot, _ = make_slot(models, max_pending_requests_per_device=4, max_concurrent_requests_per_device=2)
    with pytest.raises(SlotError):
        slot.grant("a")
    slot.switch_to(models["a"])
    FakeChild.instances[0].become_ready()
    with pytest.raises(SlotError):
        slot.grant("b")
    one, two = slot.grant("a"), slot.grant("a")
    assert one.port == 40000 and slot.inflight == 2
    with pytest.raises(SlotError):
        slot.grant("a")
    one.release()
    one.release()  # idempotent
    assert slot.inflight == 1
    released = [f for e, f in slot.events if e == "released"]
    assert released == [{"device": "cpu:0", "model": "a", "seconds": 0.0, "drained": False}]
    two.release()
    assert slot.inflight == 0 and slot.events[-1][1]["drained"]


def test_a_switch_with_work_in_flight_drains_first(models):
    slot, _ = make_slot(models, max_pending_requests_per_device=4, max_concurrent_requests_per_device=2)
    slot.switch_to(models["a"])
    FakeChild.instances[0].become_ready()
    lease = slot.grant("a")
    slot.switch_to(models["b"])
    assert slot.phase is Phase.DRAINING and slot.model == "a" and slot.destined == "b"
    assert FakeChild.instances[0].stop_calls == 0  # work in flight is never killed
    with pytest.raises(SlotError):
        slot.grant("a")  # draining: admits nothing new
    lease.release()
    assert slot.phase is Phase.DRAINING  # the coordinator decides what comes next
    slot.switch_to(models["b"])
    assert FakeChild.instances[0].stop_calls == 1 and slot.phase is Phase.STARTING and slot.model == "b"
    FakeChild.instances[1].become_ready()
    assert slot.phase is Phase.READY and slot.switches == 1
    assert slot.snapshot().to_json()["switches"] == 1


def test_a_draining_slot_can_resume_its_model(models):
    slot, _ = make_slot(models)
    slot.switch_to(models["a"])
    FakeChild.instances[0].become_ready()
    lease = slot.grant("a")
    slot.switch_to(models["b"])
    slot.switch_to(models["a"])
    assert slot.phase is Phase.READY and len(FakeChild.instances) == 1
    lease.release()


def test_failed_start_leaves_the_slot_failed(models):
    slot, _ = make_slot(models)
    got = results(slot.ensure_server(models["a"]))
    FakeChild.instances[0].fail_start(ChildStartError("cpu:0", "a", "exited during startup"))
    assert got[0].check(ChildStartError) and slot.phase is Phase.FAILED
    assert "exited during startup" in slot.snapshot().last_error
    assert event_names(slot) == ["start", "failed"]
    slot.switch_to(models["b"])  # a failed device can take another model
    FakeChild.instances[1].become_ready()
    assert slot.phase is Phase.READY and slot.snapshot().last_error is None


def test_port_collision_is_retried_on_another_port(models):
    slot, _ = make_slot(models)
    got = results(slot.ensure_server(models["a"]))
    FakeChild.instances[0].fail_start(ChildStartError("cpu:0", "a", "exited", port_in_use=True))
    assert len(FakeChild.instances) == 2 and FakeChild.instances[1].port == 40001
    FakeChild.instances[1].become_ready()
    assert got == [FakeChild.instances[1]]


def test_crash_is_noticed_and_the_slot_fails(models):
    slot, _ = make_slot(models)
    slot.switch_to(models["a"])
    FakeChild.instances[0].become_ready()
    lease = slot.grant("a")
    FakeChild.instances[0].die(code=139)
    snap = slot.snapshot()
    assert snap.phase is Phase.FAILED and snap.crashes == 1 and "crashed" in snap.last_error
    assert "exit code 139" in snap.last_exit and "(unexpected)" in snap.last_exit
    assert event_names(slot)[-1] == "crash"
    lease.release()  # its request failed on its own connection
    slot.switch_to(models["a"])
    assert len(FakeChild.instances) == 2


@pytest.mark.allow_errors
def test_repeated_crashes_put_the_model_in_cooldown(models):
    slot, reactor = make_slot(models, crash_limit=3, crash_window_s=60.0, crash_cooldown_s=300.0)
    for i in range(3):
        slot.ensure_server(models["a"])
        FakeChild.instances[i].become_ready()
        FakeChild.instances[i].die()
        reactor.advance(5)
    refused = results(slot.ensure_server(models["a"]))
    assert refused[0].check(ModelCoolingDown)
    assert "cooldown" in str(refused[0].value) and "3 failures within 60s" in str(refused[0].value)
    snap = slot.snapshot()
    assert snap.cooldowns[0].model == "a" and snap.cooldown_models == {"a"}
    slot.switch_to(models["a"])  # refused without a spawn
    assert len(FakeChild.instances) == 3 and slot.phase is Phase.FAILED
    ok_b = results(slot.ensure_server(models["b"]))  # other models are not affected
    FakeChild.instances[3].become_ready()
    assert ok_b == [FakeChild.instances[3]]
    reactor.advance(300)
    assert slot.crashes.cooldown("a") is None


def test_crashes_spread_beyond_the_window_do_not_cool_down(models):
    slot, reactor = make_slot(models, crash_limit=3, crash_window_s=60.0)
    for i in range(4):
        slot.ensure_server(models["a"])
        FakeChild.instances[i].become_ready()
        FakeChild.instances[i].die()
        reactor.advance(31)
    assert slot.crashes.cooldown("a") is None


def test_idle_ttl_unloads_the_child(models):
    slot, reactor = make_slot(models)
    slot.switch_to(models["t"])
    FakeChild.instances[0].become_ready()
    slot.grant("t").release()
    reactor.advance(29)
    assert FakeChild.instances[0].stop_calls == 0
    slot.grant("t").release()  # activity resets the idle timer
    reactor.advance(29)
    assert FakeChild.instances[0].stop_calls == 0
    reactor.advance(1)
    assert FakeChild.instances[0].stop_calls == 1 and slot.phase is Phase.IDLE and slot.model is None
    assert event_names(slot)[-2:] == ["idle_unload", "stopped"]


def test_no_ttl_means_no_unload(models):
    slot, reactor = make_slot(models)
    slot.switch_to(models["a"])
    FakeChild.instances[0].become_ready()
    slot.grant("a").release()
    reactor.advance(slot.config.liveness_interval_s)  # the liveness check that was due finds nothing in flight
    assert reactor.getDelayedCalls() == []


def test_missing_model_file_fails_without_spawning_or_stopping_the_loaded_one(models, tmp_path):
    gone = ModelSpec(name="gone", path=tmp_path / "gone.gguf")
    slot, _ = make_slot({**models, "gone": gone})
    slot.switch_to(models["a"])
    FakeChild.instances[0].become_ready()
    got = results(slot.ensure_server(gone))
    assert got[0].check(ChildStartError) and "missing" in got[0].value.reason
    assert len(FakeChild.instances) == 1 and FakeChild.instances[0].stop_calls == 0
    assert slot.phase is Phase.READY and slot.model == "a"


def test_stop_stops_the_child(models):
    slot, _ = make_slot(models)
    slot.switch_to(models["a"])
    FakeChild.instances[0].become_ready()
    lease = slot.grant("a")
    stopped = results(slot.stop())
    assert stopped and FakeChild.instances[0].stop_calls == 1 and slot.phase is Phase.IDLE
    lease.release()
    slot.switch_to(models["b"])  # nothing starts once stopped
    assert len(FakeChild.instances) == 1


def test_stop_during_a_start_ends_idle(models):
    slot, _ = make_slot(models)
    got = results(slot.ensure_server(models["a"]))
    stopped = results(slot.stop())
    assert stopped and got[0].check(ChildStartError) and slot.phase is Phase.IDLE
    assert len(FakeChild.instances) == 1  # no retry


def test_a_lease_beyond_the_child_slots_runs_when_one_ahead_leaves(models):
    # llama_server_parallel 1, two in flight (the default): the second waits inside the child
    slot, reactor = make_slot(models, max_pending_requests_per_device=4)
    assert slot.capacity == 2
    slot.switch_to(models["a"])
    FakeChild.instances[0].become_ready()
    first, second = slot.grant("a"), slot.grant("a")
    assert first.running and not second.running
    calls = []
    first.when_running(lambda: calls.append("first"))
    second.when_running(lambda: calls.append("second"))
    assert calls == ["first"]
    reactor.advance(2)
    first.release()
    assert calls == ["first", "second"] and second.running and second.running_at == 2
    third = slot.grant("a")
    third.when_running(lambda: calls.append("third"))
    third.release()  # leaves before its turn: never called
    second.release()
    assert calls == ["first", "second"] and slot.inflight == 0


def test_clients_left_once_as_many_other_requests_arrived_as_finished(models):
    slot, _ = make_slot(models, max_pending_requests_per_device=4)
    slot.switch_to(models["a"])
    FakeChild.instances[0].become_ready()
    assert not slot.snapshot().clients_left
    one, two = slot.grant("a"), slot.grant("a")
    one.release()
    slot.note_arrival("b")  # its client moved on to b
    slot.note_arrival("a")  # a request for its own model does not count
    two.release()
    assert not slot.snapshot().clients_left  # two finished, one moved on: the other may come back
    slot.note_arrival("b")
    assert slot.snapshot().clients_left
    slot.grant("a").release()
    assert not slot.snapshot().clients_left  # counted again from the last grant


def test_every_lease_runs_at_once_within_the_child_slots(models):
    slot, _ = make_slot(models, llama_server_parallel=2, max_concurrent_requests_per_device=2)
    slot.switch_to(models["a"])
    FakeChild.instances[0].become_ready()
    assert all(slot.grant("a").running for _ in range(2))


@pytest.mark.allow_errors  # "unresponsive; killing it" is an error line on purpose
def test_a_busy_child_whose_health_stops_answering_is_killed_and_counted(models):
    from tests.fakes import ScriptedHTTP

    slot, reactor = make_slot(models, liveness_interval_s=1.0, liveness_timeout_s=0.5)
    http = slot.http = ScriptedHTTP()
    http.ready("a")
    slot.switch_to(models["a"])
    child = FakeChild.instances[0]
    child.become_ready()
    killed = []
    child.kill = lambda: (killed.append(True), child.die())
    lease = slot.grant("a")
    for _ in range(20):  # 10 s answering: a long request is fine
        reactor.advance(0.5)
    assert not killed and http.calls.count("/health") >= 5
    http.routes = {}  # nothing answers any more (SIGSTOPped)
    for _ in range(6):
        reactor.advance(0.5)
    assert killed and slot.phase.value == "failed" and "unresponsive" in slot.last_error
    assert child.hung_reason.startswith("/health did not answer")
    lease.release()
    assert slot.crash_count == 1 and not [c for c in reactor.getDelayedCalls() if "Liveness" in repr(c.func)]
