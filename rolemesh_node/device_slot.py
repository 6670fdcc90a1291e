"""One device: its ``llama-server`` child, its request queue, its model switches.

:meth:`DeviceSlot.acquire` is how a request gets onto a device. It answers at
once with :class:`QueueFull` when in-flight plus waiting requests already reach
``max_pending``; otherwise the request waits FIFO. The head of the queue goes
when

* the child is running (or starting) its model and fewer than
  ``max_concurrent`` requests are in flight, or
* nothing is in flight: then the device switches to the head's model (stop
  the old child, start the new one) — requests behind it for the same model
  share that start.

Requests never overtake each other, so a model switch waits for the requests
already running on the old model to finish and is never starved.

:meth:`ensure_server` fires once the child serves the model and is ready;
concurrent calls for the same model share one start. A child that dies is
noticed from ``processExited``; the next request restarts it unless the model
has failed ``crash_limit`` times within ``crash_window_s`` (then it is in
cooldown here, see :mod:`rolemesh_node.crashes`).
"""

from __future__ import annotations

import collections
import enum
import itertools
import os
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredLock, fail, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import ModelSpec, NodeConfig
from .crashes import CrashTracker
from .devices.base import Backend, DeviceRef
from .llama_server import (
    ChildStartError,
    ChildState,
    ExitInfo,
    LlamaServerChild,
    death_signal_prefix,
    free_port,
)

log = Logger()

PORT_ATTEMPTS = 3


class SlotState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    CRASHED = "crashed"
    FAILED = "failed"


class QueueFull(Exception):
    """The device already holds ``limit`` requests (in flight + waiting)."""

    def __init__(self, device: str, limit: int) -> None:
        super().__init__(device, limit)
        self.device = device
        self.limit = limit

    def __str__(self) -> str:
        return f"device {self.device} is busy: {self.limit} requests in flight or waiting"


class ModelCoolingDown(ChildStartError):
    """The model failed too often on this device and is refused for a while."""


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


