"""The node's id: generated once and kept in ``state_dir``; never silently a new one per start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rolemesh_node.config import ConfigError, NodeConfig
from rolemesh_node.identity import node_id

REPO = Path(__file__).resolve().parent.parent


def test_generated_once_then_read_back(tmp_path: Path) -> None:
    config = NodeConfig(state_dir=tmp_path / "state")
    first = node_id(config)
    assert (tmp_path / "state" / "node_id").read_text().strip() == first
    assert node_id(config) == first


def test_a_read_only_state_dir_that_holds_the_id_keeps_working(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "node_id").write_text("kept-1234\n")
    directory.chmod(0o555)
    try:
        assert node_id(NodeConfig(state_dir=directory)) == "kept-1234"
    finally:
        directory.chmod(0o755)


def test_an_id_that_cannot_be_kept_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = NodeConfig(source="node.yaml", state_dir=blocker / "state")  # cannot be made, even by root
    with pytest.raises(ConfigError) as info:
        node_id(config)
    text = str(info.value)
    assert text.startswith("config error: node.yaml: state_dir: cannot write")
    assert "set node_id" in text and "\n" not in text


def test_an_id_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "state" / "node_id").mkdir(parents=True)  # unreadable as a file, even by root
    with pytest.raises(ConfigError, match="state_dir: cannot read"):
        node_id(NodeConfig(source="node.yaml", state_dir=tmp_path / "state"))


def test_a_configured_id_needs_no_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert node_id(NodeConfig(node_id="n1", state_dir=blocker / "state")) == "n1"


@pytest.mark.slow
def test_the_agent_refuses_to_start_with_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "node.yaml"
    config.write_text(f"backend: cpu\nlisten_port: 0\nstate_dir: {blocker / 'state'}\n")
    result = subprocess.run([sys.executable, "-m", "rolemesh_node.cli", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {config}: state_dir: cannot write")
