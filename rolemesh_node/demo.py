"""``rolemesh-node-agent --demo``: a working node on any machine, in one command.

Writes two tiny random-weight models (see :mod:`rolemesh_node.tinymodel`) and
a config into a demo directory, then runs that config: the ``cpu`` backend,
``127.0.0.1``, and a printed ``curl`` that returns a chat completion.
"""

from __future__ import annotations

from pathlib import Path

DEMO_CONFIG = """\
# Written by `rolemesh-node-agent --demo`. Every key: docs/configuration.md
listen_host: 127.0.0.1
listen_port: {port}
backend: cpu
cpu_devices: 1
state_dir: {directory}/state
llama_server_startup_timeout_s: 30
max_pending_requests_per_device: 4
models:
  tiny-a:
    path: {directory}/tiny-a.gguf
    ctx_size: 512
    aliases: [tiny]
  tiny-b:
    path: {directory}/tiny-b.gguf
    ctx_size: 512
  tiny-embed:
    path: {directory}/tiny-a.gguf
    ctx_size: 512
    embedding: true
"""


def prepare(directory: Path, port: int) -> Path:
    """Write the demo models and config under ``directory``; return the config path."""
    from .tinymodel import write_tiny_model  # needs the [demo] extra (gguf, numpy)

    directory.mkdir(parents=True, exist_ok=True)
    for name, seed in (("tiny-a", 1), ("tiny-b", 2)):
        target = directory / f"{name}.gguf"
        if not target.exists():
            write_tiny_model(target, seed=seed, name=name)
    config = directory / "node.yaml"
    config.write_text(DEMO_CONFIG.format(port=port, directory=directory.resolve()), encoding="utf-8")
    return config


def banner(port: int) -> str:
    return (
        "\nrolemesh-node demo is starting on http://127.0.0.1:{port}\n"
        "Try, from another terminal:\n"
        "  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        "    -d '{{\"model\": \"tiny\", \"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}], "
        "\"max_tokens\": 8}}'\n"
        "  curl -s http://127.0.0.1:{port}/v1/node/inventory\n"
        "Stop with Ctrl-C.\n"
    ).format(port=port)
