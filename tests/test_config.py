"""Configuration: every failure is one line ``config error: FILE: key.path: problem``;
valid files load into the right frozen values.

The failure cases are one table; each row is YAML text and the exact
``key.path: problem`` part expected after ``config error: FILE:``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rolemesh_node.config import (
    ENV_OVERRIDES,
    RESERVED_CHILD_FLAGS,
    ConfigError,
    ModelSpec,
    NodeConfig,
    env_overrides,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
M = "models:\n  m:\n    path: m.gguf\n"  # a valid model, to extend per case


def model(extra: str) -> str:
    """``models.m`` with ``path`` and the given (already indented) extra lines."""
    return M + "".join(f"    {line}\n" for line in extra.splitlines())


# (id, YAML text, expected "key.path: problem")
FAILURES: list[tuple[str, str, str]] = [
    # -- YAML itself
    ("yaml-unclosed-flow", "listen_port: [1, 2\n",
     "line 2, column 1: invalid YAML: expected ',' or ']', but got '<stream end>'"),
    ("yaml-nested-colon", "backend: cpu: x\n",
     "line 1, column 13: invalid YAML: mapping values are not allowed here"),
    ("yaml-tab", "models:\n  m:\n\tpath: a\n",
     "line 3, column 1: invalid YAML: found character '\\t' that cannot start any token"),
    ("document-is-list", "- listen_port: 1\n",
     "(document): expected a mapping of settings, got list"),
    ("document-is-scalar", "cpu\n", "(document): expected a mapping of settings, got string"),
    # -- duplicate keys, anywhere
    ("duplicate-top-level-key", "listen_port: 1\nbackend: cpu\nlisten_port: 2\n",
     "listen_port: duplicate key (line 3); each key may appear once"),
    ("duplicate-model-name", M + "  m:\n    path: other.gguf\n",
     "models.m: duplicate key (line 4); each key may appear once"),
    ("duplicate-model-key", model("path: again.gguf"),
     "models.m.path: duplicate key (line 4); each key may appear once"),
    # -- unknown keys
    ("unknown-top-level-key", "listen_prot: 8088\n", "listen_prot: unknown key (see docs/configuration.md)"),
    ("non-string-top-level-key", "1: x\n", "1: unknown key (see docs/configuration.md)"),
    ("unknown-model-key", model("ctx: 512"),
     "models.m.ctx: unknown key; expected one of aliases, args, ctx_size, embedding, path, ttl_s"),
    # -- wrong types
    ("port-string", "listen_port: '8088'\n", "listen_port: expected an integer, got string"),
    ("port-float", "listen_port: 8088.0\n", "listen_port: expected an integer, got number"),
    ("port-bool", "listen_port: true\n", "listen_port: expected an integer, got boolean"),
    ("port-null", "listen_port:\n", "listen_port: expected an integer, got null"),
    ("host-int", "listen_host: 5\n", "listen_host: expected a non-empty string, got integer"),
    ("backend-list", "backend: [cpu]\n", "backend: expected a non-empty string, got list"),
    ("timeout-string", "llama_server_startup_timeout_s: fast\n",
     "llama_server_startup_timeout_s: expected a number, got string"),
    ("timeout-bool", "request_timeout_s: true\n", "request_timeout_s: expected a number, got boolean"),
    ("cpu-devices-string", "cpu_devices: two\n", "cpu_devices: expected an integer, got string"),
    ("models-list", "models:\n  - m.gguf\n", "models: expected a mapping of model name to spec, got list"),
    ("model-is-string", "models:\n  m: m.gguf\n", "models.m: expected a mapping with at least 'path', got string"),
    ("model-is-null", "models:\n  m:\n", "models.m: expected a mapping with at least 'path', got null"),
    ("model-name-int", "models:\n  1:\n    path: m.gguf\n", "models.1: a model name must be a non-empty string"),
    ("model-path-missing", "models:\n  m:\n    ctx_size: 512\n",
     "models.m.path: missing (the GGUF file of this model)"),
    ("model-path-int", "models:\n  m:\n    path: 5\n", "models.m.path: expected a non-empty string, got integer"),
    ("model-ctx-float", model("ctx_size: 1.5"), "models.m.ctx_size: expected an integer, got number"),
    ("model-embedding-string", model("embedding: 'yes'"), "models.m.embedding: expected true or false, got string"),
    ("model-args-string", model("args: -ngl 99"), "models.m.args: expected a list of strings, got string"),
    ("model-args-bool", model("args: [true]"), "models.m.args[0]: expected a non-empty string, got boolean"),
    ("model-aliases-mapping", model("aliases: {a: b}"), "models.m.aliases: expected a list of strings, got mapping"),
    ("extra-args-string", "llama_server_extra_args: --mlock\n",
     "llama_server_extra_args: expected a list of strings, got string"),
    ("bin-int", "llama_server_bin: 5\n", "llama_server_bin: expected a non-empty string, got integer"),
    # -- timeouts and intervals: zero, negative, not finite
    *[(f"{key}-{label}", f"{key}: {value}\n", f"{key}: must be a positive number of seconds, got {shown}")
      for key in ("llama_server_startup_timeout_s", "llama_server_probe_interval_s", "llama_server_stop_grace_s",
                  "request_timeout_s", "metrics_interval_s", "device_tool_timeout_s", "heartbeat_interval_s",
                  "dispatcher_timeout_s", "crash_window_s", "crash_cooldown_s")
      for label, value, shown in (("zero", "0", "0"), ("negative", "-1.5", "-1.5"))],
    ("timeout-nan", "request_timeout_s: .nan\n", "request_timeout_s: must be a positive number of seconds, got nan"),
    ("timeout-inf", "request_timeout_s: .inf\n", "request_timeout_s: must be a positive number of seconds, got inf"),
    ("model-ttl-zero", model("ttl_s: 0"), "models.m.ttl_s: must be a positive number of seconds, got 0"),
    ("model-ttl-negative", model("ttl_s: -5"), "models.m.ttl_s: must be a positive number of seconds, got -5"),
    # -- ranges
    ("port-negative", "listen_port: -1\n", "listen_port: must be at least 0, got -1"),
    ("port-too-big", "listen_port: 65536\n", "listen_port: must be at most 65535, got 65536"),
    ("port-way-too-big", "listen_port: 70000\n", "listen_port: must be at most 65535, got 70000"),
    ("cpu-devices-zero", "cpu_devices: 0\n", "cpu_devices: must be at least 1, got 0"),
    ("cpu-devices-too-many", "cpu_devices: 65\n", "cpu_devices: must be at most 64, got 65"),
    ("parallel-zero", "llama_server_parallel: 0\n", "llama_server_parallel: must be at least 1, got 0"),
    ("pending-zero", "max_pending_requests_per_device: 0\n",
     "max_pending_requests_per_device: must be at least 1, got 0"),
    ("concurrent-zero", "max_concurrent_requests_per_device: 0\n",
     "max_concurrent_requests_per_device: must be at least 1, got 0"),
    ("body-too-small", "max_request_body_bytes: 100\n", "max_request_body_bytes: must be at least 1024, got 100"),
    ("crash-limit-zero", "crash_limit: 0\n", "crash_limit: must be at least 1, got 0"),
    ("model-ctx-too-small", model("ctx_size: 8"), "models.m.ctx_size: must be at least 16, got 8"),
    # -- enumerations and formats
    ("backend-unknown", "backend: tpu\n",
     "backend: unknown backend 'tpu'; expected one of auto, cpu, cuda, rocm, vulkan, sycl, metal"),
    ("backend-case", "backend: CUDA\n",
     "backend: unknown backend 'CUDA'; expected one of auto, cpu, cuda, rocm, vulkan, sycl, metal"),
    ("log-level-unknown", "log_level: verbose\n", "log_level: expected one of debug, info, warn, error, got 'verbose'"),
    ("node-id-space", "node_id: my node\n",
     "node_id: expected up to 128 characters of letters, digits, '-', '_', '.', ':'"),
    ("node-id-too-long", f"node_id: {'n' * 129}\n",
     "node_id: expected up to 128 characters of letters, digits, '-', '_', '.', ':'"),
    ("dispatcher-url-scheme", "dispatcher_base_url: ftp://dispatch\n",
     "dispatcher_base_url: expected an http:// or https:// URL, got 'ftp://dispatch'"),
    ("dispatcher-url-empty-host", "dispatcher_base_url: 'http://'\n",
     "dispatcher_base_url: expected an http:// or https:// URL, got 'http://'"),
    ("advertise-url-bare-host", "advertise_url: node-7:8088\n",
     "advertise_url: expected an http:// or https:// URL, got 'node-7:8088'"),
    # what an unexpanded template leaves (Kubernetes keeps "$(VAR)" when VAR is not defined)
    ("advertise-url-unexpanded", "advertise_url: http://$(POD_IP):8088\n",
     "advertise_url: expected an http:// or https:// URL, got 'http://$(POD_IP):8088'"),
    ("advertise-url-ipv6-unbracketed", "advertise_url: http://fd00::7:8088\n",
     "advertise_url: expected an http:// or https:// URL, got 'http://fd00::7:8088'"),
    ("advertise-url-bad-port", "advertise_url: http://node-7:80a\n",
     "advertise_url: expected an http:// or https:// URL, got 'http://node-7:80a'"),
    ("advertise-url-port-too-big", "advertise_url: http://node-7:70000\n",
     "advertise_url: expected an http:// or https:// URL, got 'http://node-7:70000'"),
    ("advertise-url-space", "advertise_url: http://node 7:8088\n",
     "advertise_url: expected an http:// or https:// URL, got 'http://node 7:8088'"),
    # a password in a bad URL is not printed
    ("dispatcher-url-userinfo", "dispatcher_base_url: http://user:s3cret@$(DISPATCHER)\n",
     "dispatcher_base_url: expected an http:// or https:// URL, got 'http://***@$(DISPATCHER)'"),
    # -- devices
    ("devices-word", "devices: some\n", "devices: expected 'all' or a non-empty list of device indices"),
    ("devices-int", "devices: 0\n", "devices: expected 'all' or a non-empty list of device indices"),
    ("devices-empty", "devices: []\n", "devices: expected 'all' or a non-empty list of device indices"),
    ("devices-negative", "devices: [0, -1]\n", "devices[1]: must be at least 0, got -1"),
    ("devices-string-item", "devices: [gpu0]\n", "devices[0]: expected an integer, got string"),
    ("devices-twice", "devices: [1, 0, 1]\n", "devices: a device index is listed twice"),
    # -- flags the agent sets on every child
    ("args-host", model("args: [--host, 0.0.0.0]"),
     "models.m.args[0]: --host is set by the agent and may not be given here"),
    ("args-port-equals", model("args: [-ngl, 99, --port=9000]"),
     "models.m.args[2]: --port is set by the agent and may not be given here"),
    ("args-model", model("args: [-m, other.gguf]"),
     "models.m.args[0]: -m is set by the agent and may not be given here"),
    ("args-ctx", model("args: [-c, '4096']"), "models.m.args[0]: -c is set by the agent and may not be given here"),
    ("args-alias", model("args: [--alias, x]"),
     "models.m.args[0]: --alias is set by the agent and may not be given here"),
    ("args-parallel", model("args: [-np, '4']"),
     "models.m.args[0]: -np is set by the agent and may not be given here"),
    ("args-embeddings", model("args: [--embeddings]"),
     "models.m.args[0]: --embeddings is set by the agent and may not be given here"),
    ("extra-args-host", "llama_server_extra_args: [--mlock, --host, 0.0.0.0]\n",
     "llama_server_extra_args[1]: --host is set by the agent and may not be given here"),
    # -- names and aliases
    ("alias-is-other-model", "models:\n  a:\n    path: a.gguf\n    aliases: [b]\n  b:\n    path: b.gguf\n",
     "models.b: name or alias 'b' is already used by model 'a'"),
    ("alias-shadows-earlier-model", "models:\n  b:\n    path: b.gguf\n  a:\n    path: a.gguf\n    aliases: [b]\n",
     "models.a: name or alias 'b' is already used by model 'b'"),
    ("alias-shared", "models:\n  a:\n    path: a.gguf\n    aliases: [x]\n  b:\n    path: b.gguf\n    aliases: [x]\n",
     "models.b: name or alias 'x' is already used by model 'a'"),
    # -- relations between keys
    ("probe-equals-startup", "llama_server_probe_interval_s: 30\n",
     "llama_server_probe_interval_s: must be shorter than llama_server_startup_timeout_s (30.0)"),
    ("probe-above-startup", "llama_server_startup_timeout_s: 2\nllama_server_probe_interval_s: 5\n",
     "llama_server_probe_interval_s: must be shorter than llama_server_startup_timeout_s (2.0)"),
    ("startup-below-default-probe", "llama_server_startup_timeout_s: 0.25\n",
     "llama_server_probe_interval_s: must be shorter than llama_server_startup_timeout_s (0.25)"),
    ("concurrent-above-pending", "max_pending_requests_per_device: 2\nmax_concurrent_requests_per_device: 3\n",
     "max_concurrent_requests_per_device: must not exceed max_pending_requests_per_device (2)"),
    ("concurrent-above-set-pending", "max_pending_requests_per_device: 4\nmax_concurrent_requests_per_device: 5\n",
     "max_concurrent_requests_per_device: must not exceed max_pending_requests_per_device (4)"),
    ("token-and-token-file", "dispatcher_token: abc\ndispatcher_token_file: token.txt\n",
     "dispatcher_token_file: give dispatcher_token or dispatcher_token_file, not both"),
]


@pytest.mark.parametrize("text, expected", [pytest.param(t, e, id=i) for i, t, e in FAILURES])
def test_config_error_line(write_config: Any, text: str, expected: str) -> None:
    path = write_config(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = str(info.value)
    assert line == f"config error: {path}: {expected}"
    assert "\n" not in line
    assert info.value.file == str(path)
    assert f"{info.value.path}: {info.value.problem}" == expected


def test_failure_ids_are_unique() -> None:
    ids = [i for i, _, _ in FAILURES]
    assert len(ids) == len(set(ids))


def test_every_reserved_flag_is_refused(write_config: Any) -> None:
    for flag in sorted(RESERVED_CHILD_FLAGS):
        path = write_config(model(f"args: ['{flag}', x]"))
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value) == (f"config error: {path}: models.m.args[0]: "
                                   f"{flag} is set by the agent and may not be given here")


# -- the file itself


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config error: {path}: (file): no such file"


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"config error: {tmp_path}: (file): is a directory, not a YAML file"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("node_id: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config error: {path}: (file): not UTF-8 text"


def test_file_is_named_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "bad.yaml").write_text("listen_port: 70000\n")
    monkeypatch.chdir(tmp_path)
    for given in ("conf/bad.yaml", "./conf/bad.yaml", str(tmp_path / "conf" / "bad.yaml")):
        with pytest.raises(ConfigError) as info:
            load_config(given)
        assert str(info.value) == f"config error: {given}: listen_port: must be at most 65535, got 70000"


# -- valid configs


def test_empty_file_gives_the_defaults(write_config: Any) -> None:
    for text in ("", "# only a comment\n", "---\n"):
        path = write_config(text)
        config = load_config(path)
        assert config == dataclasses.replace(NodeConfig(), source=str(path))


def test_defaults() -> None:
    d = NodeConfig()
    assert (d.node_id, d.listen_host, d.listen_port, d.backend, d.devices, d.cpu_devices) == (
        None, "127.0.0.1", 8088, "auto", None, 1)
    assert (d.llama_server_startup_timeout_s, d.llama_server_probe_interval_s, d.max_pending_requests_per_device,
            d.max_concurrent_requests_per_device) == (30.0, 0.5, 3, 2)
    assert d.llama_server_bin is None and d.dispatcher_base_url is None and dict(d.models) == {}


@pytest.mark.parametrize("given, concurrent, pending", [
    ({}, 2, 3),  # one running, one waiting inside the child, one waiting here
    ({"llama_server_parallel": 4}, 5, 6),
    ({"max_pending_requests_per_device": 1}, 1, 1),  # a set bound caps the derived concurrency
    ({"max_pending_requests_per_device": 8}, 2, 8),
    ({"max_concurrent_requests_per_device": 1}, 1, 2),  # serialized as the seed had it
    ({"max_concurrent_requests_per_device": 6}, 6, 7),
    ({"llama_server_parallel": 2, "max_concurrent_requests_per_device": 2,
      "max_pending_requests_per_device": 2}, 2, 2),
])
def test_request_limits_are_derived_from_the_child_slots(write_config: Any, given: dict[str, int],
                                                          concurrent: int, pending: int) -> None:
    config = load_config(write_config(given))
    assert (config.max_concurrent_requests_per_device, config.max_pending_requests_per_device) == (
        concurrent, pending)
    assert NodeConfig(**given).max_concurrent_requests_per_device == concurrent


def test_every_key_set(write_config: Any, tmp_path: Path) -> None:
    path = write_config({
        "node_id": "gpu-box-1",
        "listen_host": "0.0.0.0",
        "listen_port": 9000,
        "advertise_url": "http://gpu-box-1.lan:9000/",
        "state_dir": "state",
        "log_level": "debug",
        "backend": "cuda",
        "devices": [1, 0],
        "cpu_devices": 4,
        "metrics_interval_s": 2,
        "device_tool_timeout_s": 3,
        "llama_server_bin": "/opt/llama/bin/llama-server",
        "llama_server_startup_timeout_s": 120,
        "llama_server_probe_interval_s": 0.25,
        "llama_server_stop_grace_s": 15,
        "llama_server_parallel": 4,
        "llama_server_extra_args": ["--mlock", "-fa", "on"],
        "crash_limit": 5,
        "crash_window_s": 30,
        "crash_cooldown_s": 120,
        "max_pending_requests_per_device": 8,
        "max_concurrent_requests_per_device": 4,
        "max_request_body_bytes": 2048,
        "request_timeout_s": 90,
        "dispatcher_base_url": "https://dispatcher.lan/",
        "dispatcher_token_file": "token.txt",
        "heartbeat_interval_s": 15,
        "dispatcher_timeout_s": 4,
        "models": {
            "qwen": {"path": "models/qwen.gguf", "ctx_size": 8192, "args": ["-ngl", 99, "--temp", 0.7],
                     "aliases": ["default", "chat"], "embedding": False, "ttl_s": 600},
            "embed": {"path": "/abs/embed.gguf", "embedding": True},
        },
    })
    c = load_config(path)
    assert c.source == str(path)
    assert (c.node_id, c.listen_host, c.listen_port) == ("gpu-box-1", "0.0.0.0", 9000)
    assert c.advertise_url == "http://gpu-box-1.lan:9000"  # trailing slash dropped
    assert c.dispatcher_base_url == "https://dispatcher.lan"
    assert c.state_dir == tmp_path / "state"
    assert c.dispatcher_token_file == tmp_path / "token.txt"
    assert (c.log_level, c.backend, c.devices, c.cpu_devices) == ("debug", "cuda", (1, 0), 4)
    for key in ("metrics_interval_s", "device_tool_timeout_s", "llama_server_startup_timeout_s",
                "llama_server_stop_grace_s", "crash_window_s", "crash_cooldown_s", "request_timeout_s",
                "heartbeat_interval_s", "dispatcher_timeout_s"):
        assert type(getattr(c, key)) is float, key
    assert c.llama_server_startup_timeout_s == 120.0 and c.llama_server_probe_interval_s == 0.25
    assert c.llama_server_bin == "/opt/llama/bin/llama-server"  # a command, not resolved against the file
    assert c.llama_server_extra_args == ("--mlock", "-fa", "on")
    assert (c.llama_server_parallel, c.crash_limit, c.max_pending_requests_per_device,
            c.max_concurrent_requests_per_device, c.max_request_body_bytes) == (4, 5, 8, 4, 2048)
    assert list(c.models) == ["qwen", "embed"]
    qwen = c.models["qwen"]
    assert qwen == ModelSpec(name="qwen", path=tmp_path / "models" / "qwen.gguf", ctx_size=8192,
                             args=("-ngl", "99", "--temp", "0.7"), aliases=("default", "chat"),
                             embedding=False, ttl_s=600.0)
    assert c.models["embed"] == ModelSpec(name="embed", path=Path("/abs/embed.gguf"), embedding=True)


def test_relative_paths_resolve_against_the_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc" / "node"
    conf.mkdir(parents=True)
    (conf / "node.yaml").write_text(
        "state_dir: ../state\n"
        "models:\n"
        "  rel: {path: models/rel.gguf}\n"
        "  up: {path: ../shared/up.gguf}\n"
        "  abs: {path: /srv/models/abs.gguf}\n"
        "  home: {path: ~/models/home.gguf}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # given relative to the cwd: the base is still the file's own directory
    c = load_config(os.path.relpath(conf / "node.yaml", elsewhere))
    paths = {name: spec.path for name, spec in c.models.items()}
    assert paths == {
        "rel": conf / "models" / "rel.gguf",
        "up": conf / ".." / "shared" / "up.gguf",
        "abs": Path("/srv/models/abs.gguf"),
        "home": tmp_path / "home" / "models" / "home.gguf",
    }
    assert all(p.is_absolute() for p in paths.values())
    assert c.state_dir == conf / ".." / "state"


@pytest.mark.parametrize("url", [
    "http://gpu-box-1.lan:8088", "https://d.example/rolemesh", "http://10.1.2.3:8088", "http://[fd00::7]:8088",
    "http://[fe80::1%25eth0]:8088", "http://node_7:8088", "http://user:pw@dispatcher.lan",
])
def test_urls_accepted(write_config: Any, url: str) -> None:
    c = load_config(write_config(f"advertise_url: '{url}/'\ndispatcher_base_url: '{url}'\n"))
    assert c.advertise_url == url and c.dispatcher_base_url == url


@pytest.mark.parametrize("text, expected", [
    ("", None), ("devices: all\n", None), ("devices: null\n", None), ("devices: [0]\n", (0,)),
    ("devices: [3, 1]\n", (3, 1)),
])
def test_devices(write_config: Any, text: str, expected: Any) -> None:
    assert load_config(write_config(text)).devices == expected


def test_missing_model_file_is_not_fatal(write_config: Any, tmp_path: Path) -> None:
    c = load_config(write_config(M))
    spec = c.models["m"]
    assert spec.path == tmp_path / "m.gguf"
    assert not spec.available() and spec.size_bytes() is None
    (tmp_path / "m.gguf").write_bytes(b"GGUF....")
    assert spec.available() and spec.size_bytes() == 8  # checked on demand


def test_aliases_resolve(write_config: Any) -> None:
    c = load_config(write_config(
        "models:\n  a:\n    path: a.gguf\n    aliases: [chat, a]\n  b:\n    path: b.gguf\n"))
    assert c.resolve_model("a") is c.models["a"]
    assert c.resolve_model("chat") is c.models["a"]
    assert c.resolve_model("b") is c.models["b"]
    assert c.resolve_model("nope") is None


def test_yaml_anchors_and_merge_keys(write_config: Any) -> None:
    c = load_config(write_config(
        "models:\n  a: &common\n    path: a.gguf\n    ctx_size: 1024\n  b:\n    <<: *common\n    path: b.gguf\n"))
    assert c.models["b"].ctx_size == 1024 and c.models["b"].path.name == "b.gguf"


# -- environment overrides (ROLEMESH_NODE_ID, ROLEMESH_ADVERTISE_URL)

HOST_ENV = {"ROLEMESH_NODE_ID": "gpu-node-7", "ROLEMESH_ADVERTISE_URL": "http://10.1.2.3:8088/"}


def test_environment_overrides_the_file(write_config: Any) -> None:
    path = write_config("node_id: from-file\nadvertise_url: http://file.lan:8088\nlisten_port: 9000\n")
    c = load_config(path, HOST_ENV)
    assert (c.node_id, c.advertise_url, c.listen_port) == ("gpu-node-7", "http://10.1.2.3:8088", 9000)
    assert env_overrides(HOST_ENV) == {"node_id": "ROLEMESH_NODE_ID", "advertise_url": "ROLEMESH_ADVERTISE_URL"}
    # one variable alone overrides one key alone
    only_id = load_config(path, {"ROLEMESH_NODE_ID": "gpu-node-8", "UNRELATED": "x"})
    assert (only_id.node_id, only_id.advertise_url) == ("gpu-node-8", "http://file.lan:8088")
    assert load_config(path, {}) == dataclasses.replace(c, node_id="from-file", advertise_url="http://file.lan:8088")


def test_load_config_reads_the_process_environment(write_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config("")
    assert load_config(path).node_id is None
    monkeypatch.setenv("ROLEMESH_NODE_ID", "gpu-node-9")
    assert load_config(path).node_id == "gpu-node-9"
    # parse_config applies only what it is given: the text alone by default
    assert parse_config("", "node.yaml").node_id is None
    assert parse_config("", "node.yaml", environ={"ROLEMESH_NODE_ID": "x-1"}).node_id == "x-1"


@pytest.mark.parametrize("var, value, problem", [
    ("ROLEMESH_NODE_ID", "gpu node", "node_id: expected up to 128 characters of letters, digits, '-', '_', '.', "
                                     "':' (from environment variable ROLEMESH_NODE_ID)"),
    ("ROLEMESH_NODE_ID", "", "node_id: expected a non-empty string, got string "
                             "(from environment variable ROLEMESH_NODE_ID)"),
    # Kubernetes leaves "$(POD_IP)" as it is when POD_IP is not defined before it
    ("ROLEMESH_ADVERTISE_URL", "http://$(POD_IP):8088", "advertise_url: expected an http:// or https:// URL, got "
                                                        "'http://$(POD_IP):8088' (from environment variable "
                                                        "ROLEMESH_ADVERTISE_URL)"),
    ("ROLEMESH_ADVERTISE_URL", "10.1.2.3:8088", "advertise_url: expected an http:// or https:// URL, got "
                                               "'10.1.2.3:8088' (from environment variable ROLEMESH_ADVERTISE_URL)"),
])
def test_bad_environment_value_is_a_config_error(write_config: Any, var: str, value: str, problem: str) -> None:
    path = write_config("listen_port: 9000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {var: value})
    assert str(info.value) == f"config error: {path}: {problem}"


def test_the_file_must_be_valid_under_an_override(write_config: Any) -> None:
    # the file also runs where the variable is not set: its own value is checked
    path = write_config("node_id: my node\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, HOST_ENV)
    assert str(info.value).startswith(f"config error: {path}: node_id: expected up to 128 characters")
    assert "environment" not in str(info.value)


def test_every_override_names_a_string_key() -> None:
    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    for var, key in ENV_OVERRIDES.items():
        assert var == "ROLEMESH_" + key.upper()
        assert fields[key].type in ("str | None", "str")  # an environment value is a string


def test_token_not_in_repr(write_config: Any) -> None:
    c = load_config(write_config("dispatcher_token: s3cr3t-t0ken\n"))
    assert c.dispatcher_token == "s3cr3t-t0ken"
    assert "s3cr3t" not in repr(c)


def test_frozen(write_config: Any) -> None:
    c = load_config(write_config(M))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.listen_port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.models["m"].path = Path("/elsewhere")  # type: ignore[misc]
    assert isinstance(c.models["m"].args, tuple) and isinstance(c.llama_server_extra_args, tuple)


def test_models_mapping_is_read_only(write_config: Any) -> None:
    c = load_config(write_config(M))
    with pytest.raises(TypeError):
        c.models["x"] = c.models["m"]  # type: ignore[index]
    with pytest.raises(TypeError):
        NodeConfig().models["x"] = c.models["m"]  # type: ignore[index]


# -- the shipped example and the reference


def _documented_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(NodeConfig) if f.name != "source"]


MODEL_KEYS = [f.name for f in dataclasses.fields(ModelSpec) if f.name != "name"]


def test_example_config_loads() -> None:
    c = load_config(REPO / "configs" / "node_agent.example.yaml")
    assert c.models, "the example shows at least one model"
    assert c.backend in ("auto", "cpu", "cuda")


def test_example_config_shows_every_key() -> None:
    text = (REPO / "configs" / "node_agent.example.yaml").read_text()
    for key in _documented_keys() + MODEL_KEYS:
        # set, or shown commented out ("# key: value")
        assert re.search(rf"^\s*(#\s*)?{key}:", text, re.MULTILINE), f"{key} missing from the example config"
    # every top-level key stands in a paragraph that opens with a comment
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(?:# )?([a-z_]+):", line)
        if match and match.group(1) in _documented_keys():
            j = i
            while j > 0 and lines[j - 1].strip():
                j -= 1
            assert lines[j].startswith("#") and j < i, f"{match.group(1)} has no comment above it"


def test_example_config_active_keys_are_known() -> None:
    data = yaml.safe_load((REPO / "configs" / "node_agent.example.yaml").read_text())
    assert set(data) <= set(_documented_keys())


def test_example_config_active_values_are_the_defaults() -> None:
    # the example says "active lines show the default" — keep it true
    c = load_config(REPO / "configs" / "node_agent.example.yaml")
    expected = dataclasses.replace(NodeConfig(), source=c.source, models=c.models)
    assert c == expected


def test_reference_defaults_block_is_the_defaults(tmp_path: Path) -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    block = text.split("An empty file is the same as:", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    path = tmp_path / "defaults.yaml"
    path.write_text(block)
    c = load_config(path)
    assert c == dataclasses.replace(NodeConfig(), source=str(path))
    assert set(yaml.safe_load(block)) | {"node_id", "state_dir", "log_dir", "advertise_url", "api_keys", "api_key_file",
                                         "llama_server_bin", "dispatcher_base_url", "dispatcher_token",
                                         "dispatcher_token_file"} == set(_documented_keys())


def test_reference_documents_every_key() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    for key in _documented_keys() + MODEL_KEYS:
        assert f"`{key}`" in text, f"{key} missing from docs/configuration.md"
    for flag in RESERVED_CHILD_FLAGS:
        assert f"`{flag}`" in text, f"reserved flag {flag} missing from docs/configuration.md"
    for var in ENV_OVERRIDES:
        assert f"`{var}`" in text, f"environment variable {var} missing from docs/configuration.md"
    assert "config error: FILE: key.path: problem" in text


# -- both ways to run stop with exit 2 and the one line


def _runners() -> list[Any]:
    return [
        pytest.param([str(BIN / "rolemesh-node-agent"), "--config"], id="rolemesh-node-agent"),
        pytest.param([str(BIN / "twistd"), "rolemesh-node", "--config"], id="twistd"),
        pytest.param([str(BIN / "twistd"), "-n", "rolemesh-node", "--config"], id="twistd-n"),
    ]


BAD_FILES = {
    "missing": (None, "(file): no such file"),
    "bad-yaml": ("listen_port: [1\n", "line 2, column 1: invalid YAML: expected ',' or ']', but got '<stream end>'"),
    "unknown-key": ("listen_prot: 1\n", "listen_prot: unknown key (see docs/configuration.md)"),
    "zero-timeout": ("request_timeout_s: 0\n", "request_timeout_s: must be a positive number of seconds, got 0"),
    "duplicate-model": (M + "  m:\n    path: n.gguf\n", "models.m: duplicate key (line 4); each key may appear once"),
    # found when the service is built, not when the YAML is read
    "token-file-missing": ("backend: cpu\ndispatcher_base_url: http://127.0.0.1:9\n"
                           "dispatcher_token_file: no-token.txt\n", None),
}


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def _assert_one_config_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr == expected + "\n", result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("runner", _runners())
def test_bad_config_exits_2_with_one_line(tmp_path: Path, runner: list[str], case: str) -> None:
    text, problem = BAD_FILES[case]
    if text is not None:
        (tmp_path / "bad.yaml").write_text(text)
    if problem is None:
        problem = f"dispatcher_token_file: cannot read {tmp_path / 'no-token.txt'}: No such file or directory"
    result = _run([*runner, "bad.yaml"], tmp_path)
    _assert_one_config_line(result, f"config error: bad.yaml: {problem}")
    assert not list(tmp_path.glob("*.pid")) and not (tmp_path / "twistd.pid").exists()


@pytest.mark.slow
@pytest.mark.parametrize("runner", [
    pytest.param(_runners()[0].values[0], id="rolemesh-node-agent"),
    pytest.param(_runners()[1].values[0], id="twistd"),
])
def test_bad_config_file_is_named_as_given(tmp_path: Path, runner: list[str]) -> None:
    (tmp_path / "bad.yaml").write_text("listen_port: 70000\n")
    result = _run([*runner, "./bad.yaml"], tmp_path)
    _assert_one_config_line(result, "config error: ./bad.yaml: listen_port: must be at most 65535, got 70000")


# -- the systemd unit


def _unit() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (REPO / "configs" / "rolemesh-node.service").read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_stops_children_through_the_agent() -> None:
    unit = _unit()
    assert unit["Type"] == ["simple"]
    assert unit["ExecStart"] == ["/opt/rolemesh-node/venv/bin/rolemesh-node-agent --config "
                                 "/etc/rolemesh-node/node.yaml"]
    assert unit["KillMode"] == ["mixed"]  # TERM to the agent only; it stops its children in order
    assert float(unit["TimeoutStopSec"][0]) > NodeConfig().llama_server_stop_grace_s + 5
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["2"]  # a config error is not retried
    assert unit["User"] and unit["User"] != ["root"]
    # hardening that would break GPU access must stay off
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute",
                "ProcSubset", "PrivateUsers"):
        assert key not in unit, key


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    import shutil

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (REPO / "configs" / "rolemesh-node.service").read_text()
    unit = tmp_path / "rolemesh-node.service"
    stand_in = shutil.which("true") or "/bin/true"  # verify checks that ExecStart exists
    unit.write_text(text.replace("/opt/rolemesh-node/venv/bin/rolemesh-node-agent", stand_in))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "rolemesh-node.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_a_config_object_refuses_more_in_flight_than_accepted() -> None:
    with pytest.raises(ValueError, match="exceeds max_pending"):
        NodeConfig(max_concurrent_requests_per_device=5, max_pending_requests_per_device=2)
    derived_again = dataclasses.replace(NodeConfig(), llama_server_parallel=4, max_concurrent_requests_per_device=None,
                                        max_pending_requests_per_device=None)
    assert (derived_again.max_concurrent_requests_per_device, derived_again.max_pending_requests_per_device) == (5, 6)
