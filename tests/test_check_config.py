"""``rolemesh-node-agent --check-config FILE``: validate without starting anything.

Files that exist only where the node runs (key and token files, model files, a ``llama_server_bin`` path)
are checked when present and listed as "not checked here" when absent. The command line is run in a
subprocess from this checkout (``python -m rolemesh_node.cli``: the same ``main`` as the console script).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rolemesh_node.checkconfig import check_config
from rolemesh_node.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
KEY = "check-config-key-0123456789"


def node_yaml(directory: Path) -> str:
    return (
        "listen_host: 0.0.0.0\n"
        f"state_dir: {directory / 'state'}\n"
        f"api_key_file: {directory / 'secrets' / 'api_keys'}\n"
        "dispatcher_base_url: http://dispatcher.lan:8000\n"
        f"dispatcher_token_file: {directory / 'secrets' / 'dispatcher_token'}\n"
        f"llama_server_bin: {directory / 'bin' / 'llama-server'}\n"
        "models:\n"
        f"  chat: {{path: {directory / 'models' / 'chat.gguf'}}}\n"
        "  embed: {path: models/embed.gguf, embedding: true}\n")


def place_everything(directory: Path) -> None:
    """Put every file the config names where it says, valid."""
    (directory / "secrets").mkdir()
    (directory / "secrets" / "api_keys").write_text(f"# keys\n{KEY}\n")
    (directory / "secrets" / "dispatcher_token").write_text("t0ken\n")
    (directory / "bin").mkdir()
    (directory / "bin" / "llama-server").write_text("#!/bin/sh\nexit 0\n")
    (directory / "bin" / "llama-server").chmod(0o755)
    (directory / "models").mkdir()
    for name in ("chat", "embed"):
        (directory / "models" / f"{name}.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    code = ("import sys\nfrom rolemesh_node.cli import main\nrc = main(sys.argv[1:])\n"
            "assert 'twisted.internet.reactor' not in sys.modules, 'the reactor was imported'\n"
            "raise SystemExit(rc)\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env=base | {"PYTHONPATH": str(REPO)} | (env or {}))


# --------------------------------------------------------------------------
# the check itself


def test_absent_files_are_listed_not_checked(write_config: Any, tmp_path: Path) -> None:
    path = write_config(node_yaml(tmp_path))
    report = check_config(path, environ={})
    assert report.not_checked == (
        ("api_key_file", tmp_path / "secrets" / "api_keys"),
        ("dispatcher_token_file", tmp_path / "secrets" / "dispatcher_token"),
        ("llama_server_bin", tmp_path / "bin" / "llama-server"),
        ("models.chat.path", tmp_path / "models" / "chat.gguf"),
        ("models.embed.path", tmp_path / "models" / "embed.gguf"),
    )
    assert report.from_env == ()
    assert report.lines() == [
        f"{path}: config ok",
        f"{path}: api_key_file: not checked here: {tmp_path / 'secrets' / 'api_keys'} is absent",
        f"{path}: dispatcher_token_file: not checked here: {tmp_path / 'secrets' / 'dispatcher_token'} is absent",
        f"{path}: llama_server_bin: not checked here: {tmp_path / 'bin' / 'llama-server'} is absent",
        f"{path}: models.chat.path: not checked here: {tmp_path / 'models' / 'chat.gguf'} is absent",
        f"{path}: models.embed.path: not checked here: {tmp_path / 'models' / 'embed.gguf'} is absent",
    ]
    assert not (tmp_path / "state").exists()  # no node_id was generated: nothing ran


def test_present_files_are_checked(write_config: Any, tmp_path: Path) -> None:
    place_everything(tmp_path)
    report = check_config(write_config(node_yaml(tmp_path)), environ={"ROLEMESH_NODE_ID": "gpu-7"})
    assert report.not_checked == ()
    assert report.from_env == (("node_id", "ROLEMESH_NODE_ID"),)
    assert report.config.node_id == "gpu-7"
    assert report.lines()[1:] == [f"{report.config.source}: node_id: from environment variable ROLEMESH_NODE_ID"]


def test_a_bare_command_for_llama_server_bin_is_not_a_file_to_check(write_config: Any) -> None:
    report = check_config(write_config("llama_server_bin: llama-server-cuda\n"), environ={})
    assert report.not_checked == ()


def _break(tmp_path: Path, what: str) -> str:
    """Break one present file; return the expected ``key.path: problem``."""
    secrets, models = tmp_path / "secrets", tmp_path / "models"
    if what == "empty-key-file":
        (secrets / "api_keys").write_text("# no key yet\n")
        return f"api_key_file: {secrets / 'api_keys'} holds no key"
    if what == "empty-token-file":
        (secrets / "dispatcher_token").write_text("\n")
        return f"dispatcher_token_file: {secrets / 'dispatcher_token'} is empty"
    if what == "dangling-token-link":  # a mounted Secret is links; a broken one is not "absent"
        (secrets / "dispatcher_token").unlink()
        (secrets / "dispatcher_token").symlink_to(secrets / "..data" / "dispatcher_token")
        return f"dispatcher_token_file: cannot read {secrets / 'dispatcher_token'}: No such file or directory"
    if what == "bin-not-executable":
        (tmp_path / "bin" / "llama-server").chmod(0o644)
        return f"llama_server_bin: {tmp_path / 'bin' / 'llama-server'} is not an executable file"
    if what == "model-not-gguf":
        (models / "chat.gguf").write_text("<html>404 Not Found</html>")
        return f"models.chat.path: {models / 'chat.gguf'} is not a GGUF file (it does not start with 'GGUF')"
    if what == "model-empty":
        (models / "embed.gguf").write_bytes(b"")
        return f"models.embed.path: {models / 'embed.gguf'} is not a GGUF file (it does not start with 'GGUF')"
    if what == "model-is-directory":
        (models / "chat.gguf").unlink()
        (models / "chat.gguf").mkdir()
        return f"models.chat.path: {models / 'chat.gguf'} is a directory, not a GGUF file"
    raise AssertionError(what)


BROKEN = ["empty-key-file", "empty-token-file", "dangling-token-link", "bin-not-executable", "model-not-gguf",
          "model-empty", "model-is-directory"]


@pytest.mark.parametrize("what", BROKEN)
def test_a_present_file_that_the_node_could_not_use_is_an_error(write_config: Any, tmp_path: Path,
                                                                 what: str) -> None:
    place_everything(tmp_path)
    path = write_config(node_yaml(tmp_path))
    expected = _break(tmp_path, what)
    with pytest.raises(ConfigError) as info:
        check_config(path, environ={})
    assert str(info.value) == f"config error: {path}: {expected}"


def test_the_token_never_reaches_the_output(write_config: Any, tmp_path: Path) -> None:
    place_everything(tmp_path)
    (tmp_path / "secrets" / "dispatcher_token").write_text("s3cret token\n")  # two words: refused
    with pytest.raises(ConfigError) as info:
        check_config(write_config(node_yaml(tmp_path)), environ={})
    assert "s3cret" not in str(info.value)
    assert str(info.value).endswith("dispatcher_token_file: the token must be one word without spaces or "
                                    "control characters")


# --------------------------------------------------------------------------
# the command line


@pytest.mark.slow
def test_cli_valid_config_exits_0(tmp_path: Path) -> None:
    (tmp_path / "node.yaml").write_text(node_yaml(tmp_path))
    result = run_cli("--check-config", "node.yaml", cwd=tmp_path,
                     env={"ROLEMESH_ADVERTISE_URL": "http://10.0.0.7:8088"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "node.yaml: config ok"
    assert "node.yaml: advertise_url: from environment variable ROLEMESH_ADVERTISE_URL" in lines
    assert f"node.yaml: models.chat.path: not checked here: {tmp_path / 'models' / 'chat.gguf'} is absent" in lines
    assert len(lines) == 7
    assert not (tmp_path / "state").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case, text, env, expected", [
    ("missing", None, {}, "(file): no such file"),
    ("bad-key", "listen_prot: 1\n", {}, "listen_prot: unknown key (see docs/configuration.md)"),
    ("bad-env", "", {"ROLEMESH_ADVERTISE_URL": "http://$(POD_IP):8088"},
     "advertise_url: expected an http:// or https:// URL, got 'http://$(POD_IP):8088' "
     "(from environment variable ROLEMESH_ADVERTISE_URL)"),
    ("empty-key-file", "api_key_file: keys\n", {}, "api_key_file: {dir}/keys holds no key"),
])
def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path, case: str, text: str | None,
                                              env: dict[str, str], expected: str) -> None:
    if text is not None:
        (tmp_path / "node.yaml").write_text(text)
    (tmp_path / "keys").write_text("\n")
    result = run_cli("--check-config", "./node.yaml", cwd=tmp_path, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr == f"config error: ./node.yaml: {expected.format(dir=tmp_path)}\n"
    assert result.stdout == ""


@pytest.mark.slow
def test_cli_check_config_is_alone(tmp_path: Path) -> None:
    (tmp_path / "node.yaml").write_text("")
    result = run_cli("--check-config", "node.yaml", "--config", "node.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_log_dir_is_checked_when_present(write_config: Any, tmp_path: Path) -> None:
    absent = check_config(write_config(f"log_dir: {tmp_path / 'logs'}\n"))
    assert absent.not_checked == (("log_dir", tmp_path / "logs"),)
    assert not (tmp_path / "logs").exists()  # a check makes nothing
    (tmp_path / "logs").mkdir()
    assert check_config(write_config(f"log_dir: {tmp_path / 'logs'}\n")).not_checked == ()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"log_dir: .*a-file is not a directory"):
        check_config(write_config(f"log_dir: {tmp_path / 'a-file'}\n"))
