"""Pure parsers of the device backends, on recorded tool outputs (tests/fixtures/devices)."""

from __future__ import annotations

import pytest
from _backend_fakes import fixture

from rolemesh_node.devices import parsing
from rolemesh_node.devices.cuda import parse_nvidia_smi
from rolemesh_node.devices.listdevices import of_backend, parse_list_devices, to_refs
from rolemesh_node.devices.metal import parse_sysctl_memsize, parse_system_profiler_gpu
from rolemesh_node.devices.rocm import (
    hip_index,
    parse_amd_smi_hip_ids,
    parse_amd_smi_metric,
    parse_amd_smi_static,
    parse_rocm_smi,
)
from rolemesh_node.devices.sycl import (
    level_zero_gpus,
    parse_sycl_ls,
    parse_xpu_smi_discovery,
    parse_xpu_smi_dump,
)
from rolemesh_node.devices.vulkan import parse_vulkaninfo_summary, usable

MIB = 1024 * 1024


# -- shared helpers ----------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    (41, 41.0), ("28.52", 28.52), (" 0 %", 0.0), ("38 °C", 38.0), ({"value": 7, "unit": "W"}, 7.0),
    ("[N/A]", None), ("N/A", None), ("[Not Supported]", None), ("", None), (None, None), (True, None),
    ("garbage", None), (float("nan"), None),
])
def test_to_float(raw, expected):
    assert parsing.to_float(raw) == expected


@pytest.mark.parametrize("raw, unit, expected", [
    (24576, "MB", 24576 * MIB), ("16368 MB", None, 16368 * MIB), ({"value": 8176, "unit": "MB"}, None, 8176 * MIB),
    ({"value": 32, "unit": "KB"}, "MB", 32 * 1024), ("21458059264", None, 21458059264), ("N/A", "MB", None),
    (-1, "MB", None), ({"value": 3, "unit": "parsecs"}, None, None),
])
def test_to_bytes(raw, unit, expected):
    assert parsing.to_bytes(raw, unit) == expected


def test_load_json_skips_warnings_and_rejects_garbage():
    assert parsing.load_json(b'WARNING: low power\n{"card0": {}}') == {"card0": {}}
    assert parsing.load_json(b"[not json] then [1, 2]") == [1, 2]
    assert parsing.load_json(b"no json here") is None
    assert parsing.load_json(b"\xff\xfe garbage") is None


def test_match_by_name_pairs_equal_names_in_order():
    wanted = [(0, "Intel(R) Arc(TM) A770 Graphics"), (1, "Intel(R) Arc(TM) A770 Graphics"), (2, "Other")]
    available = [("a", "Intel Arc A770 Graphics"), ("b", "intel(r) arc(tm) a770 graphics")]
    assert parsing.match_by_name(wanted, available) == {0: "a", 1: "b"}
    assert parsing.match_by_name([(0, "x")], [("a", "y")]) == {}
    assert parsing.match_by_name([(0, "x")], [("a", "y")], by_position=True) == {0: "a"}


# -- llama-server --list-devices -------------------------------------------------------------

def test_list_devices_mixed_output():
    devices = parse_list_devices(fixture("list_devices_mixed.txt"))
    assert [d.name for d in devices] == ["RPC[192.168.1.10:50052]", "CUDA0", "CUDA1", "Vulkan0"]
    rpc, cuda0, cuda1, vk0 = devices
    assert (rpc.kind, rpc.index) == ("RPC", None)
    assert (cuda1.kind, cuda1.index, cuda1.description) == ("CUDA", 1, "NVIDIA GeForce RTX 3090")
    assert cuda0.memory_total_bytes == 24080 * MIB and cuda0.memory_free_bytes == 23500 * MIB
    assert [d.name for d in of_backend(devices, "cuda")] == ["CUDA0", "CUDA1"]
    assert [d.name for d in of_backend(devices, "vulkan")] == ["Vulkan0"]
    sample = cuda0.metrics()
    assert sample.memory_used_bytes == (24080 - 23500) * MIB


def test_list_devices_description_with_parentheses_and_metal_names():
    vk = parse_list_devices(fixture("list_devices_vulkan.txt"))
    assert vk[0].description == "Intel(R) UHD Graphics (CML GT2)"
    assert vk[1].memory_total_bytes == 4342 * MIB
    old = parse_list_devices(fixture("list_devices_metal_old.txt"))
    new = parse_list_devices(fixture("list_devices_metal.txt"))
    assert (old[0].kind, old[0].index) == ("Metal", None)
    assert (new[0].kind, new[0].index) == ("MTL", 0)
    assert [r.id for r in to_refs(old + new, "metal")] == ["metal:0", "metal:0"]


@pytest.mark.parametrize("name", ["list_devices_none.txt", "list_devices_garbage.txt", "nvidia_smi_garbage.txt"])
def test_list_devices_empty_or_garbage(name):
    assert parse_list_devices(fixture(name)) == []


