"""Run an external tool (``nvidia-smi``, ``amd-smi``…) off the reactor thread.

``run_tool`` spawns the program as a child process through the reactor, so the
reactor never waits on it, and kills it when it outlives its timeout. It fails
with :class:`ToolError` — never a raw traceback — when the program is missing,
exits non-zero, or times out.
"""

from __future__ import annotations

import os
import shutil
from typing import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

MAX_OUTPUT_BYTES = 8 * 1024 * 1024


class ToolError(Exception):
    """An external tool could not give an answer."""

    def __init__(self, tool: str, reason: str) -> None:
        super().__init__(f"{tool}: {reason}")
        self.tool = tool
        self.reason = reason


class _Collect(ProcessProtocol):
    def __init__(self, tool: str, clock: IReactorTime, timeout_s: float) -> None:
        self.tool = tool
        self.done: Deferred[bytes] = Deferred()
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.size = 0
        self.timed_out = False
        self._timer = clock.callLater(timeout_s, self._timeout)

    def connectionMade(self) -> None:
        self.transport.closeStdin()  # a tool that reads stdin sees EOF, never waits

    def outReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= MAX_OUTPUT_BYTES:
            self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        if sum(len(e) for e in self.err) < 64 * 1024:
            self.err.append(data)

    def _timeout(self) -> None:
        # Fail now rather than in processEnded: that waits for every pipe to
        # close, and a grandchild the tool started (a shell script's `sleep`,
        # a helper daemon) can hold stdout open long after the tool is killed.
        self.timed_out = True
        try:
            self.transport.signalProcess("KILL")
        except Exception:  # already gone
            pass
        try:
            self.transport.loseConnection()  # close our ends of the pipes
        except Exception:
            pass
        if not self.done.called:
            self.done.errback(ToolError(self.tool, "timed out"))

    def processEnded(self, reason: Failure) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self.done.called:  # already failed by the timeout
            return
        if self.timed_out:
            self.done.errback(ToolError(self.tool, "timed out"))
        elif reason.check(ProcessDone):
            self.done.callback(b"".join(self.out))
        else:
            tail = b"".join(self.err).decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            code = getattr(reason.value, "exitCode", None)
            sig = getattr(reason.value, "signal", None)
            how = f"exit code {code}" if code is not None else f"signal {sig}"
            self.done.errback(ToolError(self.tool, f"{how} {tail[0]}".strip()))


def find_tool(name: str, path: str | None = None) -> str | None:
    """The absolute path of ``name`` on ``path`` (default ``$PATH``), or None."""
    return shutil.which(name, path=path)


def run_tool(
    reactor: IReactorProcess, argv: Sequence[str], timeout_s: float,
    env: dict[str, str] | None = None,
) -> Deferred[bytes]:
    """Run ``argv``; fire with its stdout, or fail with :class:`ToolError`."""
    tool = argv[0]
    exe = tool if os.sep in tool else find_tool(tool)
    if exe is None or not os.access(exe, os.X_OK):
        d: Deferred[bytes] = Deferred()
        d.errback(ToolError(tool, "not installed (not found on PATH)"))
        return d
    proto = _Collect(os.path.basename(tool), reactor, timeout_s)  # type: ignore[arg-type]
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("LC_ALL", "C")
    try:
        reactor.spawnProcess(proto, exe, [exe, *argv[1:]], env=child_env, childFDs={0: "w", 1: "r", 2: "r"})
    except Exception as exc:  # e.g. OSError from fork: fail the Deferred, leak no timer
        if proto._timer.active():
            proto._timer.cancel()
        if not proto.done.called:
            proto.done.errback(ToolError(os.path.basename(tool), f"cannot start: {exc}"))
    return proto.done


__all__ = ["ToolError", "find_tool", "run_tool"]
