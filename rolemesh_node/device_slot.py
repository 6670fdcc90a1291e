"""One device: the supervision of its ``llama-server`` child, and the requests in flight on it.

Which request goes where, and when a device switches, is not decided here (see
:mod:`rolemesh_node.scheduler` and :mod:`rolemesh_node.coordinator`). A slot
does what it is told — :meth:`DeviceSlot.grant` a place to a request,
:meth:`DeviceSlot.switch_to` another model — and tells its listeners what
happened (``start``, ``ready``, ``failed``, ``crash``, ``released``,
``idle_unload``, ``stopped``).

Its child's life is an explicit state machine; each state holds its own data,
and :meth:`DeviceSlot._enter` is the one place where it changes::

    idle ──► starting ──► ready ◄──► draining
      ▲         │  ▲        │           │
      │         ▼  │        ▼           ▼
      ├────── failed ◄──(crash)──── stopping ──► starting (the next model)
      └─────────────────────────────────┘  (idle unload, agent stop)

* ``draining``: the child still serves its model but takes no new request; a
  switch waits there until its work in flight is done (it never kills it).
* ``failed``: the last start failed or the child crashed; no child runs. A
  model that fails ``crash_limit`` times within ``crash_window_s`` is in
  cooldown on this device for ``crash_cooldown_s`` (:mod:`rolemesh_node.crashes`).
* A model with ``ttl_s`` is stopped after that long without requests.
* A config reload or a model file changed on disk (:meth:`DeviceSlot.reconcile`):
  a child whose model was removed stops once its requests in flight are done
  (``draining`` → ``stopping`` → ``idle``); a *stale* one — its command line or
  its model file changed since it was spawned — is restarted the same way
  (``draining`` → ``stopping`` → ``starting``). Such a drain is *forced*: the
  scheduler cannot take it back, only point it at another model.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Union

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .childlog import DeviceLog
from .config import ModelSpec, NodeConfig
from .crashes import CrashTracker
from .devices.base import Backend, DeviceRef
from .liveness import Liveness
from .llama_server import (
    ChildStartError,
    ChildState,
    ExitInfo,
    LlamaServerChild,
    death_signal_prefix,
    free_port,
)
from .snapshot import Cooldown, DeviceSnapshot, Phase

log = Logger()

PORT_ATTEMPTS = 3


class ModelCoolingDown(ChildStartError):
    """The model failed too often on this device and is refused for a while."""


class SlotError(Exception):
    """A slot was asked for something its state does not allow (a bug in the caller)."""


def child_argv(bin_path: str, model: ModelSpec, port: int, config: NodeConfig,
               backend: Backend, device: DeviceRef) -> list[str]:
    """The command line of a child: agent-owned flags first, operator args last."""
    argv = [*death_signal_prefix(), bin_path,
            "--host", "127.0.0.1", "--port", str(port),
            "-m", str(model.path), "--alias", model.name,
            "-np", str(config.llama_server_parallel), "--no-webui"]
    if model.ctx_size is not None:
        argv += ["-c", str(model.ctx_size)]
    if model.embedding:
        argv += ["--embeddings", "--pooling", "mean"]
    argv += backend.child_args(device)
    argv += config.llama_server_extra_args
    argv += model.args
    return argv


# ---------------------------------------------------------------- the states


@dataclass(slots=True)
class Idle:
    phase = Phase.IDLE
    model = None


@dataclass(slots=True)
class Starting:
    model: str
    began: float  # reactor seconds, when the spawn began (the old child already stopped)
    child: LlamaServerChild | None = None
    phase = Phase.STARTING


@dataclass(slots=True)
class Ready:
    model: str
    child: LlamaServerChild
    phase = Phase.READY


@dataclass(slots=True)
class Draining:
    model: str
    child: LlamaServerChild
    #: what follows the drain: a switch to this model; the same model again (a
    #: restart); None (a removed model: the child stops, the slot is idle)
    next_model: str | None
    #: a reload's retire or restart, not a scheduler's switch: never resumed
    forced: bool = False
    phase = Phase.DRAINING


@dataclass(slots=True)
class Stopping:
    model: str
    child: LlamaServerChild
    next_model: str | None  # started once the child has exited
    restart: bool = False  # a restart of the same model (reconcile): started again from idle
    phase = Phase.STOPPING


@dataclass(slots=True)
class Failed:
    model: str
    error: str
    phase = Phase.FAILED


State = Union[Idle, Starting, Ready, Draining, Stopping, Failed]

#: every transition a slot may make
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.STARTING}),
    Phase.STARTING: frozenset({Phase.STARTING, Phase.READY, Phase.FAILED, Phase.IDLE}),
    Phase.READY: frozenset({Phase.DRAINING, Phase.STOPPING, Phase.FAILED}),
    Phase.DRAINING: frozenset({Phase.READY, Phase.STOPPING, Phase.FAILED}),
    Phase.STOPPING: frozenset({Phase.IDLE, Phase.STARTING}),
    Phase.FAILED: frozenset({Phase.STARTING, Phase.IDLE}),
}


class Lease:
    """A request's place on a device. ``release`` is idempotent.

    A lease is *running* while it is among the device's first
    ``llama_server_parallel`` unreleased leases: the child has a slot for it.
    The others (``max_concurrent_requests_per_device`` may allow one more)
    wait inside the child; :meth:`when_running` tells when their turn comes,
    so a request's timeout does not count the time spent behind another.
    """

    __slots__ = ("slot", "child", "model", "released", "running", "running_at", "_on_running")

    def __init__(self, slot: "DeviceSlot", child: LlamaServerChild, model: str) -> None:
        self.slot = slot
        self.child = child
        self.model = model
        self.released = False
        self.running = False
        self.running_at: float | None = None
        self._on_running: Callable[[], None] | None = None

    @property
    def port(self) -> int:
        return self.child.port

    def progress_at(self) -> float | None:
        """When its child last showed progress (reactor seconds; None: not watched)."""
        return self.slot._progress_at(self.child)

    def when_running(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` now if running, else once it is (never after release)."""
        if self.released:
            return
        if self.running:
            fn()
        else:
            self._on_running = fn

    def _start_running(self, now: float) -> None:
        self.running = True
        self.running_at = now
        fn, self._on_running = self._on_running, None
        if fn is not None:
            fn()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._on_running = None
            self.slot._release(self)