# -- nvidia-smi ------------------------------------------------------------------------------------

def test_nvidia_smi_two_gpus_with_missing_values():
    gpus = parse_nvidia_smi(fixture("nvidia_smi_two.csv"))
    assert [(g.index, g.name) for g in gpus] == [(0, "NVIDIA GeForce RTX 3080"), (1, "NVIDIA GeForce RTX 2060")]
    first, second = gpus
    assert first.uuid == "GPU-8fe3a97d-51f6-a669-0d80-b4530b81b816"
    assert first.metrics.memory_total_bytes == 10240 * MIB
    assert first.metrics.memory_used_bytes == 9029 * MIB
    assert first.metrics.memory_free_bytes == 1211 * MIB
    assert (first.metrics.utilization_pct, first.metrics.temperature_c, first.metrics.power_w) == (97.0, 54.0, 301.42)
    assert second.metrics.utilization_pct is None  # [N/A]
    assert second.metrics.power_w is None  # [Not Supported]
    assert second.metrics.temperature_c == 53.0


@pytest.mark.parametrize("name", ["nvidia_smi_none.txt", "nvidia_smi_garbage.txt", "vulkaninfo_garbage.txt"])
def test_nvidia_smi_no_rows(name):
    assert parse_nvidia_smi(fixture(name)) == []


# -- amd-smi / rocm-smi ---------------------------------------------------------------------------

def test_amd_smi_static_both_shapes():
    old = parse_amd_smi_static(fixture("amd_smi_static_list.json"))
    new = parse_amd_smi_static(fixture("amd_smi_static_gpu_data.json"))
    assert [(g.gpu, g.name, g.memory_total_bytes) for g in old] == [
        (0, "Navi 23 [Radeon RX 6600/6600 XT", 8176 * MIB),
        (1, "Navi 31 [Radeon RX 7900 XT/7900 XTX/7900 GRE/7900M]", 24560 * MIB),
    ]
    assert old[1].bdf == "0000:03:00.0"
    assert [(g.gpu, g.name, g.gfx) for g in new] == [(0, "AMD Radeon RX 7800 XT", "gfx1101"), (1, "Raphael", "gfx1036")]
    assert parse_amd_smi_static(fixture("amd_smi_static_none.json")) == []
    assert parse_amd_smi_static(fixture("amd_smi_garbage.txt")) is None
    assert parse_amd_smi_static(b'{"card0": {}}') is None  # rocm-smi JSON is not amd-smi JSON


def test_amd_smi_single_object_and_string_units():
    gpus = parse_amd_smi_static(b'{"gpu": 0, "asic": {"market_name": "N/A"}, "board": {"product_name": "MI210"},'
                                b' "vram": {"size": "65520 MB"}}')
    assert [(g.gpu, g.name, g.memory_total_bytes) for g in gpus] == [(0, "MI210", 65520 * MIB)]


def test_amd_smi_hip_ids():
    assert parse_amd_smi_hip_ids(fixture("amd_smi_list_e.json")) == {0: 1, 1: 0, "0000:03:00.0": 1, "0000:12:00.0": 0}
    assert parse_amd_smi_hip_ids(b'[{"gpu": 0, "bdf": "0000:c4:00.0"}]') == {}  # list without -e


def test_hip_index_joins_on_bdf_then_amd_smi_id():
    static = parse_amd_smi_static(fixture("amd_smi_static_gpu_data.json"))
    swapped = parse_amd_smi_hip_ids(b'[{"gpu": 1, "bdf": "0000:03:00.0", "hip_id": 1},'
                                    b' {"gpu": 0, "bdf": "0000:12:00.0", "hip_id": 0}]')
    assert [hip_index(g, swapped) for g in static] == [1, 0]  # BDF wins over the gpu ordinal
    assert [hip_index(g, {}) for g in static] == [0, 1]  # no enumeration: amd-smi ids


def test_amd_smi_metric_list_shape():
    by_gpu = parse_amd_smi_metric(fixture("amd_smi_metric_list.json"))
    m0, m1 = by_gpu[0], by_gpu[1]
    assert (m0.memory_total_bytes, m0.memory_used_bytes, m0.memory_free_bytes) == (8176 * MIB, 202 * MIB, 7974 * MIB)
    assert (m0.utilization_pct, m0.temperature_c, m0.power_w) == (42.0, 38.0, 20.0)
    assert m1.power_w is None  # "N/A"
    assert m1.temperature_c == 35.0  # edge N/A → hotspot


