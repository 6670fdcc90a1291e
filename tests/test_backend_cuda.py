"""The cuda backend: NVML (fake), nvidia-smi fallback (recorded + fake executables), pinning."""

from __future__ import annotations

import time

import pytest_twisted
from _backend_fakes import (
    H100,
    RTX,
    STRAY_ENV,
    FakeNVML,
    FakeNVMLError,
    FakeRunner,
    config,
    device_events,
    fake_llama,
    fixture,
    has_failure,
    write_tool,
)
from twisted.internet import reactor
from twisted.logger import capturedLogs

from rolemesh_node.devices.base import PINNING_VARIABLES, DeviceRef
from rolemesh_node.devices.cuda import NVIDIA_SMI_ARGV, CudaBackend

MIB = 1024 * 1024
NO_DRIVER = FakeNVMLError("NVML Shared Library Not Found")


@pytest_twisted.inlineCallbacks
def test_nvml_discovery_and_metrics():
    nvml = FakeNVML([H100, RTX])
    runner = FakeRunner()
    backend = CudaBackend(reactor, config(), nvml=nvml, run=runner)
    devices = yield backend.discover()
    assert [d.id for d in devices] == ["cuda:0", "cuda:1"]
    h100, rtx = devices
    assert (h100.name, h100.uuid, h100.memory_total_bytes) == (H100["name"], H100["uuid"], H100["total"])
    # bytes decoded
    assert (rtx.name, rtx.uuid) == ("NVIDIA GeForce RTX 3080", "GPU-8fe3a97d-51f6-a669-0d80-b4530b81b816")
    assert backend.source == "nvml"
    samples = yield backend.metrics(devices)
    m = samples["cuda:0"]
    assert (m.memory_total_bytes, m.memory_used_bytes, m.memory_free_bytes) == (
        H100["total"], H100["used"], H100["total"] - H100["used"])
    assert (m.utilization_pct, m.temperature_c, m.power_w) == (37.0, 41.0, 123.456)
    assert samples["cuda:1"].power_w == 30.112
    assert nvml.init_calls == 1  # nvmlInit once for discovery and metrics
    assert runner.calls == []  # no nvidia-smi when NVML works


@pytest_twisted.inlineCallbacks
def test_nvml_unsupported_fields_are_none_and_unknown_devices_left_out():
    nvml = FakeNVML([H100], not_supported={"util", "temp", "power_mw"})
    backend = CudaBackend(reactor, config(), nvml=nvml, run=FakeRunner())
    devices = yield backend.discover()
    ghost = DeviceRef(backend="cuda", index=7, name="gone")
    samples = yield backend.metrics([*devices, ghost])
    assert set(samples) == {"cuda:0"}
    m = samples["cuda:0"]
    assert (m.utilization_pct, m.temperature_c, m.power_w) == (None, None, None)
    assert m.memory_used_bytes == H100["used"]


@pytest_twisted.inlineCallbacks
def test_nvml_error_falls_back_to_nvidia_smi():
    runner = FakeRunner({NVIDIA_SMI_ARGV: fixture("nvidia_smi_two.csv")})
    backend = CudaBackend(reactor, config(), nvml=FakeNVML(init_error=NO_DRIVER), run=runner)
    with capturedLogs() as events:
        devices = yield backend.discover()
    assert [(d.id, d.name) for d in devices] == [("cuda:0", "NVIDIA GeForce RTX 3080"),
                                                 ("cuda:1", "NVIDIA GeForce RTX 2060")]
    assert devices[0].memory_total_bytes == 10240 * MIB
    assert devices[1].uuid == "GPU-45535fc5-0734-b693-29f7-43fe940f6e67"
    assert backend.source == "nvidia-smi"
    logged = device_events(events)
    assert len(logged) == 1 and "NVML Shared Library Not Found" in logged[0]["error"]
    # the tool ran without the agent's pinning variables
    assert not set(PINNING_VARIABLES) & set(runner.env_of("nvidia-smi"))
    samples = yield backend.metrics(devices)
    assert samples["cuda:0"].memory_used_bytes == 9029 * MIB
    assert samples["cuda:1"].utilization_pct is None and samples["cuda:1"].power_w is None


@pytest_twisted.inlineCallbacks
def test_no_driver_no_tool_gives_no_devices_and_one_line():
    backend = CudaBackend(reactor, config(), nvml=FakeNVML(init_error=NO_DRIVER), run=FakeRunner())
    with capturedLogs() as events:
        devices = yield backend.discover()
    assert devices == []
    logged = device_events(events)
    assert len(logged) == 1, logged
    assert not has_failure(events)
    reasons = logged[0]["reasons"]
    assert "NVML" in reasons and "nvidia-smi: not installed" in reasons and "llama-server" in reasons
    assert (yield backend.metrics([])) == {}


@pytest_twisted.inlineCallbacks
def test_nvidia_smi_garbage_gives_no_devices():
    runner = FakeRunner({"nvidia-smi": fixture("nvidia_smi_garbage.txt")})
    backend = CudaBackend(reactor, config(), nvml=FakeNVML(init_error=NO_DRIVER), run=runner)
    with capturedLogs() as events:
        devices = yield backend.discover()
    assert devices == []
    assert len(device_events(events, "warn")) == 1 and not has_failure(events)


