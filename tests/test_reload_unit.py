"""Config reload, without processes: the diff (pure), the store's validation, and what a slot
does with a reloaded config (Clock, fake children), and model files replaced on disk."""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from types import MappingProxyType

import pytest

from rolemesh_node.config import ConfigError, ModelSpec, NodeConfig, load_config
from rolemesh_node.coordinator import Coordinator, ModelRemoved, Ticket
from rolemesh_node.device_slot import DeviceSlot
from rolemesh_node.devices.base import DeviceRef
from rolemesh_node.devices.cpu import CpuBackend
from rolemesh_node.model_files import STABLE_TICKS, ModelFiles
from rolemesh_node.reload import (
    CHILDREN,
    DISPATCHER,
    KEY_CLASSES,
    LIVE,
    RESTART,
    ConfigStore,
    diff,
    effective,
    rejected_line,
)
from rolemesh_node.scheduler import SwitchPolicy
from rolemesh_node.snapshot import Phase
from tests.fakes import FakeChild, ProcessClock

# --------------------------------------------------------------------------- the diff


def config(**kwargs: object) -> NodeConfig:
    models = kwargs.pop("models", {})
    return NodeConfig(models=MappingProxyType(dict(models)), **kwargs)  # type: ignore[arg-type]


def spec(name: str, **kwargs: object) -> ModelSpec:
    return ModelSpec(name=name, path=Path(f"/models/{name}.gguf"), **kwargs)  # type: ignore[arg-type]


def test_every_key_has_a_class() -> None:
    keys = {f.name for f in dataclasses.fields(NodeConfig)} - {"source", "models"}
    assert set(KEY_CLASSES) == keys
    assert set(KEY_CLASSES.values()) == {LIVE, CHILDREN, DISPATCHER, RESTART}
    # what the issue names, in the class it names
    for key in ("listen_host", "listen_port", "backend", "devices"):
        assert KEY_CLASSES[key] == RESTART
    for key in ("llama_server_bin", "llama_server_parallel", "llama_server_extra_args"):
        assert KEY_CLASSES[key] == CHILDREN
    for key in ("api_keys", "request_timeout_s", "max_pending_requests_per_device", "drain_timeout_s"):
        assert KEY_CLASSES[key] == LIVE


def test_the_same_config_is_no_change() -> None:
    old = config(models={"a": spec("a")})
    assert diff(old, config(models={"a": spec("a")})).empty


def test_models_added_removed_restarted_updated() -> None:
    old = config(models={"keep": spec("keep"), "gone": spec("gone"), "ctx": spec("ctx"), "path": spec("path"),
                         "args": spec("args"), "emb": spec("emb"), "alias": spec("alias"), "ttl": spec("ttl")})
    new = config(models={"keep": spec("keep"), "ctx": spec("ctx", ctx_size=4096),
                         "path": ModelSpec(name="path", path=Path("/models/other.gguf")),
                         "args": spec("args", args=("-ngl", "9")), "emb": spec("emb", embedding=True),
                         "alias": spec("alias", aliases=("x",)), "ttl": spec("ttl", ttl_s=60.0),
                         "new": spec("new")})
    changes = diff(old, new)
    assert changes.models_added == ("new",)
    assert changes.models_removed == ("gone",)
    assert set(changes.models_restarted) == {"ctx", "path", "args", "emb"}
    assert set(changes.models_updated) == {"alias", "ttl"}
    assert changes.models_changed and not changes.live and not changes.needs_restart


def test_keys_by_class_and_the_effective_config() -> None:
    old = config(listen_port=8088, request_timeout_s=600.0, llama_server_parallel=1, heartbeat_interval_s=10.0)
    new = config(listen_port=9000, request_timeout_s=30.0, llama_server_parallel=2, heartbeat_interval_s=5.0,
                 api_keys=("k" * 16,))
    changes = diff(old, new)
    # the two limits derived from llama_server_parallel changed with it (unset in both files)
    assert changes.live == ("api_keys", "max_concurrent_requests_per_device", "max_pending_requests_per_device",
                            "request_timeout_s")
    assert changes.children == ("llama_server_parallel",)
    assert changes.dispatcher == ("heartbeat_interval_s",)
    assert changes.needs_restart == ("listen_port",)
    running = effective(old, new, changes)
    assert running.listen_port == 8088  # kept: needs a restart
    assert running.request_timeout_s == 30.0 and running.llama_server_parallel == 2
    assert changes.to_json()["needs_restart"] == ["listen_port"]


