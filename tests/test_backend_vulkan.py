"""The vulkan backend: vulkaninfo --summary, memory from --list-devices, both pinning styles."""

from __future__ import annotations

import time

import pytest_twisted
from _backend_fakes import STRAY_ENV, FakeRunner, config, device_events, fake_llama, fixture, has_failure, write_tool
from twisted.internet import reactor
from twisted.logger import capturedLogs

from rolemesh_node.devices.vulkan import VULKANINFO, VulkanBackend

MIB = 1024 * 1024
LIST = ("llama-server", "--list-devices")


@pytest_twisted.inlineCallbacks
def test_discovery_skips_cpu_devices_and_reads_memory(tmp_path):
    runner = FakeRunner({VULKANINFO: fixture("vulkaninfo_three.txt"), LIST: fixture("list_devices_vulkan.txt")})
    backend = VulkanBackend(reactor, config(llama_server_bin=fake_llama(tmp_path)), run=runner)
    with capturedLogs() as events:
        devices = yield backend.discover()
    assert [(d.id, d.name, d.memory_total_bytes) for d in devices] == [
        ("vulkan:0", "Intel(R) UHD Graphics (CML GT2)", 46982 * MIB),
        ("vulkan:1", "Quadro T2000 with Max-Q Design", 4342 * MIB),
    ]
    assert devices[1].extra["device_type"] == "discrete"
    assert devices[1].extra["llama_device"] == "Vulkan1"
    assert any("llvmpipe" in str(e.get("skipped")) for e in device_events(events))
    samples = yield backend.metrics(devices)
    assert samples["vulkan:1"].memory_free_bytes == 3950 * MIB
    assert samples["vulkan:1"].memory_used_bytes == (4342 - 3950) * MIB
    # samples within the cache age reuse discovery's run instead of spawning llama-server again
    yield backend.metrics(devices)
    assert runner.tools_called().count("llama-server") == 1


@pytest_twisted.inlineCallbacks
def test_one_physical_gpu_listed_twice_is_one_device():
    backend = VulkanBackend(reactor, config(), run=FakeRunner({VULKANINFO: fixture("vulkaninfo_duplicate.txt")}))
    devices = yield backend.discover()
    assert [(d.id, d.name) for d in devices] == [("vulkan:0", "AMD Radeon RX 6800 XT (RADV NAVI21)")]
    assert devices[0].memory_total_bytes is None  # no llama-server: memory unknown
    assert (yield backend.metrics(devices)) == {}


@pytest_twisted.inlineCallbacks
def test_software_rasteriser_only_means_no_devices():
    backend = VulkanBackend(reactor, config(), run=FakeRunner({VULKANINFO: fixture("vulkaninfo_cpu_only.txt")}))
    assert (yield backend.discover()) == []


@pytest_twisted.inlineCallbacks
def test_missing_or_garbage_vulkaninfo_no_devices_one_line():
    for answers in ({}, {VULKANINFO: fixture("vulkaninfo_garbage.txt")}):
        backend = VulkanBackend(reactor, config(), run=FakeRunner(answers))
        with capturedLogs() as events:
            assert (yield backend.discover()) == []
        assert len(device_events(events)) == 1 and not has_failure(events)


@pytest_twisted.inlineCallbacks
def test_list_devices_only_pins_with_device_flag(tmp_path):
    runner = FakeRunner({LIST: fixture("list_devices_vulkan.txt")})
    backend = VulkanBackend(reactor, config(llama_server_bin=fake_llama(tmp_path)), run=runner)
    devices = yield backend.discover()
    assert [d.id for d in devices] == ["vulkan:0", "vulkan:1"]
    quadro = devices[1]
    assert backend.child_args(quadro) == ["--device", "Vulkan1"]
    env = backend.child_env(quadro, STRAY_ENV)
    assert "GGML_VK_VISIBLE_DEVICES" not in env and "CUDA_VISIBLE_DEVICES" not in env


@pytest_twisted.inlineCallbacks
def test_real_vulkaninfo_on_path_and_timeout(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    write_tool(bin_dir, "vulkaninfo", fixture("vulkaninfo_three.txt"))
    monkeypatch.setenv("PATH", str(bin_dir))
    devices = yield VulkanBackend(reactor, config()).discover()
    assert [d.id for d in devices] == ["vulkan:0", "vulkan:1"]
    (bin_dir / "vulkaninfo").unlink()
    write_tool(bin_dir, "vulkaninfo", b"", sleep_s=5)
    started = time.monotonic()
    assert (yield VulkanBackend(reactor, config(device_tool_timeout_s=0.2)).discover()) == []
    assert time.monotonic() - started < 2


@pytest_twisted.inlineCallbacks
def test_child_env_pins_with_ggml_variable():
    backend = VulkanBackend(reactor, config(), run=FakeRunner({VULKANINFO: fixture("vulkaninfo_three.txt")}))
    devices = yield backend.discover()
    env = backend.child_env(devices[1], STRAY_ENV)
    assert env["GGML_VK_VISIBLE_DEVICES"] == "1"
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ONEAPI_DEVICE_SELECTOR"):
        assert var not in env
    assert backend.child_args(devices[1]) == []
