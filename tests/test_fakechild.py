"""bench/fakechild.py is faithful enough: the node runs it as its child and streams through it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest_twisted

ROOT = Path(__file__).resolve().parent.parent


def fake_config(tmp_path: Path) -> dict[str, Any]:
    wrapper = tmp_path / "llama-server"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'bench' / 'fakechild.py'} \"$@\"\n")
    wrapper.chmod(0o755)
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    return {"backend": "cpu", "cpu_devices": 1, "llama_server_bin": str(wrapper),
            "llama_server_extra_args": ["--fake-tps", "200"], "models": {"fake": {"path": str(model)}}}


@pytest_twisted.ensureDeferred
async def test_the_node_streams_through_the_fake_child(node_service, http_client, tmp_path):
    service = await node_service(fake_config(tmp_path))
    base = f"http://127.0.0.1:{service.port}"
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    response = await http_client.post(base + "/v1/chat/completions", json.dumps(body).encode(),
                                      headers={"Content-Type": ["application/json"]})
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    text = (await response.content()).decode()
    events = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    docs = [json.loads(e) for e in events[:-1]]
    assert docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [d["choices"][0]["delta"]["content"] for d in docs[1:4]] == ["a", "b", "c"]
    assert docs[4]["choices"][0]["finish_reason"] == "length" and docs[4]["timings"]["predicted_n"] == 3
    plain = await http_client.post(base + "/v1/completions", json.dumps(
        {"model": "fake", "prompt": "hi", "max_tokens": 2}).encode(), headers={"Content-Type": ["application/json"]})
    assert plain.code == 200
    doc = json.loads(await plain.content())
    assert doc["choices"][0]["text"] == "ab" and doc["usage"]["completion_tokens"] == 2
    # the node read the token counts from the fake's last events, as it does from llama-server's
    metrics = (await (await http_client.get(base + "/metrics")).content()).decode()
    completion = [line for line in metrics.splitlines()
                  if line.startswith("rolemesh_tokens_total") and 'model="fake"' in line and "completion" in line]
    assert completion and float(re.split(r"\s+", completion[0])[-1]) == 5.0
