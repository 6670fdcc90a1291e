"""DeviceSlot: queue, backpressure, switching, crash back-off and TTL, with a Clock and fake children."""

from pathlib import Path

import pytest
from twisted.internet.defer import CancelledError

from rolemesh_node.config import ModelSpec, NodeConfig
from rolemesh_node.device_slot import DeviceSlot, ModelCoolingDown, QueueFull, SlotState
from rolemesh_node.devices.base import DeviceRef
from rolemesh_node.devices.cpu import CpuBackend
from rolemesh_node.llama_server import ChildStartError
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
    slot = DeviceSlot(device=DeviceRef("cpu", 0), backend=CpuBackend(), config=cfg, reactor=reactor,
                      http=None, bin_path=lambda: "/bin/llama-server", child_factory=FakeChild,
                      port_picker=lambda: next(ports))
    return slot, reactor


def results(d):
    out = []
    d.addBoth(out.append)
    return out


def test_concurrent_ensure_server_shares_one_start(models):
    slot, _ = make_slot(models)
    first, second = results(slot.ensure_server(models["a"])), results(slot.ensure_server(models["a"]))
    assert len(FakeChild.instances) == 1
    FakeChild.instances[0].become_ready()
    assert first == second == [FakeChild.instances[0]]
    assert slot.state is SlotState.READY
    assert results(slot.ensure_server(models["a"])) == [FakeChild.instances[0]]
    assert len(FakeChild.instances) == 1


def test_child_argv_pins_host_port_and_appends_model_args(models, tmp_path):
    spec = ModelSpec(name="x", path=models["a"].path, ctx_size=512, args=("-ngl", "99"), embedding=True)
    slot, _ = make_slot({"x": spec}, llama_server_parallel=3)
    slot.ensure_server(spec)
    argv = FakeChild.instances[0].kwargs["argv"]
    start = argv.index("/bin/llama-server")
    assert argv[start + 1:start + 5] == ["--host", "127.0.0.1", "--port", "40000"]
    assert argv[argv.index("-np") + 1] == "3" and argv[argv.index("-c") + 1] == "512"
    assert "--embeddings" in argv and argv[-2:] == ["-ngl", "99"]
    assert argv[argv.index("--alias") + 1] == "x"
    env = FakeChild.instances[0].kwargs["env"]
    assert env["CUDA_VISIBLE_DEVICES"] == ""


def test_pending_bound_answers_queue_full_at_once(models):
    slot, _ = make_slot(models, max_pending_requests_per_device=2, max_concurrent_requests_per_device=1)
    one, two = results(slot.acquire(models["a"])), results(slot.acquire(models["a"]))
    three = results(slot.acquire(models["a"]))
    assert three[0].check(QueueFull) and "2 requests" in str(three[0].value)
    assert slot.inflight == 1 and len(slot.queue) == 1
    FakeChild.instances[0].become_ready()
    assert one[0].port == 40000 and two == []
    one[0].release()
    assert two[0].port == 40000  # FIFO, served once the first left
    one[0].release()  # idempotent
    assert slot.inflight == 1
    two[0].release()
    assert slot.pending == 0


def test_switch_waits_for_the_running_model_to_drain(models):
    slot, _ = make_slot(models, max_pending_requests_per_device=4, max_concurrent_requests_per_device=2)
    a1 = results(slot.acquire(models["a"]))
    FakeChild.instances[0].become_ready()
    b1 = results(slot.acquire(models["b"]))
    a2 = results(slot.acquire(models["a"]))  # behind b: no overtaking
    assert b1 == [] and a2 == [] and len(FakeChild.instances) == 1
    a1[0].release()
    assert FakeChild.instances[0].stop_calls == 1 and len(FakeChild.instances) == 2
    assert slot.target == "b" and slot.state is SlotState.STARTING
    FakeChild.instances[1].become_ready()
    assert b1[0].child.model == "b" and a2 == []
    b1[0].release()
    FakeChild.instances[2].become_ready()
    assert a2[0].child.model == "a"


def test_cancel_while_queued_leaves_the_queue(models):
    slot, _ = make_slot(models, max_pending_requests_per_device=3)
    first = slot.acquire(models["a"])
    second = slot.acquire(models["a"])
    results(first)
    got = results(second)
    second.cancel()
    assert got[0].check(CancelledError)
    assert len(slot.queue) == 0 and slot.inflight == 1


def test_cancel_while_its_server_starts_releases_the_place(models):
    slot, _ = make_slot(models)
    d = slot.acquire(models["a"])
    got = results(d)
    d.cancel()
    assert got[0].check(CancelledError) and slot.inflight == 0
    FakeChild.instances[0].become_ready()  # the start goes on, nobody waits
    assert slot.state is SlotState.READY and slot.inflight == 0


def test_failed_start_fails_every_waiter_and_frees_places(models):
    slot, _ = make_slot(models, max_pending_requests_per_device=3, max_concurrent_requests_per_device=3)
    got = [results(slot.acquire(models["a"])) for _ in range(3)]
    FakeChild.instances[0].fail_start(ChildStartError("cpu:0", "a", "exited during startup"))
    assert all(g[0].check(ChildStartError) for g in got)
    assert slot.pending == 0 and slot.state is SlotState.FAILED
    assert "exited during startup" in slot.snapshot()["last_error"]


