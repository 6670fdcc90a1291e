"""run_tool, as the backends rely on it: missing tool, exit status, timeout (even when the
tool leaves a grandchild holding its stdout), stdin closed."""

from __future__ import annotations

import shutil
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from rolemesh_node.devices.tools import ToolError, run_tool


def _script(tmp_path, body: str):
    path = tmp_path / "tool"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@pytest_twisted.inlineCallbacks
def test_missing_tool_fails_with_tool_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolError, match="not installed"):
        yield run_tool(reactor, ["no-such-tool", "--json"], 1.0)


@pytest_twisted.inlineCallbacks
def test_stdout_and_exit_status(tmp_path):
    ok = _script(tmp_path, "echo hello")
    assert (yield run_tool(reactor, [ok], 2.0)) == b"hello\n"
    bad = _script(tmp_path, "echo 'No devices were found' >&2; exit 6")
    with pytest.raises(ToolError, match="exit code 6 No devices were found"):
        yield run_tool(reactor, [bad], 2.0)


@pytest_twisted.inlineCallbacks
def test_timeout_does_not_wait_for_a_grandchild_holding_stdout(tmp_path):
    sleep = shutil.which("sleep")
    # the shell forks sleep (no exec): killing the shell leaves sleep with our pipe
    tool = _script(tmp_path, f"{sleep} 2\necho late")
    started = time.monotonic()
    with pytest.raises(ToolError, match="timed out"):
        yield run_tool(reactor, [tool], 0.2)
    assert time.monotonic() - started < 1.5


@pytest_twisted.inlineCallbacks
def test_stdin_is_closed(tmp_path):
    cat = shutil.which("cat")
    tool = _script(tmp_path, f"{cat}; echo done")  # a tool that reads stdin sees EOF at once
    assert (yield run_tool(reactor, [tool], 2.0)) == b"done\n"
