"""The sycl backend: sycl-ls formats, xpu-smi metrics, --list-devices memory, pinning."""

from __future__ import annotations

import time

import pytest_twisted
from _backend_fakes import STRAY_ENV, FakeRunner, config, device_events, fake_llama, fixture, has_failure, write_tool
from twisted.internet import reactor
from twisted.logger import capturedLogs

from rolemesh_node.devices.base import DeviceRef
from rolemesh_node.devices.sycl import SYCL_LS, XPU_SMI_DISCOVERY, SyclBackend

MIB = 1024 * 1024
LIST = ("llama-server", "--list-devices")
DUMP = ("xpu-smi", "dump", "-d", "0,1", "-m", "0,1,3,18", "-n", "1")


@pytest_twisted.inlineCallbacks
def test_discovery_memory_and_xpu_smi_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEAPI_DEVICE_SELECTOR", "opencl:cpu")  # inherited by the agent: must not hide GPUs
    runner = FakeRunner({SYCL_LS: fixture("sycl_ls_2025.txt"), LIST: fixture("list_devices_sycl.txt"),
                         XPU_SMI_DISCOVERY: fixture("xpu_smi_discovery.json"), DUMP: fixture("xpu_smi_dump.csv")})
    backend = SyclBackend(reactor, config(llama_server_bin=fake_llama(tmp_path)), run=runner)
    devices = yield backend.discover()
    assert [(d.id, d.name, d.memory_total_bytes) for d in devices] == [
        ("sycl:0", "Intel(R) Arc(TM) A770 Graphics", 15473 * MIB),
        ("sycl:1", "Intel(R) UHD Graphics 730", None),
    ]
    assert "ONEAPI_DEVICE_SELECTOR" not in runner.env_of("sycl-ls")
    assert runner.env_of("llama-server")["ZES_ENABLE_SYSMAN"] == "1"
    assert [d.extra["xpu_smi_id"] for d in devices] == [0, 1]
    samples = yield backend.metrics(devices)
    arc, uhd = samples["sycl:0"], samples["sycl:1"]
    assert (arc.utilization_pct, arc.power_w, arc.temperature_c) == (12.5, 35.2, 48.0)
    assert arc.memory_used_bytes == 1203 * MIB and arc.memory_free_bytes == (15473 - 1203) * MIB
    assert uhd.utilization_pct is None and uhd.memory_used_bytes == 11 * MIB and uhd.memory_free_bytes is None


@pytest_twisted.inlineCallbacks
def test_without_xpu_smi_metrics_come_from_list_devices(tmp_path):
    runner = FakeRunner({SYCL_LS: fixture("sycl_ls_2023.txt"), LIST: fixture("list_devices_sycl.txt")})
    backend = SyclBackend(reactor, config(llama_server_bin=fake_llama(tmp_path)), run=runner)
    devices = yield backend.discover()
    assert [(d.id, d.name) for d in devices] == [("sycl:0", "Intel(R) Arc(TM) A770 Graphics")]
    samples = yield backend.metrics(devices)
    assert samples["sycl:0"].memory_free_bytes == 15473 * MIB


@pytest_twisted.inlineCallbacks
def test_no_level_zero_gpu_no_devices_one_line():
    backend = SyclBackend(reactor, config(), run=FakeRunner({SYCL_LS: fixture("sycl_ls_no_gpu.txt")}))
    with capturedLogs() as events:
        assert (yield backend.discover()) == []
    assert len(device_events(events)) == 1


@pytest_twisted.inlineCallbacks
def test_missing_or_garbage_sycl_ls_no_devices_one_line():
    for answers in ({}, {SYCL_LS: fixture("sycl_ls_garbage.txt")}):
        backend = SyclBackend(reactor, config(), run=FakeRunner(answers))
        with capturedLogs() as events:
            assert (yield backend.discover()) == []
        logged = device_events(events)
        assert len(logged) == 1 and "sycl-ls" in logged[0]["reasons"] and not has_failure(events)


@pytest_twisted.inlineCallbacks
def test_list_devices_only_pins_with_device_flag(tmp_path):
    runner = FakeRunner({LIST: fixture("list_devices_sycl.txt")})
    backend = SyclBackend(reactor, config(llama_server_bin=fake_llama(tmp_path)), run=runner)
    devices = yield backend.discover()
    assert [d.id for d in devices] == ["sycl:0"]
    assert backend.child_args(devices[0]) == ["--device", "SYCL0"]
    env = backend.child_env(devices[0], STRAY_ENV)
    assert "ONEAPI_DEVICE_SELECTOR" not in env and env["ZES_ENABLE_SYSMAN"] == "1"


@pytest_twisted.inlineCallbacks
def test_real_sycl_ls_on_path_and_timeout(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    write_tool(bin_dir, "sycl-ls", fixture("sycl_ls_2024.txt"))
    monkeypatch.setenv("PATH", str(bin_dir))
    devices = yield SyclBackend(reactor, config()).discover()
    assert [(d.id, d.name) for d in devices] == [("sycl:0", "Intel(R) Graphics [0xe20b]"),
                                                 ("sycl:1", "Intel(R) UHD Graphics 770")]
    (bin_dir / "sycl-ls").unlink()
    write_tool(bin_dir, "sycl-ls", b"", sleep_s=5)
    started = time.monotonic()
    assert (yield SyclBackend(reactor, config(device_tool_timeout_s=0.2)).discover()) == []
    assert time.monotonic() - started < 2


def test_child_env_selects_level_zero_device():
    backend = SyclBackend(reactor, config(), run=FakeRunner())
    dev = DeviceRef(backend="sycl", index=1, name="x", extra={"pin": "env"})
    env = backend.child_env(dev, STRAY_ENV)
    assert env["ONEAPI_DEVICE_SELECTOR"] == "level_zero:1"
    assert env["ZES_ENABLE_SYSMAN"] == "1"
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GGML_VK_VISIBLE_DEVICES"):
        assert var not in env
    assert backend.child_args(dev) == []