def test_port_collision_is_retried_on_another_port(models):
    slot, _ = make_slot(models)
    got = results(slot.ensure_server(models["a"]))
    FakeChild.instances[0].fail_start(ChildStartError("cpu:0", "a", "exited", port_in_use=True))
    assert len(FakeChild.instances) == 2 and FakeChild.instances[1].port == 40001
    FakeChild.instances[1].become_ready()
    assert got == [FakeChild.instances[1]]


def test_crash_is_noticed_and_next_request_restarts(models):
    slot, _ = make_slot(models)
    slot.ensure_server(models["a"])
    FakeChild.instances[0].become_ready()
    FakeChild.instances[0].die(code=139)
    snap = slot.snapshot()
    assert slot.state is SlotState.CRASHED and snap["crashes"] == 1
    assert "exit code 139" in snap["last_exit"] and "(unexpected)" in snap["last_exit"]
    slot.ensure_server(models["a"])
    assert len(FakeChild.instances) == 2


@pytest.mark.allow_errors
def test_repeated_crashes_put_the_model_in_cooldown(models):
    slot, reactor = make_slot(models, crash_limit=3, crash_window_s=60.0, crash_cooldown_s=300.0)
    for i in range(3):
        slot.ensure_server(models["a"])
        FakeChild.instances[i].become_ready()
        FakeChild.instances[i].die()
        reactor.advance(5)
    refused = results(slot.acquire(models["a"]))
    assert refused[0].check(ModelCoolingDown)
    assert "cooldown" in str(refused[0].value) and "3 failures within 60s" in str(refused[0].value)
    assert slot.snapshot()["cooldowns"][0]["model"] == "a"
    assert len(FakeChild.instances) == 3  # no restart loop
    ok_b = results(slot.acquire(models["b"]))  # other models are not affected
    FakeChild.instances[3].become_ready()
    ok_b[0].release()
    reactor.advance(300)
    assert slot.crashes.cooldown("a") is None
    assert not results(slot.acquire(models["a"]))  # accepted again (starting)


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
    lease = results(slot.acquire(models["t"]))
    FakeChild.instances[0].become_ready()
    lease[0].release()
    reactor.advance(29)
    assert FakeChild.instances[0].stop_calls == 0
    again = results(slot.acquire(models["t"]))  # activity resets the idle timer
    again[0].release()
    reactor.advance(29)
    assert FakeChild.instances[0].stop_calls == 0
    reactor.advance(1)
    assert FakeChild.instances[0].stop_calls == 1 and slot.state is SlotState.STOPPED
    assert slot.target is None


def test_no_ttl_means_no_unload(models):
    slot, reactor = make_slot(models)
    lease = results(slot.acquire(models["a"]))
    FakeChild.instances[0].become_ready()
    lease[0].release()
    assert reactor.getDelayedCalls() == []


def test_missing_model_file_fails_without_spawning(models, tmp_path):
    spec = ModelSpec(name="gone", path=tmp_path / "gone.gguf")
    slot, _ = make_slot({"gone": spec})
    got = results(slot.ensure_server(spec))
    assert got[0].check(ChildStartError) and "missing" in got[0].value.reason
    assert FakeChild.instances == []


def test_stop_refuses_queued_requests_and_stops_the_child(models):
    slot, _ = make_slot(models, max_pending_requests_per_device=3, max_concurrent_requests_per_device=1)
    first = results(slot.acquire(models["a"]))
    FakeChild.instances[0].become_ready()
    queued = results(slot.acquire(models["a"]))
    stopped = results(slot.stop())
    assert queued[0].check(ChildStartError) and "stopping" in queued[0].value.reason
    assert stopped and FakeChild.instances[0].stop_calls == 1
    first[0].release()
    assert len(FakeChild.instances) == 1


def test_a_lease_beyond_the_child_slots_runs_when_one_ahead_leaves(models):
    # llama_server_parallel 1, two in flight (the default): the second waits inside the child
    slot, _ = make_slot(models, max_pending_requests_per_device=4)
    assert slot.max_concurrent == 2
    first, second, third = (results(slot.acquire(models["a"])) for _ in range(3))
    FakeChild.instances[0].become_ready()
    assert first[0].running and not second[0].running and third == [] and slot.inflight == 2
    calls = []
    first[0].when_running(lambda: calls.append("first"))
    second[0].when_running(lambda: calls.append("second"))
    assert calls == ["first"]
    first[0].release()
    assert calls == ["first", "second"] and second[0].running
    assert not third[0].running  # granted in turn, waits inside the child behind the second
    third[0].when_running(lambda: calls.append("third"))
    third[0].release()  # leaves before its turn: never called
    second[0].release()
    assert calls == ["first", "second"] and slot.pending == 0 and not slot.leases


def test_every_lease_runs_at_once_within_the_child_slots(models):
    slot, _ = make_slot(models, llama_server_parallel=2, max_concurrent_requests_per_device=2)
    got = [results(slot.acquire(models["a"])) for _ in range(2)]
    FakeChild.instances[0].become_ready()
    assert all(g[0].running for g in got)
