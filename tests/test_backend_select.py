"""select_backend (auto order, cpu fallback, explicit backend, devices filter) and the
--list-devices helpers (binary resolution, cache)."""

from __future__ import annotations

import _backend_fakes as fakes
import pytest
import pytest_twisted
from _backend_fakes import FakeNVML, FakeNVMLError, FakeRunner, config, device_events, fixture, has_failure, write_tool
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from rolemesh_node.devices import cuda, select
from rolemesh_node.devices.cpu import CpuBackend
from rolemesh_node.devices.listdevices import DeviceLister, list_devices, resolve_llama_server
from rolemesh_node.devices.tools import ToolError


@pytest.fixture
def planned(monkeypatch):
    """Point select's accelerator table at stand-in backends driven by fakes.PLAN."""
    monkeypatch.setattr(select, "ACCELERATORS", dict(fakes.PLANNED))
    fakes.PLAN.clear()
    fakes.CONSTRUCTED.clear()
    yield fakes.PLAN
    fakes.PLAN.clear()
    fakes.CONSTRUCTED.clear()


@pytest_twisted.inlineCallbacks
def test_auto_takes_the_first_backend_with_devices(planned):
    planned.update({"rocm": [0, 1], "vulkan": [0]})
    backend, devices = yield select.select_backend(reactor, config(backend="auto"))
    assert backend.name == "rocm"
    assert [d.id for d in devices] == ["rocm:0", "rocm:1"]
    assert fakes.CONSTRUCTED == ["cuda", "rocm"]  # stops at the first hit


@pytest_twisted.inlineCallbacks
def test_auto_falls_back_to_cpu(planned):
    planned.update({"cuda": RuntimeError("driver exploded")})  # a failing discover counts as none
    with capturedLogs() as events:
        backend, devices = yield select.select_backend(reactor, config(backend="auto", cpu_devices=2))
    assert isinstance(backend, CpuBackend)
    assert [d.id for d in devices] == ["cpu:0", "cpu:1"]
    assert fakes.CONSTRUCTED == ["cuda", "rocm", "sycl", "vulkan", "metal"]
    assert not has_failure(events)


@pytest_twisted.inlineCallbacks
def test_explicit_backend_without_devices_is_empty(planned):
    planned.update({"rocm": [0]})
    backend, devices = yield select.select_backend(reactor, config(backend="vulkan"))
    assert backend.name == "vulkan" and devices == []
    assert fakes.CONSTRUCTED == ["vulkan"]


@pytest_twisted.inlineCallbacks
def test_devices_filter(planned):
    planned.update({"cuda": [0, 1, 2]})
    with capturedLogs() as events:
        backend, devices = yield select.select_backend(reactor, config(backend="cuda", devices=(1, 5)))
    assert [d.id for d in devices] == ["cuda:1"]
    assert any(e.get("missing") == [5] for e in events)
    planned.clear()
    _, cpus = yield select.select_backend(reactor, config(backend="auto", cpu_devices=3, devices=(0, 2)))
    assert [d.id for d in cpus] == ["cpu:0", "cpu:2"]


@pytest_twisted.inlineCallbacks
def test_auto_with_the_real_backends_on_a_bare_host(tmp_path, monkeypatch):
    """No driver, no tool on PATH, not macOS: every accelerator says so once, cpu is used."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(cuda, "load_nvml", lambda: FakeNVML(init_error=FakeNVMLError("Driver Not Loaded")))
    monkeypatch.setattr("sys.platform", "linux")
    with capturedLogs() as events:
        backend, devices = yield select.select_backend(reactor, config(backend="auto"))
    assert isinstance(backend, CpuBackend) and [d.id for d in devices] == ["cpu:0"]
    logged = device_events(events)
    backends_logged = [e.get("backend") for e in logged if e.get("backend") in select.AUTO_ORDER]
    assert sorted(backends_logged) == sorted(select.AUTO_ORDER)  # one line each
    assert not has_failure(events)


@pytest_twisted.inlineCallbacks
def test_auto_picks_real_cuda_through_fake_nvml(monkeypatch):
    monkeypatch.setattr(cuda, "load_nvml", lambda: FakeNVML([fakes.H100]))
    backend, devices = yield select.select_backend(reactor, config(backend="auto"))
    assert backend.name == "cuda" and [d.name for d in devices] == ["NVIDIA H100 80GB HBM3"]


# -- --list-devices helpers ---------------------------------------------------------------------

def test_resolve_llama_server(tmp_path, monkeypatch):
    exe = write_tool(tmp_path / "bin", "llama-server")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert resolve_llama_server(None) == str(exe)
    assert resolve_llama_server("llama-server") == str(exe)
    assert resolve_llama_server(str(exe)) == str(exe)
    assert resolve_llama_server(str(tmp_path / "nope" / "llama-server")) is None
    assert resolve_llama_server("not-a-llama-server-anywhere") is None


@pytest_twisted.inlineCallbacks
def test_list_devices_without_binary_fails_cleanly():
    with pytest.raises(ToolError):
        yield list_devices(reactor, None, 1.0)


@pytest_twisted.inlineCallbacks
def test_list_devices_real_binary_on_path(tmp_path):
    exe = write_tool(tmp_path / "bin", "llama-server", fixture("list_devices_mixed.txt"))
    devices = yield list_devices(reactor, str(exe), 2.0)
    assert [d.name for d in devices][1:] == ["CUDA0", "CUDA1", "Vulkan0"]


@pytest_twisted.inlineCallbacks
def test_device_lister_caches_for_max_age(tmp_path):
    clock = Clock()
    runner = FakeRunner({("llama-server", "--list-devices"): fixture("list_devices_cuda.txt")})
    lister = DeviceLister(clock, config(llama_server_bin=str(write_tool(tmp_path / "bin", "llama-server"))),
                          run=runner, max_age_s=15.0)
    first = yield lister.get()
    again = yield lister.get()
    assert first == again and len(runner.calls) == 1
    clock.advance(16)
    yield lister.get()
    yield lister.get(fresh=True)
    assert len(runner.calls) == 3
