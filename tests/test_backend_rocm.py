"""The rocm backend: amd-smi (both JSON shapes), rocm-smi fallback, HIP ids, pinning."""

from __future__ import annotations

import time

import pytest_twisted
from _backend_fakes import STRAY_ENV, FakeRunner, config, device_events, fake_llama, fixture, has_failure, write_tool
from twisted.internet import reactor
from twisted.logger import capturedLogs

from rolemesh_node.devices.base import DeviceRef
from rolemesh_node.devices.rocm import AMD_SMI_LIST, AMD_SMI_METRIC, AMD_SMI_STATIC, ROCM_SMI, RocmBackend

MIB = 1024 * 1024


@pytest_twisted.inlineCallbacks
def test_amd_smi_list_shape_without_enumeration():
    runner = FakeRunner({AMD_SMI_STATIC: fixture("amd_smi_static_list.json"),
                         AMD_SMI_METRIC: fixture("amd_smi_metric_list.json")})
    backend = RocmBackend(reactor, config(), run=runner)
    devices = yield backend.discover()
    assert [(d.id, d.name, d.memory_total_bytes) for d in devices] == [
        ("rocm:0", "Navi 23 [Radeon RX 6600/6600 XT", 8176 * MIB),
        ("rocm:1", "Navi 31 [Radeon RX 7900 XT/7900 XTX/7900 GRE/7900M]", 24560 * MIB),
    ]
    assert devices[1].extra["bdf"] == "0000:03:00.0"
    assert runner.tools_called().count("amd-smi") == 2  # static + the (failed) list -e
    samples = yield backend.metrics(devices)
    assert samples["rocm:0"].utilization_pct == 42.0
    assert samples["rocm:1"].memory_used_bytes == 4096 * MIB
    assert samples["rocm:1"].power_w is None


@pytest_twisted.inlineCallbacks
def test_amd_smi_gpu_data_shape_uses_hip_ids():
    runner = FakeRunner({AMD_SMI_STATIC: fixture("amd_smi_static_gpu_data.json"),
                         AMD_SMI_LIST: fixture("amd_smi_list_e.json"),
                         AMD_SMI_METRIC: fixture("amd_smi_metric_gpu_data.json")})
    backend = RocmBackend(reactor, config(), run=runner)
    devices = yield backend.discover()
    by_name = {d.name: d for d in devices}
    # amd-smi gpu 0 (the discrete card) is HIP device 1 on this hybrid host
    assert by_name["AMD Radeon RX 7800 XT"].id == "rocm:1"
    assert by_name["AMD Radeon RX 7800 XT"].extra["amdsmi_gpu"] == 0
    assert by_name["Raphael"].id == "rocm:0"
    samples = yield backend.metrics(devices)
    assert samples["rocm:1"].memory_used_bytes == 11153 * MIB  # metrics follow the amd-smi id
    assert samples["rocm:0"].memory_total_bytes == 512 * MIB


@pytest_twisted.inlineCallbacks
def test_amd_smi_no_gpu_is_authoritative():
    runner = FakeRunner({AMD_SMI_STATIC: fixture("amd_smi_static_none.json"), ROCM_SMI: fixture("rocm_smi_two.json")})
    backend = RocmBackend(reactor, config(), run=runner)
    with capturedLogs() as events:
        devices = yield backend.discover()
    assert devices == []
    assert "rocm-smi" not in runner.tools_called()
    assert len(device_events(events)) == 1


@pytest_twisted.inlineCallbacks
def test_rocm_smi_fallback_when_amd_smi_missing_or_garbage():
    for amd in (None, fixture("amd_smi_garbage.txt")):
        answers = {ROCM_SMI: fixture("rocm_smi_two.json")}
        if amd is not None:
            answers["amd-smi"] = amd
        runner = FakeRunner(answers)
        backend = RocmBackend(reactor, config(), run=runner)
        devices = yield backend.discover()
        assert [(d.id, d.name) for d in devices] == [
            ("rocm:0", "Navi 23 [Radeon RX 6600/6600 XT/6600M]"), ("rocm:1", "Phoenix3")]
        assert backend.source == "rocm-smi"
        samples = yield backend.metrics(devices)
        assert samples["rocm:1"].power_w == 7.222
        assert runner.tools_called()[-1] == "rocm-smi"