def test_amd_smi_metric_gpu_data_shape():
    by_gpu = parse_amd_smi_metric(fixture("amd_smi_metric_gpu_data.json"))
    assert by_gpu[0].memory_used_bytes == 11153 * MIB
    assert (by_gpu[0].utilization_pct, by_gpu[0].power_w, by_gpu[0].temperature_c) == (94.0, 212.0, 61.0)
    assert by_gpu[1].memory_free_bytes == 211 * MIB
    assert parse_amd_smi_metric(fixture("amd_smi_garbage.txt")) == {}


def test_rocm_smi_cards():
    cards = parse_rocm_smi(fixture("rocm_smi_two.json"))
    assert [(c.index, c.name) for c in cards] == [(0, "Navi 23 [Radeon RX 6600/6600 XT/6600M]"), (1, "Phoenix3")]
    c0, c1 = cards
    assert c0.metrics.memory_total_bytes == 8573157376
    assert c0.metrics.memory_free_bytes == 8573157376 - 211812352
    assert (c0.metrics.temperature_c, c0.metrics.power_w, c0.metrics.utilization_pct) == (37.0, 4.0, 0.0)
    assert (c1.metrics.power_w, c1.metrics.utilization_pct) == (7.222, 19.0)
    assert parse_rocm_smi(fixture("rocm_smi_garbage.txt")) is None


# -- vulkaninfo ------------------------------------------------------------------------------------

def test_vulkaninfo_summary_blocks():
    gpus = parse_vulkaninfo_summary(fixture("vulkaninfo_three.txt"))
    assert [(g.index, g.device_type) for g in gpus] == [(0, "integrated"), (1, "discrete"), (2, "cpu")]
    assert gpus[1].name == "Quadro T2000 with Max-Q Design"
    assert gpus[1].vendor_id == 0x10DE
    assert [g.index for g in usable(gpus)] == [0, 1]


def test_vulkaninfo_duplicate_and_cpu_only():
    dup = parse_vulkaninfo_summary(fixture("vulkaninfo_duplicate.txt"))
    assert len(dup) == 2 and [g.index for g in usable(dup)] == [0]
    cpu = parse_vulkaninfo_summary(fixture("vulkaninfo_cpu_only.txt"))
    assert len(cpu) == 1 and usable(cpu) == []
    assert parse_vulkaninfo_summary(fixture("vulkaninfo_garbage.txt")) == []


# -- sycl-ls / xpu-smi ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("sycl_ls_2025.txt", [(0, "Intel(R) Arc(TM) A770 Graphics"), (1, "Intel(R) UHD Graphics 730")]),
    ("sycl_ls_2024.txt", [(0, "Intel(R) Graphics [0xe20b]"), (1, "Intel(R) UHD Graphics 770")]),
    ("sycl_ls_2023.txt", [(0, "Intel(R) Arc(TM) A770 Graphics")]),
    ("sycl_ls_2021.txt", [(0, "Intel(R) Level-Zero")]),
    ("sycl_ls_no_gpu.txt", []),
])
def test_sycl_ls_formats(name, expected):
    assert [(d.index, d.name) for d in level_zero_gpus(parse_sycl_ls(fixture(name)))] == expected


def test_sycl_ls_keeps_other_backends_and_rejects_garbage():
    devices = parse_sycl_ls(fixture("sycl_ls_2023.txt"))
    assert [(d.backend, d.type, d.index) for d in devices] == [
        ("opencl", "acc", 0), ("opencl", "cpu", 1), ("opencl", "gpu", 2), ("level_zero", "gpu", 0)]
    assert devices[2].name == "Intel(R) Arc(TM) A770 Graphics"
    assert parse_sycl_ls(fixture("sycl_ls_garbage.txt")) == []


def test_xpu_smi():
    assert parse_xpu_smi_discovery(fixture("xpu_smi_discovery.json")) == [
        (0, "Intel(R) Arc(TM) A770 Graphics"), (1, "Intel(R) UHD Graphics 730")]
    dump = parse_xpu_smi_dump(fixture("xpu_smi_dump.csv"))
    assert (dump[0].utilization_pct, dump[0].power_w, dump[0].temperature_c) == (12.5, 35.2, 48.0)
    assert dump[0].memory_used_bytes == 1203 * MIB
    assert (dump[1].utilization_pct, dump[1].temperature_c) == (None, None)
    assert parse_xpu_smi_dump(b"Error: device not found") == {}


# -- macOS -------------------------------------------------------------------------------------------

def test_sysctl_and_system_profiler():
    assert parse_sysctl_memsize(fixture("sysctl_memsize.txt")) == 34359738368
    assert parse_sysctl_memsize(b"hw.memsize: 17179869184\n") == 17179869184
    assert parse_sysctl_memsize(b"sysctl: unknown oid 'hw.memsize'") is None
    assert parse_system_profiler_gpu(fixture("system_profiler_m3.json")) == "Apple M3 Pro"
    assert parse_system_profiler_gpu(fixture("system_profiler_m1_old.json")) == "Apple M1"
    assert parse_system_profiler_gpu(b"garbage") is None