def test_store_rejects_an_invalid_file_with_the_one_line(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("listen_port: 8088\n")
    store = ConfigStore(load_config(path))
    path.write_text("listen_port: 8088\nmodels:\n  a:\n    path: a.gguf\n    ctx_size: 8\n")
    with pytest.raises(ConfigError) as caught:
        store.load()
    assert rejected_line(caught.value) == \
        f"config reload rejected: {path}: models.a.ctx_size: must be at least 16, got 8"
    path.write_text("listen_port: 8088\napi_key_file: keys.txt\n")  # what the start reads besides the YAML
    with pytest.raises(ConfigError, match="api_key_file"):
        store.load()
    path.write_text("listen_port: 8088\nllama_server_bin: /no/such/llama-server\n")
    with pytest.raises(ConfigError, match="llama_server_bin"):
        store.load()


def test_store_without_a_file_rejects() -> None:
    with pytest.raises(ConfigError, match="not started from a config file"):
        ConfigStore(NodeConfig()).load()


# --------------------------------------------------------------------------- a slot


@pytest.fixture
def models(tmp_path: Path) -> dict[str, ModelSpec]:
    out = {}
    for name in ("a", "b"):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"GGUF")
        out[name] = ModelSpec(name=name, path=path)
    return out


def make_slot(models: dict[str, ModelSpec], versions: dict[str, int] | None = None, **kwargs: object):
    FakeChild.instances = []
    reactor = ProcessClock()
    ports = iter(range(41000, 41100))
    cfg = NodeConfig(models=MappingProxyType(dict(models)), max_pending_requests_per_device=4,
                     max_concurrent_requests_per_device=2, **kwargs)  # type: ignore[arg-type]
    events: list[str] = []
    versions = versions if versions is not None else {}
    slot = DeviceSlot(device=DeviceRef("cpu", 0), backend=CpuBackend(), config=cfg, reactor=reactor, http=None,
                      bin_path=lambda: "/bin/llama-server", child_factory=FakeChild,
                      port_picker=lambda: next(ports), listeners=[lambda e, f: events.append(e)],
                      file_version=lambda name: versions.get(name, 0))
    slot.events = events  # type: ignore[attr-defined]
    return slot, cfg


def ready(slot: DeviceSlot, model: ModelSpec) -> FakeChild:
    slot.switch_to(model)
    child = FakeChild.instances[-1]
    child.become_ready()
    return child


def reloaded(slot: DeviceSlot, cfg: NodeConfig, **changes: object) -> NodeConfig:
    new = dataclasses.replace(cfg, **changes)
    slot.apply_config(new)
    return new


def test_an_untouched_child_is_left_alone(models: dict[str, ModelSpec]) -> None:
    slot, cfg = make_slot(models)
    child = ready(slot, models["a"])
    reloaded(slot, cfg, request_timeout_s=5.0, models=MappingProxyType({"a": models["a"], "c": models["b"]}))
    assert not slot.stale()
    slot.reconcile()
    assert slot.child is child and slot.phase is Phase.READY and child.stop_calls == 0


def test_a_removed_model_stops_after_its_requests_in_flight(models: dict[str, ModelSpec]) -> None:
    slot, cfg = make_slot(models)
    child = ready(slot, models["a"])
    lease = slot.grant("a")
    reloaded(slot, cfg, models=MappingProxyType({"b": models["b"]}))
    slot.reconcile(restart=False)
    assert slot.phase is Phase.DRAINING and slot.destined is None and child.stop_calls == 0
    lease.release()
    assert child.stop_calls == 1 and slot.phase is Phase.IDLE and "stopped" in slot.events


