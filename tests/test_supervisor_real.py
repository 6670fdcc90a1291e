"""The supervised llama-server children, through the real binary and real HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from rolemesh_node.device_slot import ChildStartError
from rolemesh_node.llama_server import ChildState, free_port
from rolemesh_node.snapshot import Phase

pytestmark = pytest.mark.llama


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b")")[-1].split()[0] != b"Z"
    except OSError:
        return False


async def eventually(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


def models_config(tiny_models: dict[str, Path], **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "backend": "cpu",
        "llama_server_startup_timeout_s": 20,
        "models": {
            "tiny-a": {"path": tiny_models["tiny-a"], "ctx_size": 512},
            "tiny-b": {"path": tiny_models["tiny-b"], "ctx_size": 512},
        },
    }
    config.update(extra)
    return config


def spec(service: Any, name: str) -> Any:
    return service.config.models[name]


@pytest_twisted.ensureDeferred
async def test_start_readiness_pinning_and_host(node_service, tiny_models, llama_server_bin, http_client):
    service = await node_service(models_config(tiny_models, llama_server_probe_interval_s=5.0,
                                               llama_server_parallel=2))
    slot = service.node.slots["cpu:0"]
    child = await slot.ensure_server(spec(service, "tiny-a"))
    assert child.state is ChildState.READY and slot.phase is Phase.READY
    # Readiness came from the log line, not from the 5 s probe interval.
    assert slot.last_switch_s is not None and slot.last_switch_s < 2.5
    cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[cmdline.index(b"--host") + 1] == b"127.0.0.1"
    assert cmdline[cmdline.index(b"--port") + 1] == str(child.port).encode()
    assert cmdline[cmdline.index(b"-np") + 1] == b"2"
    environ = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
    assert b"CUDA_VISIBLE_DEVICES=" in environ  # a cpu device hides accelerators
    response = await http_client.get(f"http://127.0.0.1:{child.port}/v1/models")
    listing = json.loads(await response.content())
    assert listing["data"][0]["id"] == "tiny-a" and listing["data"][0]["meta"] is not None
    inventory = service.node.inventory_json()["devices"][0]["child"]
    assert inventory["state"] == "ready" and inventory["model"] == "tiny-a"
    assert inventory["pid"] == child.pid and inventory["port"] == child.port and inventory["started_at"]


@pytest_twisted.ensureDeferred
async def test_concurrent_ensure_server_spawns_once(node_service, tiny_models, llama_server_bin):
    service = await node_service(models_config(tiny_models))
    slot = service.node.slots["cpu:0"]
    first = slot.ensure_server(spec(service, "tiny-a"))
    second = slot.ensure_server(spec(service, "tiny-a"))
    a, b = await first, await second
    assert a is b and slot.starts == 1


@pytest_twisted.ensureDeferred
async def test_switch_a_to_b_stops_a_and_serves_b(node_service, tiny_models, llama_server_bin, http_client):
    service = await node_service(models_config(tiny_models))
    slot = service.node.slots["cpu:0"]
    a = await slot.ensure_server(spec(service, "tiny-a"))
    b = await slot.ensure_server(spec(service, "tiny-b"))
    assert a.state is ChildState.EXITED and a.exit.expected and not alive(a.pid)
    assert b.state is ChildState.READY and b.model == "tiny-b"
    response = await http_client.get(f"http://127.0.0.1:{b.port}/v1/models")
    assert json.loads(await response.content())["data"][0]["id"] == "tiny-b"
    assert slot.snapshot().last_exit == "tiny-a: exit code 0"


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_startup_timeout_kills_the_child(node_service, tiny_models, tmp_path):
    slow = tmp_path / "slow-llama-server"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(slow.stat().st_mode | stat.S_IEXEC)
    service = await node_service(models_config(tiny_models, llama_server_bin=str(slow),
                                               llama_server_startup_timeout_s=0.6,
                                               llama_server_probe_interval_s=0.1))
    slot = service.node.slots["cpu:0"]
    with pytest.raises(ChildStartError) as info:
        await slot.ensure_server(spec(service, "tiny-a"))
    error = info.value
    assert error.device == "cpu:0" and error.model == "tiny-a"
    assert "not ready within llama_server_startup_timeout_s=0.6s" in error.reason
    child = slot.last_child  # a failed slot holds no child
    await eventually(lambda: child.state is ChildState.EXITED, what="the slow child to be killed")
    assert child.exit.signal == signal.SIGKILL and not alive(child.pid)
    assert slot.phase is Phase.FAILED and "not ready within" in slot.snapshot().last_error


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_corrupt_model_fails_fast_with_stderr_tail(node_service, tiny_models, tmp_path, llama_server_bin):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(os.urandom(100))
    config = models_config(tiny_models, llama_server_startup_timeout_s=60)
    config["models"]["bad"] = {"path": bad}
    service = await node_service(config)
    slot = service.node.slots["cpu:0"]
    began = time.monotonic()
    with pytest.raises(ChildStartError) as info:
        await slot.ensure_server(spec(service, "bad"))
    assert time.monotonic() - began < 30  # not the 60 s startup timeout
    assert "exited during startup (exit code 1)" in info.value.reason
    assert any("invalid magic" in line or "failed to load model" in line for line in info.value.stderr_tail)
    assert "invalid magic" in str(info.value) or "failed to load" in str(info.value)


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_port_collision_is_retried_on_another_port(node_service, tiny_models, llama_server_bin):
    service = await node_service(models_config(tiny_models))
    slot = service.node.slots["cpu:0"]
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    ports = iter([busy])
    slot._port_picker = lambda: next(ports, None) or free_port()
    try:
        child = await slot.ensure_server(spec(service, "tiny-a"))
    finally:
        taken.close()
    assert child.port != busy and slot.starts == 2 and child.state is ChildState.READY


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_kill_9_of_a_child_is_noticed_and_recovered(node_service, tiny_models, llama_server_bin):
    service = await node_service(models_config(tiny_models))
    slot = service.node.slots["cpu:0"]
    child = await slot.ensure_server(spec(service, "tiny-a"))
    os.kill(child.pid, signal.SIGKILL)
    await eventually(lambda: slot.phase is Phase.FAILED, what="the crash to be noticed")
    snap = slot.snapshot().to_json()
    assert snap["crashes"] == 1 and "killed by signal 9" in snap["last_exit"]
    assert service.node.inventory_json()["devices"][0]["child"]["state"] == "failed"
    again = await slot.ensure_server(spec(service, "tiny-a"))
    assert again is not child and again.state is ChildState.READY and alive(again.pid)


@pytest_twisted.ensureDeferred
async def test_idle_ttl_unloads_the_model(node_service, tiny_models, llama_server_bin):
    config = models_config(tiny_models)
    config["models"]["tiny-a"]["ttl_s"] = 0.3
    service = await node_service(config)
    slot = service.node.slots["cpu:0"]
    child = await slot.ensure_server(spec(service, "tiny-a"))
    pid = child.pid
    slot.grant("tiny-a").release()
    await eventually(lambda: slot.phase is Phase.IDLE, what="the idle unload")
    assert not alive(pid) and slot.snapshot().model is None


@pytest_twisted.ensureDeferred
async def test_stop_leaves_no_process(node_service, tiny_models, llama_server_bin):
    service = await node_service(models_config(tiny_models, cpu_devices=2))
    pids = []
    for slot in service.node.slots.values():
        pids.append((await slot.ensure_server(spec(service, "tiny-a"))).pid)
    assert all(alive(pid) for pid in pids)
    await service.stopService()
    assert not any(alive(pid) for pid in pids)  # stopService fired only after every child exited


def test_sigkill_of_the_agent_leaves_no_child(tiny_models, llama_server_bin, write_config, tmp_path):
    port = free_port()
    config = write_config(models_config(tiny_models, listen_port=port, state_dir=str(tmp_path / "state")))
    agent = subprocess.Popen([sys.executable, "-m", "rolemesh_node.cli", "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child_pid = None
    try:
        deadline = time.monotonic() + 30
        body = json.dumps({"model": "tiny-a", "prompt": "hi", "max_tokens": 2}).encode()
        import urllib.request
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as answer:
                    assert answer.status == 200
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/node/inventory", timeout=10) as answer:
            child_pid = json.load(answer)["devices"][0]["child"]["pid"]
        assert child_pid and alive(child_pid)
        agent.kill()  # SIGKILL: no chance to stop its children
        agent.wait(10)
        deadline = time.monotonic() + 2.0
        while alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(child_pid), "llama-server outlived the SIGKILLed agent by more than 2 s"
    finally:
        if agent.poll() is None:
            agent.kill()
        if child_pid and alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)
