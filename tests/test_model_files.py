"""ModelFiles: the request path's view of the model files, without a system call per request."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rolemesh_node.config import ModelSpec
from rolemesh_node.model_files import ModelFiles


@pytest.fixture
def spec(tmp_path: Path) -> ModelSpec:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 96)
    return ModelSpec(name="m", path=path)


def count_stats(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real_stat = os.stat

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        calls.append(str(path))
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat)
    return calls


def test_an_available_file_is_not_looked_at_again_until_refresh(spec: ModelSpec,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    files = ModelFiles([spec])
    calls = count_stats(monkeypatch)
    for _ in range(100):
        assert files.available(spec) and files.size_bytes(spec) == 100
    assert calls == []
    spec.path.write_bytes(b"GGUF")
    assert files.size_bytes(spec) == 100  # until the next refresh
    files.refresh()
    assert files.size_bytes(spec) == 4 and calls


def test_a_missing_file_is_looked_at_on_every_ask(spec: ModelSpec) -> None:
    spec.path.unlink()
    files = ModelFiles([spec])
    assert not files.available(spec) and files.size_bytes(spec) is None
    spec.path.write_bytes(b"GGUF")  # copied in: served at once
    assert files.available(spec) and files.size_bytes(spec) == 4


def test_a_removed_file_shows_after_refresh(spec: ModelSpec) -> None:
    files = ModelFiles([spec])
    spec.path.unlink()
    files.refresh()
    assert not files.available(spec)
