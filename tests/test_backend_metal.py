"""The metal backend: macOS only, sysctl + system_profiler, optional --list-devices."""

from __future__ import annotations

import pytest_twisted
from _backend_fakes import STRAY_ENV, FakeRunner, config, device_events, fake_llama, fixture, has_failure
from twisted.internet import reactor
from twisted.logger import capturedLogs

from rolemesh_node.devices.base import PINNING_VARIABLES
from rolemesh_node.devices.metal import SYSCTL_MEMSIZE, SYSTEM_PROFILER, MetalBackend

MIB = 1024 * 1024
LIST = ("llama-server", "--list-devices")


@pytest_twisted.inlineCallbacks
def test_not_macos_no_devices_no_tools():
    runner = FakeRunner({SYSCTL_MEMSIZE: fixture("sysctl_memsize.txt")})
    backend = MetalBackend(reactor, config(), run=runner, platform="linux")
    with capturedLogs() as events:
        assert (yield backend.discover()) == []
    assert runner.calls == [] and len(device_events(events)) == 1


@pytest_twisted.inlineCallbacks
def test_mac_device_and_metrics_from_list_devices(tmp_path):
    runner = FakeRunner({SYSCTL_MEMSIZE: fixture("sysctl_memsize.txt"),
                         SYSTEM_PROFILER: fixture("system_profiler_m3.json"), LIST: fixture("list_devices_metal.txt")})
    backend = MetalBackend(reactor, config(llama_server_bin=fake_llama(tmp_path)), run=runner, platform="darwin")
    devices = yield backend.discover()
    assert [(d.id, d.name, d.memory_total_bytes) for d in devices] == [("metal:0", "Apple M3 Pro", 34359738368)]
    assert devices[0].extra["llama_device"] == "MTL0"
    samples = yield backend.metrics(devices)
    assert samples["metal:0"].memory_total_bytes == 49152 * MIB  # Metal's working-set limit
    assert samples["metal:0"].memory_free_bytes == 49151 * MIB


@pytest_twisted.inlineCallbacks
def test_mac_without_llama_server_reports_total_only():
    runner = FakeRunner({SYSCTL_MEMSIZE: fixture("sysctl_memsize.txt"),
                         SYSTEM_PROFILER: fixture("system_profiler_m1_old.json")})
    backend = MetalBackend(reactor, config(), run=runner, platform="darwin")
    devices = yield backend.discover()
    assert devices[0].name == "Apple M1"
    samples = yield backend.metrics(devices)
    assert samples["metal:0"].memory_total_bytes == 34359738368
    assert samples["metal:0"].memory_free_bytes is None


@pytest_twisted.inlineCallbacks
def test_mac_with_broken_tools_still_has_its_gpu():
    backend = MetalBackend(reactor, config(), run=FakeRunner({SYSTEM_PROFILER: b"garbage"}), platform="darwin")
    with capturedLogs() as events:
        devices = yield backend.discover()
    assert [(d.id, d.name, d.memory_total_bytes) for d in devices] == [("metal:0", "Apple GPU", None)]
    assert len(device_events(events)) == 1 and not has_failure(events)


def test_child_env_has_no_pinning_variables():
    backend = MetalBackend(reactor, config(), run=FakeRunner(), platform="darwin")
    from rolemesh_node.devices.base import DeviceRef

    dev = DeviceRef(backend="metal", index=0, name="Apple M3 Pro")
    env = backend.child_env(dev, STRAY_ENV)
    assert not set(PINNING_VARIABLES) & set(env)
    assert env["PATH"] == "/usr/bin"
    assert backend.child_args(dev) == []
