"""The cpu backend: logical devices, threads per child, pinning env."""

from __future__ import annotations

import pytest

from rolemesh_node.devices.cpu import CpuBackend


@pytest.mark.parametrize("cores, count, threads", [
    (1, 1, 1),
    (2, 1, 1),  # one core is left to the agent
    (8, 1, 7),
    (8, 2, 3),
    (64, 4, 15),
    (2, 4, 1),  # never below one
])
def test_children_split_the_cores_but_one(cores: int, count: int, threads: int) -> None:
    backend = CpuBackend(count=count, cores=cores)
    assert backend.threads_per_device == threads
    devices = backend.discover().result  # synchronous: nothing to run
    assert [d.id for d in devices] == [f"cpu:{i}" for i in range(count)]
    args = backend.child_args(devices[0])
    assert args[args.index("--threads") + 1] == str(threads) and args[-2:] == ["-ngl", "0"]


def test_children_stay_off_the_gpus() -> None:
    backend = CpuBackend()
    env = backend.child_env(backend.discover().result[0], {"CUDA_VISIBLE_DEVICES": "0", "PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["HIP_VISIBLE_DEVICES"] == "" and env["PATH"] == "/bin"