class DeviceSlot:
    """The supervisor of one device's child."""

    def __init__(
        self,
        *,
        device: DeviceRef,
        backend: Backend,
        config: NodeConfig,
        reactor: Any,
        http: Any,
        bin_path: Callable[[], str],
        base_env: dict[str, str] | None = None,
        child_factory: Callable[..., LlamaServerChild] = LlamaServerChild,
        port_picker: Callable[[], int] = free_port,
        listeners: list[Callable[[str, dict[str, Any]], None]] | None = None,
        file_version: Callable[[str], Any] = lambda model: None,
    ) -> None:
        self.device = device
        self._child_factory = child_factory
        self._port_picker = port_picker
        self.backend = backend
        self.config = config
        self.reactor = reactor
        self.http = http
        self._bin_path = bin_path
        self._file_version = file_version
        #: the current child's command line and model file version, as spawned (see stale())
        self._spawned: tuple[list[str], Any] | None = None
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.max_pending = config.max_pending_requests_per_device
        self.capacity = config.max_concurrent_requests_per_device
        self.crashes = CrashTracker(reactor, config.crash_limit, config.crash_window_s,
                                    config.crash_cooldown_s)
        #: every child's output, across restarts (and in a file under log_dir)
        self.output = DeviceLog.for_device(device.id, config)
        self._state: State = Idle()
        self.last_child: LlamaServerChild | None = None
        self.leases: collections.deque[Lease] = collections.deque()  # in flight, in grant order
        self._running = 0  # how many leases at the front of ``leases`` are running (always a prefix)
        self._liveness: Liveness | None = None  # on the child that serves, while ready or draining
        self._watched: LlamaServerChild | None = None  # that child
        self.last_exit: str | None = None
        self.last_error: str | None = None
        self.starts = 0
        self.crash_count = 0
        self.switches = 0
        self.last_switch_s: float | None = None
        self.last_switch_at: float | None = None
        self.idle_since: float | None = None  # ready with nothing in flight since (reactor seconds)
        # since the last grant: requests that finished here, requests for other models that arrived
        self._done_since_grant = 0
        self._others_since_grant = 0
        self._ready_waiters: list[tuple[str, Deferred[LlamaServerChild]]] = []
        self._idle_call: Any = None
        self._stopping_all = False
        self._stopped: Deferred[Any] | None = None
        # shared with the node: a listener added later is heard too
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = listeners if listeners is not None else []

    # ------------------------------------------------------------ state

    @property
    def id(self) -> str:
        return self.device.id

    @property
    def state(self) -> State:
        return self._state

    @property
    def phase(self) -> Phase:
        return self._state.phase

    @property
    def model(self) -> str | None:
        return self._state.model

    @property
    def child(self) -> LlamaServerChild | None:
        """The child of the current state (None when idle or failed)."""
        return getattr(self._state, "child", None)

    @property
    def destined(self) -> str | None:
        state = self._state
        if isinstance(state, (Starting, Ready)):
            return state.model
        if isinstance(state, (Draining, Stopping)):
            return state.next_model
        return None

    @property
    def inflight(self) -> int:
        return len(self.leases)

    def _enter(self, new: State) -> None:
        """The one place where the state changes."""
        old = self._state
        if new.phase not in TRANSITIONS[old.phase]:
            raise SlotError(f"device {self.id}: {old.phase.value} -> {new.phase.value} is not a transition")
        self._state = new
        self._watch(new.child if isinstance(new, (Ready, Draining)) else None)
        self.idle_since = self.reactor.seconds() if isinstance(new, Ready) and not self.leases else None
        if isinstance(new, Failed):
            self.last_error = new.error
        elif isinstance(new, Ready):
            self.last_error = None
        if not isinstance(new, Ready):
            self._cancel_idle()

    # ------------------------------------------------------------ requests

    def grant(self, model: str) -> Lease:
        """A place for one request for ``model``: the child must be ready for it, with room."""
        state = self._state
        if not isinstance(state, Ready) or state.model != model or self.inflight >= self.capacity:
            raise SlotError(f"device {self.id} cannot take a request for {model} now "
                            f"({state.phase.value} {state.model}, {self.inflight} in flight)")
        self._cancel_idle()
        self.idle_since = None
        self._done_since_grant = self._others_since_grant = 0
        lease = Lease(self, state.child, model)
        self.leases.append(lease)
        self._mark_running()
        if self._liveness is not None:
            self._liveness.busy()
        return lease

    def _mark_running(self) -> None:
        """The first ``llama_server_parallel`` leases are running: start those that just moved up.

        The running leases are a prefix of ``leases`` (grant order, and a lease
        leaves from wherever it is), so this looks only past the prefix: O(1)
        per grant or release, whatever the number of slots."""
        leases, parallel = self.leases, self.config.llama_server_parallel
        now = None
        while self._running < min(parallel, len(leases)):  # (a lease's callbacks may release leases)
            lease = leases[self._running]
            self._running += 1
            if now is None:
                now = self.reactor.seconds()
            lease._start_running(now)

    def _release(self, lease: Lease) -> None:
        if lease.running:
            self._running -= 1
        self.leases.remove(lease)
        self._done_since_grant += 1
        self._mark_running()
        state = self._state
        if isinstance(state, Draining) and state.forced and not self.leases:
            self._finish_drain(state)
        if not self.leases and self._liveness is not None:
            self._liveness.idle()
        if not self.leases and isinstance(self._state, Ready):
            self.idle_since = self.reactor.seconds()
        held = None if lease.running_at is None else self.reactor.seconds() - lease.running_at
        self._emit("released", model=lease.model, seconds=held, drained=self.inflight == 0)
        if self.inflight == 0 and isinstance(self._state, Ready):
            self._schedule_idle()

    def note_arrival(self, model: str) -> None:
        """A request for ``model`` arrived at the node (the scheduler's view of who moved on)."""
        if model != self._state.model:
            self._others_since_grant += 1

    # ------------------------------------------------------------ switching

    def switch_to(self, model: ModelSpec) -> None:
        """Serve ``model``: at once when free; after the work in flight when busy (draining)."""
        state = self._state
        if isinstance(state, Draining) and state.forced:
            if model.name != state.model:
                state.next_model = model.name  # after the drain: that model instead
            return
        if isinstance(state, (Ready, Draining)):
            if state.model == model.name:
                if isinstance(state, Draining):
                    self._enter(Ready(state.model, state.child))
                return
            if self.inflight:
                self._enter(Draining(state.model, state.child, model.name))
                return
        elif not isinstance(state, (Idle, Failed)):
            raise SlotError(f"device {self.id}: cannot switch to {model.name} while {state.phase.value}")
        if self._stopping_all:
            return
        self._switch(model).addErrback(self._switch_crashed, model.name)

    def ensure_server(self, model: ModelSpec) -> Deferred[LlamaServerChild]:
        """Fires once this device's child serves ``model`` and is ready (tools and tests)."""
        state = self._state
        if isinstance(state, Ready) and state.model == model.name:
            return succeed(state.child)
        if self.crashes.cooldown(model.name) is not None:
            return fail(self._cooldown_error(model.name))
        d: Deferred[LlamaServerChild] = Deferred()
        self._ready_waiters.append((model.name, d))
        if not (isinstance(state, Starting) and state.model == model.name):
            self.switch_to(model)
        return d

    def _switch_crashed(self, failure: Failure, model: str) -> None:
        log.failure("device {device}: switching to {model} failed unexpectedly", failure, device=self.id,
                    model=model)

    @inlineCallbacks
    def _switch(self, model: ModelSpec) -> Any:
        began = self.reactor.seconds()
        # What can be known without a spawn is checked before the old child is stopped.
        if self.crashes.cooldown(model.name) is not None:
            self._start_failed(model.name, self._cooldown_error(model.name), count=False)
            return
        if not model.available():
            error = ChildStartError(self.id, model.name, f"model file {model.path} is missing or unreadable")
            self._start_failed(model.name, error, count=False)  # not a crash: no cooldown once it is back
            return
        state = self._state
        if isinstance(state, (Ready, Draining)):
            log.info("device {device}: switching {old} -> {new}", device=self.id, old=state.model,
                     new=model.name)
            self._enter(Stopping(state.model, state.child, model.name))
            yield state.child.stop(self.config.llama_server_stop_grace_s)
        if self._stopping_all:
            self._enter(Idle())
            self._fire_waiters(model.name, Failure(ChildStartError(self.id, model.name, "the agent is stopping")))
            return
        spec = self.config.models.get(model.name)
        if spec is None:  # removed by a reload while the old child stopped
            if not isinstance(self._state, Idle):
                self._enter(Idle())
            self._emit("stopped", model=model.name)
            self._fire_waiters(model.name, Failure(ChildStartError(self.id, model.name, "the model was removed")))
            return
        model = spec  # as the config has it now
        if self.last_child is not None and self.last_child.model != model.name:
            self.switches += 1
        error: ChildStartError | None = None
        for _attempt in range(PORT_ATTEMPTS):
            spawn_at = self.reactor.seconds()
            self._enter(Starting(model.name, spawn_at))
            try:
                child = self._spawn(model)
            except ChildStartError as exc:
                error = exc
                break
            try:
                yield child.start()
            except ChildStartError as exc:
                error = exc
                if child.state is not ChildState.EXITED:
                    yield child.stop(self.config.llama_server_stop_grace_s)
                if exc.port_in_use and not self._stopping_all:
                    log.warn("device {device}: port {port} taken, retrying on another", device=self.id,
                             port=child.port)
                    continue
                break
            else:
                now = self.reactor.seconds()
                self.last_switch_s = now - began
                self.last_switch_at = time.time()
                self._enter(Ready(model.name, child))
                self._emit("ready", model=model.name, seconds=now - spawn_at, switch_s=self.last_switch_s)
                self._fire_waiters(model.name, child)
                if model.name not in self.config.models:
                    self.reconcile()  # removed while it started
                elif not self.leases:
                    self._schedule_idle()
                return
        assert error is not None
        if self._stopping_all:
            self._enter(Idle())
            self._fire_waiters(model.name, Failure(error))
        else:
            self._start_failed(model.name, error)

    def _spawn(self, model: ModelSpec) -> LlamaServerChild:
        port = self._port_picker()
        try:
            bin_path = self._bin_path()
        except Exception as exc:
            raise ChildStartError(self.id, model.name, str(exc)) from exc
        argv = child_argv(bin_path, model, port, self.config, self.backend, self.device)
        child = self._child_factory(
            reactor=self.reactor, http=self.http, device_id=self.id, model=model.name, argv=argv,
            env=self.backend.child_env(self.device, self.base_env), port=port,
            probe_interval_s=self.config.llama_server_probe_interval_s,
            startup_timeout_s=self.config.llama_server_startup_timeout_s,
            on_exit=self._child_exited, log_output=self.config.log_level == "debug")
        child.output = self.output
        assert isinstance(self._state, Starting)
        self._state.child = child
        self._spawned = (argv, self._file_version(model.name))
        self.last_child = child
        self.starts += 1
        self._emit("start", model=model.name)
        return child

    def _start_failed(self, model: str, error: ChildStartError, count: bool = True) -> None:
        """A start of ``model`` failed (a spawn that failed leaves the slot failed; a
        refusal before any spawn — cooldown, missing file — leaves it as it was)."""
        if isinstance(self._state, Starting):
            self._enter(Failed(model, str(error)))
        else:
            self.last_error = str(error)
        self._emit("failed", model=model, reason=error.reason, error=error)
        if count:
            self._count_failure(model, error.reason)
        self._fire_waiters(model, Failure(error))

    def _fire_waiters(self, model: str, result: Any) -> None:
        keep, fire = [], []
        for name, d in self._ready_waiters:
            (fire if name == model else keep).append(d)
        self._ready_waiters = keep
        for d in fire:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    # ------------------------------------------------------------ failures

    def _count_failure(self, model: str, reason: str) -> None:
        """One failure (failed start or crash) towards the model's crash cooldown."""
        cooldown = self.crashes.record(model, reason)
        if cooldown is not None:
            log.error("device {device}: model {model} in cooldown for {seconds:g}s: {reason}",
                      device=self.id, model=model, seconds=self.config.crash_cooldown_s,
                      reason=cooldown.reason)

    def _cooldown_error(self, model: str) -> ModelCoolingDown:
        cooldown = self.crashes.cooldown(model)
        assert cooldown is not None
        left = max(0.0, cooldown.until - self.reactor.seconds())
        return ModelCoolingDown(self.id, model, f"in crash cooldown for another {left:.0f}s "
                                                f"({cooldown.reason})")

    def _child_exited(self, child: LlamaServerChild, info: ExitInfo) -> None:
        self.last_exit = f"{child.model}: {info.describe()}" + ("" if info.expected else " (unexpected)")
        state = self._state
        if getattr(state, "child", None) is not child:
            return
        if isinstance(state, Stopping) and state.restart:
            self._restart_stopped(state)
            return
        if isinstance(state, Stopping) and state.next_model is None:
            self._enter(Idle())
            self._emit("stopped", model=child.model)
            if self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        if info.expected or not isinstance(state, (Ready, Draining)):
            return  # a stop or a failed start: the switch in progress goes on
        # It was serving: a crash (its requests in flight fail on their own connections).
        self.crash_count += 1
        tail = " / ".join(list(child.tail)[-3:])
        if child.hung_reason:
            error = f"{child.model} was unresponsive ({child.hung_reason}) and was killed"
        else:
            error = f"{child.model} crashed: {info.describe()}; last stderr: {tail}"
        self._enter(Failed(child.model, error))
        self._emit("crash", model=child.model)
        self._count_failure(child.model, info.describe())

    # ------------------------------------------------------------ liveness

    def _watch(self, child: LlamaServerChild | None) -> None:
        """Keep a :class:`~rolemesh_node.liveness.Liveness` on the child that serves (ready or draining)."""
        if self._watched is child:
            return
        if self._liveness is not None:
            self._liveness.stop()
        self._liveness, self._watched = None, child
        if child is None:
            return
        config = self.config
        self._liveness = Liveness(
            clock=self.reactor, http=self.http, port=child.port, interval_s=config.liveness_interval_s,
            timeout_s=config.liveness_timeout_s, stall_s=config.request_timeout_s,
            on_hung=lambda reason: self.child_unresponsive(child, reason), name=f"{self.id} {child.model}")
        if self.leases:
            self._liveness.busy()

    def _progress_at(self, child: LlamaServerChild) -> float | None:
        if self._liveness is None or self._watched is not child:
            return None
        return self._liveness.progress_at

    def suspect(self, child: LlamaServerChild) -> None:
        """A request ran out of time on ``child``: check its liveness now (it is replaced if hung)."""
        if self._liveness is not None and self._watched is child:
            self._liveness.suspect()

    def child_unresponsive(self, child: LlamaServerChild, reason: str) -> None:
        """``child`` failed its liveness check: take it for hung and replace it.

        It is SIGKILLed (SIGTERM would wait behind a SIGSTOP); its exit is then
        handled as a crash (it counts towards the crash cooldown), so the next
        request starts a fresh child. A request that merely runs long never
        gets here (see :mod:`rolemesh_node.liveness`).
        """
        if child is not self.child or child.state is not ChildState.READY:
            return
        log.error("device {device}: llama-server pid {pid} ({model}) is unresponsive ({reason}); killing it",
                  device=self.id, pid=child.pid, model=child.model, reason=reason)
        child.hung_reason = reason
        child.kill()

    # ----------------------------------------------------------- idle TTL

    def _schedule_idle(self) -> None:
        state = self._state
        if not isinstance(state, Ready):
            return
        spec = self.config.models.get(state.model)
        self._cancel_idle()
        if spec is None or spec.ttl_s is None:
            return
        idle_for = 0.0 if self.idle_since is None else self.reactor.seconds() - self.idle_since
        self._idle_call = self.reactor.callLater(max(0.0, spec.ttl_s - idle_for), self._idle_unload)

    def _cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _idle_unload(self) -> None:
        self._idle_call = None
        state = self._state
        if self.leases or not isinstance(state, Ready):
            return
        log.info("device {device}: {model} idle for its ttl_s, stopping it", device=self.id, model=state.model)
        self._emit("idle_unload", model=state.model)
        self._enter(Stopping(state.model, state.child, None))
        state.child.stop(self.config.llama_server_stop_grace_s).addErrback(
            lambda f: log.failure("device {device}: idle stop failed", f, device=self.id))

    # ----------------------------------------------------------- reload

    def apply_config(self, config: NodeConfig) -> None:
        """A reloaded config: limits apply to the next grant and the next spawn, ``ttl_s``
        at once. The child itself is left alone: see :meth:`reconcile`."""
        self.config = config
        self.max_pending = config.max_pending_requests_per_device
        self.capacity = config.max_concurrent_requests_per_device
        self.crashes.limit = config.crash_limit
        self.crashes.window_s = config.crash_window_s
        self.crashes.cooldown_s = config.crash_cooldown_s
        if isinstance(self._state, Ready) and not self.leases:
            self._schedule_idle()
        elif not isinstance(self._state, Ready):
            self._cancel_idle()

    def stale(self) -> bool:
        """Whether the child is out of line with the config: its model was removed, or its
        command line (``path``, ``args``, ``ctx_size``, ``embedding``, the child settings) or
        its model file changed since it was spawned."""
        child = self.child
        if child is None or self._spawned is None:
            return False
        spec = self.config.models.get(child.model)
        if spec is None:
            return True
        argv, version = self._spawned
        try:
            bin_path = self._bin_path()
        except Exception:
            return False  # no binary to restart it with: keep it (the node reports the binary missing)
        return (argv != child_argv(bin_path, spec, child.port, self.config, self.backend, self.device)
                or version != self._file_version(spec.name))

    @property
    def restarting(self) -> bool:
        """Draining or stopping for a restart of its own model (see :meth:`reconcile`)."""
        state = self._state
        if isinstance(state, Draining):
            return state.forced and state.next_model == state.model
        return isinstance(state, Stopping) and state.restart

    def reconcile(self, restart: bool = True) -> None:
        """Bring the child in line with the config. A child whose model was removed stops once
        its requests in flight are done; with ``restart``, a :meth:`stale` one is restarted then.
        A child in line with the config is untouched."""
        if self._stopping_all:
            return
        state = self._state
        if isinstance(state, Draining):
            if state.next_model is not None and state.next_model not in self.config.models:
                state.next_model, state.forced = None, True
            if state.model not in self.config.models:
                state.forced = True  # nothing to resume
            if state.forced and not self.leases:
                self._finish_drain(state)
            return
        if not isinstance(state, Ready) or not self.stale():
            return
        removed = state.model not in self.config.models
        if not (removed or restart):
            return
        next_model = None if removed else state.model
        if self.leases:
            log.info("device {device}: {model} {what} once its {count} request(s) in flight are done",
                     device=self.id, model=state.model, count=len(self.leases),
                     what="stops (removed)" if removed else "restarts (changed)")
            self._enter(Draining(state.model, state.child, next_model, forced=True))
        else:
            self._stop_for_reload(state.model, state.child, next_model)

    def _finish_drain(self, state: Draining) -> None:
        """A forced drain is done: stop (removed), restart (changed), or switch (the scheduler's choice since)."""
        if state.next_model is None or state.next_model == state.model:
            self._stop_for_reload(state.model, state.child, state.next_model)
        else:
            self._switch(self.config.models[state.next_model]).addErrback(self._switch_crashed, state.next_model)

    def _stop_for_reload(self, model: str, child: LlamaServerChild, next_model: str | None) -> None:
        log.info("device {device}: {what} {model} (pid {pid})", device=self.id, model=model, pid=child.pid,
                 what="stopping removed model" if next_model is None else "restarting changed model")
        self._enter(Stopping(model, child, next_model, restart=next_model is not None))
        child.stop(self.config.llama_server_stop_grace_s).addErrback(
            lambda f: log.failure("device {device}: stopping the child failed", f, device=self.id))

    def _restart_stopped(self, state: Stopping) -> None:
        """The child of a restart has exited: start its model again, as the config has it now."""
        self._enter(Idle())
        spec = self.config.models.get(state.model)
        if spec is None or self._stopping_all:
            self._emit("stopped", model=state.model)
            if self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        self.switch_to(spec)

    # -------------------------------------------------------------- stop

    def stop(self) -> Deferred[Any]:
        """Stop the child (and any start in progress); fires when it has exited."""
        self._stopping_all = True
        self._cancel_idle()
        state = self._state
        child = getattr(state, "child", None)
        if child is None or child.state is ChildState.EXITED:
            return succeed(None)
        if isinstance(state, (Ready, Draining)):
            self._enter(Stopping(state.model, child, None))
        return child.stop(self.config.llama_server_stop_grace_s)

    # ---------------------------------------------------------- reporting

    def _emit(self, event: str, **fields: Any) -> None:
        for listener in self.listeners:
            listener(event, {"device": self.id, **fields})

    def snapshot(self, *, waiting: int = 0, free_memory_bytes: int | None = None,
                 loaded_model_bytes: int | None = None) -> DeviceSnapshot:
        state = self._state
        child = getattr(state, "child", None)
        shown = child if child is not None else self.last_child
        now_unix, now = time.time(), self.reactor.seconds()
        cooldowns = tuple(Cooldown(c.model, now_unix + (c.until - now), c.reason) for c in self.crashes.active())
        return DeviceSnapshot(
            device_id=self.id,
            index=self.device.index,
            phase=state.phase,
            model=state.model,
            next_model=getattr(state, "next_model", None),
            in_flight=len(self.leases),
            capacity=self.capacity,
            slots=self.config.llama_server_parallel,
            max_pending=self.max_pending,
            free_memory_bytes=free_memory_bytes,
            loaded_model_bytes=loaded_model_bytes,
            cooldown_models=frozenset(c.model for c in cooldowns),
            idle_since=self.idle_since,
            clients_left=self._done_since_grant > 0 and self._others_since_grant >= self._done_since_grant,
            waiting=waiting,
            port=None if child is None else child.port,
            pid=None if child is None or child.state is ChildState.EXITED else child.pid,
            started_at=None if shown is None else shown.started_at,
            ready_at=None if shown is None else shown.ready_at,
            starts=self.starts,
            crashes=self.crash_count,
            switches=self.switches,
            last_switch_s=self.last_switch_s,
            last_switch_at=self.last_switch_at,
            last_exit=self.last_exit,
            last_error=self.last_error,
            stderr_tail=() if shown is None else tuple(list(shown.tail)[-10:]),
            cooldowns=cooldowns,
        )