class Lease:
    """A request's hold on one place in a device's queue. ``release`` is idempotent.

    A lease is *running* while it is among the device's first
    ``llama_server_parallel`` unreleased leases: the child has a slot for it.
    The others (``max_concurrent_requests_per_device`` may allow one more)
    wait inside the child; :meth:`when_running` tells when their turn comes,
    so a request's timeout does not count the time spent behind another.
    """

    __slots__ = ("slot", "child", "released", "running", "_on_running")

    def __init__(self, slot: "DeviceSlot") -> None:
        self.slot = slot
        self.child: LlamaServerChild | None = None
        self.released = False
        self.running = False
        self._on_running: Callable[[], None] | None = None

    @property
    def port(self) -> int:
        assert self.child is not None
        return self.child.port

    def when_running(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` now if running, else once it is (never after release)."""
        if self.released:
            return
        if self.running:
            fn()
        else:
            self._on_running = fn

    def _start_running(self) -> None:
        self.running = True
        fn, self._on_running = self._on_running, None
        if fn is not None:
            fn()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._on_running = None
            self.slot._release(self)


class _Waiter:
    """One request waiting for (or holding) a place on a device."""

    __slots__ = ("model", "queue", "lease", "d")

    def __init__(self, model: ModelSpec, queue: collections.deque["_Waiter"]) -> None:
        self.model = model
        self.queue = queue
        self.lease: Lease | None = None
        self.d: Deferred[Lease] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[Lease]) -> None:
        # The client went away: while queued, leave the queue; while its
        # server starts, give the place back (the start goes on for others).
        if self.lease is None:
            if self in self.queue:
                self.queue.remove(self)
        else:
            self.lease.release()


class DeviceSlot:
    """The supervisor and queue of one device."""

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
    ) -> None:
        self.device = device
        self._child_factory = child_factory
        self._port_picker = port_picker
        self.backend = backend
        self.config = config
        self.reactor = reactor
        self.http = http
        self._bin_path = bin_path
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.max_pending = config.max_pending_requests_per_device
        self.max_concurrent = config.max_concurrent_requests_per_device
        self.crashes = CrashTracker(reactor, config.crash_limit, config.crash_window_s,
                                    config.crash_cooldown_s)
        self.child: LlamaServerChild | None = None
        self.target: str | None = None  # model running or being started
        self.state = SlotState.STOPPED
        self.leases: collections.deque[Lease] = collections.deque()  # in flight, in grant order
        self.queue: collections.deque[_Waiter] = collections.deque()
        self.last_exit: str | None = None
        self.last_error: str | None = None
        self.starts = 0
        self.crash_count = 0
        self.last_switch_s: float | None = None
        self._switch_lock = DeferredLock()
        self._starting: dict[str, list[Deferred[LlamaServerChild]]] = {}
        self._idle_call: Any = None
        self._stopping_all = False
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    @property
    def id(self) -> str:
        return self.device.id

    @property
    def inflight(self) -> int:
        return len(self.leases)

    @property
    def pending(self) -> int:
        return self.inflight + len(self.queue)

    # ------------------------------------------------------------- queue

    def acquire(self, model: ModelSpec) -> Deferred[Lease]:
        """A place on this device for one request for ``model``."""
        if self.pending >= self.max_pending:
            return fail(QueueFull(self.id, self.max_pending))
        cooldown = self.crashes.cooldown(model.name)
        if cooldown is not None:
            return fail(self._cooldown_error(model.name))
        self._cancel_idle()
        waiter = _Waiter(model, self.queue)
        self.queue.append(waiter)
        self._pump()
        return waiter.d

    def _pump(self) -> None:
        while self.queue and not self._stopping_all:
            head = self.queue[0]
            if self.inflight >= self.max_concurrent:
                return
            if self.inflight > 0 and self.target != head.model.name:
                return  # drain the running model before switching
            self.queue.popleft()
            head.lease = Lease(self)
            self.leases.append(head.lease)
            self._mark_running()
            self.ensure_server(head.model).addCallbacks(
                self._granted, self._refused, callbackArgs=(head,), errbackArgs=(head,))

    def _mark_running(self) -> None:
        for lease in list(itertools.islice(self.leases, self.config.llama_server_parallel)):
            if not lease.running and not lease.released:
                lease._start_running()

    @staticmethod
    def _granted(child: LlamaServerChild, waiter: _Waiter) -> None:
        assert waiter.lease is not None
        waiter.lease.child = child
        if not waiter.d.called:
            waiter.d.callback(waiter.lease)

    @staticmethod
    def _refused(failure: Any, waiter: _Waiter) -> None:
        assert waiter.lease is not None
        waiter.lease.release()
        if not waiter.d.called:
            waiter.d.errback(failure)

    def _release(self, lease: Lease) -> None:
        self.leases.remove(lease)
        self._mark_running()
        self._pump()
        if self.inflight == 0 and not self.queue:
            self._schedule_idle()

    # ------------------------------------------------------------ server

    def ensure_server(self, model: ModelSpec) -> Deferred[LlamaServerChild]:
        """Fires once this device's child serves ``model`` and is ready."""
        child = self.child
        if child is not None and child.model == model.name and child.state is ChildState.READY:
            return succeed(child)
        if self.crashes.cooldown(model.name) is not None:
            return fail(self._cooldown_error(model.name))
        d: Deferred[LlamaServerChild] = Deferred()
        waiters = self._starting.get(model.name)
        if waiters is not None:
            waiters.append(d)
            return d
        self._starting[model.name] = [d]
        self.target = model.name
        self._switch_lock.run(self._switch, model).addBoth(self._switched, model.name)
        return d

    def _switched(self, result: Any, model: str) -> None:
        if isinstance(result, Failure) and not result.check(ChildStartError):
            log.failure("device {device}: starting {model} failed unexpectedly", result, device=self.id,
                        model=model)
            self.state = SlotState.FAILED
            self.last_error = f"{model}: internal error: {result.getErrorMessage()}"
        waiters = self._starting.pop(model, [])
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    @inlineCallbacks
    def _switch(self, model: ModelSpec) -> Any:
        if self.child is not None and self.child.model == model.name and self.child.state is ChildState.READY:
            return self.child
        began = self.reactor.seconds()
        if self.child is not None and self.child.state is not ChildState.EXITED:
            log.info("device {device}: switching {old} -> {new}", device=self.id, old=self.child.model,
                     new=model.name)
            yield self._stop_child()
        if self._stopping_all:
            raise ChildStartError(self.id, model.name, "the agent is stopping")
        if not model.available():
            error = ChildStartError(self.id, model.name, f"model file {model.path} is missing or unreadable")
            self._failed(model.name, error, count=False)  # not a crash: no cooldown once it is back
            raise error
        self.target = model.name
        self.state = SlotState.STARTING
        error: ChildStartError | None = None
        for _attempt in range(PORT_ATTEMPTS):
            port = self._port_picker()
            try:
                bin_path = self._bin_path()
            except Exception as exc:
                error = ChildStartError(self.id, model.name, str(exc))
                break
            child = self._child_factory(
                reactor=self.reactor, http=self.http, device_id=self.id, model=model.name,
                argv=child_argv(bin_path, model, port, self.config, self.backend, self.device),
                env=self.backend.child_env(self.device, self.base_env), port=port,
                probe_interval_s=self.config.llama_server_probe_interval_s,
                startup_timeout_s=self.config.llama_server_startup_timeout_s,
                on_exit=self._child_exited, log_output=self.config.log_level == "debug")
            self.child = child
            self.starts += 1
            self._emit("start", model=model.name)
            try:
                yield child.start()
            except ChildStartError as exc:
                error = exc
                if child.state is not ChildState.EXITED:
                    yield child.stop(self.config.llama_server_stop_grace_s)
                if exc.port_in_use:
                    log.warn("device {device}: port {port} taken, retrying on another", device=self.id,
                             port=port)
                    continue
                break
            else:
                self.state = SlotState.READY
                self.last_error = None
                self.last_switch_s = self.reactor.seconds() - began
                self._emit("ready", model=model.name, seconds=self.last_switch_s)
                return child
        assert error is not None
        self._failed(model.name, error)
        raise error

    def _failed(self, model: str, error: ChildStartError, count: bool = True) -> None:
        self.state = SlotState.FAILED
        self.last_error = str(error)
        self._emit("failed", model=model, reason=error.reason)
        if count:
            self._count_failure(model, error.reason)

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
        if child is not self.child:
            return
        if info.expected:
            self.state = SlotState.STOPPED
            return
        if self.state is SlotState.READY:
            # It was serving: a crash. Startup failures are counted by _switch.
            self.state = SlotState.CRASHED
            self.crash_count += 1
            tail = " / ".join(list(child.tail)[-3:])
            if child.hung_reason:
                self.last_error = f"{child.model} was unresponsive ({child.hung_reason}) and was killed"
            else:
                self.last_error = f"{child.model} crashed: {info.describe()}; last stderr: {tail}"
            self._emit("crash", model=child.model)
            self._count_failure(child.model, info.describe())

    def child_unresponsive(self, child: LlamaServerChild, reason: str) -> None:
        """A request timed out on ``child``: take it for hung and replace it.

        It is SIGKILLed (SIGTERM would wait behind a SIGSTOP); its exit is then
        handled as a crash, so the next request starts a fresh child.
        """
        if child is not self.child or child.state is not ChildState.READY:
            return
        log.error("device {device}: llama-server pid {pid} ({model}) is unresponsive ({reason}); killing it",
                  device=self.id, pid=child.pid, model=child.model, reason=reason)
        child.hung_reason = reason
        child.kill()

    def _stop_child(self) -> Deferred[Any]:
        child = self.child
        if child is None or child.state is ChildState.EXITED:
            return succeed(None)
        self.state = SlotState.STOPPING
        return child.stop(self.config.llama_server_stop_grace_s)

    # ----------------------------------------------------------- idle TTL

    def _schedule_idle(self) -> None:
        child = self.child
        if child is None or child.state is not ChildState.READY:
            return
        ttl = self._ttl(child.model)
        if ttl is None:
            return
        self._cancel_idle()
        self._idle_call = self.reactor.callLater(ttl, self._idle_unload)

    def _ttl(self, model: str) -> float | None:
        spec = self.config.models.get(model)
        return None if spec is None else spec.ttl_s

    def _cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _idle_unload(self) -> None:
        self._idle_call = None
        if self.pending or self.child is None:
            return
        log.info("device {device}: {model} idle for its ttl_s, stopping it", device=self.id,
                 model=self.child.model)
        self.target = None
        self._emit("idle_unload", model=self.child.model)
        self._switch_lock.run(self._stop_child).addErrback(
            lambda f: log.failure("device {device}: idle stop failed", f, device=self.id))

    # -------------------------------------------------------------- stop

    def stop(self) -> Deferred[Any]:
        """Refuse queued requests and stop the child; fires when it has exited."""
        self._stopping_all = True
        self._cancel_idle()
        while self.queue:
            waiter = self.queue.popleft()
            waiter.d.errback(ChildStartError(self.id, waiter.model.name, "the agent is stopping"))
        return self._stop_child()

    # ---------------------------------------------------------- reporting

    def _emit(self, event: str, **fields: Any) -> None:
        for listener in self.listeners:
            listener(event, {"device": self.id, **fields})

    def snapshot(self) -> dict[str, Any]:
        child = self.child
        return {
            "state": self.state.value,
            "model": self.target,
            "port": None if child is None else child.port,
            "pid": None if child is None or child.state is ChildState.EXITED else child.pid,
            "started_at": None if child is None else child.started_at,
            "ready_at": None if child is None else child.ready_at,
            "in_flight": self.inflight,
            "waiting": len(self.queue),
            "max_pending": self.max_pending,
            "max_concurrent": self.max_concurrent,
            "starts": self.starts,
            "crashes": self.crash_count,
            "last_switch_s": self.last_switch_s,
            "last_exit": self.last_exit,
            "last_error": self.last_error,
            "stderr_tail": [] if child is None else list(child.tail)[-10:],
            "cooldowns": [
                {"model": c.model, "until": time.time() + (c.until - self.reactor.seconds()), "reason": c.reason}
                for c in self.crashes.active()
            ],
        }
