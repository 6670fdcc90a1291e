"""ModelFiles: the request path's view of the model files, without a system call per request."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq

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


@pytest.mark.allow_errors
@pytest_twisted.ensureDeferred
async def test_a_file_removed_meanwhile_is_answered_unavailable_and_not_taken_for_a_crash(
        node_service: Any, tiny_models: dict[str, Path], stand_in_bin: str, tmp_path: Path) -> None:
    # Removed after the last look (metrics_interval_s is long here): the slot
    # finds it missing before starting a child. That is not a crash (no
    # cooldown), and the proxy says "unavailable" from then on.
    path = tmp_path / "m.gguf"
    shutil.copy(tiny_models["tiny-a"], path)
    service = await node_service({"backend": "cpu", "llama_server_bin": stand_in_bin, "metrics_interval_s": 60,
                                  "crash_limit": 2, "models": {"m": {"path": path}}})
    path.unlink()
    body = json.dumps({"model": "m", "messages": []}).encode()
    url = f"http://127.0.0.1:{service.port}/v1/chat/completions"
    for _ in range(4):
        response = await treq.post(url, data=body, persistent=False)
        doc = json.loads(await response.content())
        assert (response.code, doc["error"]["code"]) == (503, "model_unavailable"), doc
    slot = service.node.slots["cpu:0"]
    assert slot.crashes.cooldown("m") is None
    shutil.copy(tiny_models["tiny-a"], path)  # back: tried again (the stand-in binary then fails to start)
    response = await treq.post(url, data=body, persistent=False)
    doc = json.loads(await response.content())
    assert (response.code, doc["error"]["code"]) == (503, "model_not_ready")
    assert "cooldown" not in doc["error"]["message"]