def test_a_stale_child_restarts_after_its_requests_in_flight(models: dict[str, ModelSpec]) -> None:
    slot, cfg = make_slot(models)
    child = ready(slot, models["a"])
    lease = slot.grant("a")
    changed = dataclasses.replace(models["a"], ctx_size=4096)
    reloaded(slot, cfg, models=MappingProxyType({"a": changed, "b": models["b"]}))
    assert slot.stale()
    slot.reconcile()
    assert slot.phase is Phase.DRAINING and slot.restarting and slot.destined == "a"
    slot.switch_to(models["a"])  # the scheduler cannot take a reload's drain back
    assert slot.phase is Phase.DRAINING
    lease.release()
    assert child.stop_calls == 1 and slot.phase is Phase.STARTING and slot.model == "a"
    fresh = FakeChild.instances[-1]
    assert fresh is not child and "-c" in fresh.kwargs["argv"] and "4096" in fresh.kwargs["argv"]
    fresh.become_ready()
    assert slot.phase is Phase.READY and not slot.stale() and not slot.restarting


def test_a_child_setting_makes_every_child_stale(models: dict[str, ModelSpec]) -> None:
    slot, cfg = make_slot(models)
    ready(slot, models["a"])
    reloaded(slot, cfg, llama_server_extra_args=("--mlock",))
    assert slot.stale()
    slot.reconcile(restart=False)  # a removal-only pass leaves it
    assert slot.phase is Phase.READY
    slot.reconcile()  # no request in flight: at once
    assert slot.phase is Phase.STARTING and "--mlock" in FakeChild.instances[-1].kwargs["argv"]


def test_a_retire_can_become_a_switch(models: dict[str, ModelSpec]) -> None:
    slot, cfg = make_slot(models)
    ready(slot, models["a"])
    lease = slot.grant("a")
    reloaded(slot, cfg, models=MappingProxyType({"b": models["b"]}))
    slot.reconcile()
    slot.switch_to(models["b"])  # the scheduler wants the device for b meanwhile
    assert slot.destined == "b"
    lease.release()
    assert slot.phase is Phase.STARTING and slot.model == "b"


def test_a_model_file_replaced_on_disk_makes_its_child_stale(models: dict[str, ModelSpec]) -> None:
    versions = {"a": 0}
    slot, _ = make_slot(models, versions)
    ready(slot, models["a"])
    versions["a"] = 1
    assert slot.stale()


def test_a_start_of_a_model_removed_meanwhile_ends_idle(models: dict[str, ModelSpec]) -> None:
    slot, cfg = make_slot(models)
    slot.switch_to(models["a"])
    reloaded(slot, cfg, models=MappingProxyType({"b": models["b"]}))
    FakeChild.instances[-1].become_ready()
    assert slot.phase is Phase.IDLE


# --------------------------------------------------------------------------- the coordinator


def test_waiting_requests_of_a_removed_model_get_model_removed(models: dict[str, ModelSpec]) -> None:
    clock = ProcessClock()
    coordinator = Coordinator(reactor=clock, models=models, policy=SwitchPolicy(), max_pending=4, slots={},
                              snapshots=lambda: [], sizes=lambda: {})
    waiting = Ticket(coordinator, "a", 0.0)  # as submit() queues one while no device can take it yet
    coordinator.queues["a"] = collections.deque([waiting])
    failures: list[object] = []
    waiting.d.addErrback(failures.append)
    coordinator.set_models({"b": models["b"]}, SwitchPolicy(), 4)
    assert failures and failures[0].check(ModelRemoved)  # type: ignore[attr-defined]
    assert coordinator.waiting("a") == 0


# --------------------------------------------------------------------------- model files


def test_a_replaced_file_is_a_new_version_once_it_stays_the_same(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF old")
    files = ModelFiles([ModelSpec(name="m", path=path)])
    assert files.refresh() == [] and files.version("m") == 0
    path.write_bytes(b"GGUF new, still being copied")
    os.utime(path, ns=(1, 1))
    assert files.refresh() == []  # seen changing
    path.write_bytes(b"GGUF new, longer: the copy went on")
    assert files.refresh() == []  # changed again: a copy in progress
    for _ in range(STABLE_TICKS - 1):
        assert files.refresh() == []
    assert files.refresh() == ["m"] and files.version("m") == 1
    assert files.refresh() == [] and files.version("m") == 1  # once