@pytest_twisted.inlineCallbacks
def test_no_tools_no_devices_one_line():
    backend = RocmBackend(reactor, config(), run=FakeRunner())
    with capturedLogs() as events:
        devices = yield backend.discover()
    assert devices == []
    logged = device_events(events)
    assert len(logged) == 1 and not has_failure(events)
    assert "amd-smi: not installed" in logged[0]["reasons"] and "rocm-smi: not installed" in logged[0]["reasons"]


@pytest_twisted.inlineCallbacks
def test_garbage_everywhere_no_devices():
    runner = FakeRunner({"amd-smi": fixture("amd_smi_garbage.txt"), "rocm-smi": fixture("rocm_smi_garbage.txt")})
    backend = RocmBackend(reactor, config(), run=runner)
    with capturedLogs() as events:
        assert (yield backend.discover()) == []
    assert len(device_events(events)) == 1 and not has_failure(events)


@pytest_twisted.inlineCallbacks
def test_list_devices_fallback(tmp_path):
    runner = FakeRunner({("llama-server", "--list-devices"): fixture("list_devices_rocm.txt")})
    backend = RocmBackend(reactor, config(llama_server_bin=fake_llama(tmp_path)), run=runner)
    devices = yield backend.discover()
    assert [(d.id, d.name, d.memory_total_bytes) for d in devices] == [
        ("rocm:0", "AMD Radeon RX 7900 XTX", 24560 * MIB)]
    samples = yield backend.metrics(devices)
    assert samples["rocm:0"].memory_free_bytes == 24472 * MIB


@pytest_twisted.inlineCallbacks
def test_real_tools_on_path_and_timeout(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    write_tool(bin_dir, "amd-smi", b"", sleep_s=5)  # hangs: must time out
    write_tool(bin_dir, "rocm-smi", fixture("rocm_smi_two.json"))
    monkeypatch.setenv("PATH", str(bin_dir))
    backend = RocmBackend(reactor, config(device_tool_timeout_s=0.2))
    started = time.monotonic()
    devices = yield backend.discover()
    assert time.monotonic() - started < 2
    assert [d.id for d in devices] == ["rocm:0", "rocm:1"]
    (bin_dir / "rocm-smi").unlink()
    write_tool(bin_dir, "rocm-smi", b"", sleep_s=5)
    backend = RocmBackend(reactor, config(device_tool_timeout_s=0.2))
    assert (yield backend.discover()) == []


def test_child_env_linux_pins_through_rocr():
    backend = RocmBackend(reactor, config(), run=FakeRunner(), platform="linux")
    env = backend.child_env(DeviceRef(backend="rocm", index=2, name="x"), STRAY_ENV)
    assert env["ROCR_VISIBLE_DEVICES"] == "2"
    assert env["HIP_VISIBLE_DEVICES"] == "0"  # relative to the ROCr-visible set
    for var in ("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "GGML_VK_VISIBLE_DEVICES", "ONEAPI_DEVICE_SELECTOR"):
        assert var not in env
    assert env["PATH"] == "/usr/bin"
    assert backend.child_args(DeviceRef(backend="rocm", index=2)) == []


def test_child_env_elsewhere_uses_hip():
    backend = RocmBackend(reactor, config(), run=FakeRunner(), platform="win32")
    env = backend.child_env(DeviceRef(backend="rocm", index=1, name="x"), STRAY_ENV)
    assert env["HIP_VISIBLE_DEVICES"] == "1"
    assert "ROCR_VISIBLE_DEVICES" not in env and "CUDA_VISIBLE_DEVICES" not in env