@pytest_twisted.inlineCallbacks
def test_nvml_init_that_hangs_times_out_then_falls_back():
    class SlowNVML(FakeNVML):
        def nvmlInit(self) -> None:
            time.sleep(1.0)  # a wedged driver: the reactor must not wait for it

    runner = FakeRunner({"nvidia-smi": fixture("nvidia_smi_one.csv")})
    backend = CudaBackend(reactor, config(device_tool_timeout_s=0.1), nvml=SlowNVML([H100]), run=runner)
    started = time.monotonic()
    devices = yield backend.discover()
    assert time.monotonic() - started < 0.9
    assert [d.name for d in devices] == ["NVIDIA H100 80GB HBM3"]
    assert "Timeout" in backend.nvml_error or "timed out" in backend.nvml_error.lower()


@pytest_twisted.inlineCallbacks
def test_list_devices_fallback_pins_pci_order(tmp_path):
    llama = fake_llama(tmp_path)
    runner = FakeRunner({(("llama-server", "--list-devices")): fixture("list_devices_cuda.txt")})
    backend = CudaBackend(reactor, config(llama_server_bin=llama), nvml=FakeNVML(init_error=NO_DRIVER), run=runner)
    devices = yield backend.discover()
    assert [(d.id, d.name, d.memory_total_bytes) for d in devices] == [
        ("cuda:0", "NVIDIA GeForce RTX 4080", 16379 * MIB), ("cuda:1", "NVIDIA GeForce RTX 3090", 24135 * MIB)]
    assert runner.env_of("llama-server")["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    samples = yield backend.metrics(devices)
    assert samples["cuda:1"].memory_free_bytes == 23859 * MIB


# -- through the real run_tool, with fake executables on PATH -------------------------------------

@pytest_twisted.inlineCallbacks
def test_real_nvidia_smi_executable(tmp_path, monkeypatch):
    write_tool(tmp_path / "bin", "nvidia-smi", fixture("nvidia_smi_two.csv"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    backend = CudaBackend(reactor, config(), nvml=FakeNVML(init_error=NO_DRIVER))
    devices = yield backend.discover()
    assert [d.id for d in devices] == ["cuda:0", "cuda:1"]
    samples = yield backend.metrics(devices)
    assert samples["cuda:0"].power_w == 301.42


@pytest_twisted.inlineCallbacks
def test_real_nvidia_smi_no_devices_exit_code(tmp_path, monkeypatch):
    write_tool(tmp_path / "bin", "nvidia-smi", fixture("nvidia_smi_none.txt"), exit_code=6)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    backend = CudaBackend(reactor, config(), nvml=FakeNVML(init_error=NO_DRIVER))
    with capturedLogs() as events:
        devices = yield backend.discover()
    assert devices == []
    logged = device_events(events)
    assert len(logged) == 1 and "exit code 6" in logged[0]["reasons"]


@pytest_twisted.inlineCallbacks
def test_real_nvidia_smi_that_hangs_times_out(tmp_path, monkeypatch):
    write_tool(tmp_path / "bin", "nvidia-smi", b"", sleep_s=5)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    backend = CudaBackend(reactor, config(device_tool_timeout_s=0.2), nvml=FakeNVML(init_error=NO_DRIVER))
    started = time.monotonic()
    with capturedLogs() as events:
        devices = yield backend.discover()
    assert devices == [] and time.monotonic() - started < 2
    assert "timed out" in device_events(events)[0]["reasons"]


def test_child_env_pins_one_gpu_in_pci_order():
    backend = CudaBackend(reactor, config(), nvml=FakeNVML())
    dev = DeviceRef(backend="cuda", index=1, name="x")
    env = backend.child_env(dev, STRAY_ENV)
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    for var in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "GGML_VK_VISIBLE_DEVICES",
                "ONEAPI_DEVICE_SELECTOR"):
        assert var not in env
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/home/op"
    assert STRAY_ENV["CUDA_VISIBLE_DEVICES"] == "3"  # the base is not modified
    assert backend.child_args(dev) == []


@pytest_twisted.inlineCallbacks
def test_concurrent_callers_share_one_nvml_init():
    nvml = FakeNVML([H100])
    backend = CudaBackend(reactor, config(), nvml=nvml, run=FakeRunner())
    first, second = backend.discover(), backend.discover()
    assert [d.id for d in (yield first)] == [d.id for d in (yield second)] == ["cuda:0"]
    assert nvml.init_calls == 1


@pytest_twisted.inlineCallbacks
def test_nvml_that_cannot_enumerate_hands_over_to_nvidia_smi():
    class Broken(FakeNVML):
        def nvmlDeviceGetCount(self) -> int:
            raise FakeNVMLError("Unknown Error")

    runner = FakeRunner({"nvidia-smi": fixture("nvidia_smi_one.csv")})
    backend = CudaBackend(reactor, config(), nvml=Broken([H100]), run=runner)
    devices = yield backend.discover()
    assert backend.source == "nvidia-smi" and "enumeration failed" in backend.nvml_error
    samples = yield backend.metrics(devices)
    assert samples["cuda:0"].power_w == 69.53
    assert runner.tools_called() == ["nvidia-smi", "nvidia-smi"]
