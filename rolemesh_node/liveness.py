"""Is a ready ``llama-server`` child alive, and is it getting on with its work?

A long request is not a hung child: llama-server sends a non-streamed answer's
headers only when the answer is complete, so "no headers yet" means "still
working". What tells the two apart is asked on other connections, while the
request runs:

* ``GET /health`` answers at once from llama-server's HTTP thread, however busy
  its slots are. No 200 within ``timeout_s``, ``FAILURES`` checks in a row:
  the child is hung (a SIGSTOPped child, a wedged process).
* ``GET /slots`` is answered by its main loop, between two batches: each
  processing slot's task, prompt tokens processed and tokens decoded. A
  change is *progress*. Work in flight and no progress for ``stall_s``: the
  child is hung too. No answer in time only means "no news" (a long batch);
  a child without a usable ``/slots`` (``--no-slots``, ``--api-key``) gives
  none: then only ``/health`` judges it, and the proxy times a request that
  has no headers yet from its turn alone (504 after ``request_timeout_s``).

A :class:`Liveness` watches one child while the device has work in flight
(:meth:`busy` / :meth:`idle`), one check at a time, every ``interval_s`` on
the clock it is given — a small state machine (resting, scheduled, checking,
stopped; ``TRANSITIONS``, ``Liveness._enter``); :meth:`suspect` asks for checks now even when idle,
until one passes (a request just timed out on it). ``progress_at`` is what
the proxy reads to know whether a request that has no headers yet is getting
anywhere. Verdicts go to ``on_hung(reason)`` once; the device slot kills the
child and replaces it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Union

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: consecutive failed /health checks that make a child hung
FAILURES = 2

#: /slots answered, but not with a list of slots: not there (404, 501: --no-slots) or not for us (401:
#: --api-key in the child's extra args). Then progress cannot be seen: only /health judges the child, and a
#: request without headers is timed from its turn alone.
UNSUPPORTED = "unsupported"


def slots_signature(doc: Any) -> tuple[Any, ...] | None:
    """What moves while a child works: per processing slot its task, prompt
    tokens processed and tokens decoded. None when ``doc`` is not a slot list.

    >>> slots_signature([{"id": 0, "is_processing": False},
    ...                  {"id": 1, "is_processing": True, "id_task": 7, "n_prompt_tokens_processed": 20,
    ...                   "next_token": [{"n_decoded": 31}]}])
    ((1, 7, 20, 31),)
    """
    if not isinstance(doc, list):
        return None
    out = []
    for slot in doc:
        if not isinstance(slot, dict) or not slot.get("is_processing"):
            continue
        tokens = slot.get("next_token")
        decoded = tokens[0].get("n_decoded") if isinstance(tokens, list) and tokens and \
            isinstance(tokens[0], dict) else None
        out.append((slot.get("id"), slot.get("id_task"), slot.get("n_prompt_tokens_processed"), decoded))
    return tuple(out)


# ------------------------------------------------------------------ the states
#
# The checker's own lifecycle: each state holds what belongs to it (the timer of
# the next check, the check in flight), and leaving a state is where that is let
# go (``Liveness._enter``). Why it checks — work in flight (``busy``), a request
# that just timed out on the child (``suspect``) — are two facts beside it, set
# by the device slot, like an exchange's ``client_gone`` beside its state.


@dataclass(slots=True, eq=False)
class Resting:
    """No check due, none in flight."""

    name = "resting"


@dataclass(slots=True, eq=False)
class Scheduled:
    """The next check is due at ``call``."""

    call: Any
    name = "scheduled"


@dataclass(slots=True, eq=False)
class Checking:
    """A check (``/health``, then ``/slots``) is in flight."""

    check: Deferred[Any]
    name = "checking"


@dataclass(slots=True, eq=False)
class Stopped:
    """Stopped, or a verdict was given: nothing more happens."""

    name = "stopped"


LivenessState = Union[Resting, Scheduled, Checking, Stopped]

#: every transition the checker may make
TRANSITIONS: dict[type, frozenset[type]] = {
    Resting: frozenset({Scheduled, Stopped}),
    Scheduled: frozenset({Scheduled, Checking, Resting, Stopped}),  # (Scheduled: moved sooner)
    Checking: frozenset({Resting, Stopped}),
    Stopped: frozenset(),
}


class Liveness:
    """Liveness and progress of one child, checked while it has work."""

    def __init__(self, *, clock: Any, http: Any, port: int, interval_s: float, timeout_s: float, stall_s: float,
                 on_hung: Callable[[str], None], name: str = "") -> None:
        self.clock = clock
        self.http = http
        self.base = f"http://127.0.0.1:{port}"
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stall_s = stall_s
        self.on_hung = on_hung
        self.name = name
        self.progress_at = clock.seconds()  # the last sign of progress (or when work began)
        self.slots_supported = True
        self.checks = 0
        self.state: LivenessState = Resting()
        self.busy_now = False  # work is in flight on the child
        self.suspected = False  # a request ran out of time on it: check until a check passes
        self._failures = 0  # /health checks failed in a row
        self._signature: tuple[Any, ...] | None = None

    def _enter(self, new: LivenessState) -> None:
        """The one place where the state changes: what the old state held is let go."""
        old = self.state
        if type(new) not in TRANSITIONS[type(old)]:
            raise RuntimeError(f"liveness of {self.name}: {old.name} -> {new.name} is not a transition")
        self.state = new
        if isinstance(old, Scheduled) and old.call.active():
            old.call.cancel()
        elif isinstance(old, Checking) and not old.check.called:
            old.check.cancel()

    # ------------------------------------------------------------ control

    def busy(self) -> None:
        """Work is in flight: check every ``interval_s`` until :meth:`idle`."""
        if self.busy_now or isinstance(self.state, Stopped):
            return
        self.busy_now = True
        self.progress_at = self.clock.seconds()  # its no-progress time counts from here
        self._signature = None
        if isinstance(self.state, Resting):
            self._schedule(self.interval_s)

    def idle(self) -> None:
        """Nothing in flight: stop checking (unless a check was asked for by :meth:`suspect`).

        The next check stays scheduled and does nothing when it comes, so a
        device that is busy and idle between every request (a closed-loop
        client) does not make and cancel a timer per request; a check in
        flight is cancelled."""
        self.busy_now = False
        if not self.suspected and isinstance(self.state, Checking):
            self._enter(Resting())

    def suspect(self) -> None:
        """A request ran out of time on this child: check it now, until a check passes."""
        if isinstance(self.state, Stopped):
            return
        self.suspected = True
        self._schedule(0)

    def stop(self) -> None:
        """The child is gone or no longer watched; nothing is left pending."""
        self.busy_now = self.suspected = False
        if not isinstance(self.state, Stopped):
            self._enter(Stopped())

    # ------------------------------------------------------------ checks

    def _schedule(self, delay: float) -> None:
        """The next check in ``delay`` (or sooner, if one is due sooner); none while one is in flight."""
        state = self.state
        if isinstance(state, (Checking, Stopped)):
            return
        if isinstance(state, Scheduled) and state.call.getTime() <= self.clock.seconds() + delay:
            return
        self._enter(Scheduled(self.clock.callLater(delay, self._run)))

    def _run(self) -> None:
        if not (self.busy_now or self.suspected):
            self._enter(Resting())
            return
        self.checks += 1
        check = self._ask()
        self._enter(Checking(check))
        check.addCallback(self._checked, check)
        check.addErrback(self._check_failed, check)

    @inlineCallbacks
    def _ask(self) -> Any:
        """(health answered 200 in time, the /slots signature: a tuple, None for no news, or UNSUPPORTED)."""
        try:
            response = yield self.http.get(self.base + "/health").addTimeout(self.timeout_s, self.clock)
            yield response.content().addTimeout(self.timeout_s, self.clock)
        except CancelledError:
            raise
        except Exception:
            return False, None
        if response.code != 200:
            return False, None
        if not self.slots_supported:
            return True, UNSUPPORTED
        try:
            response = yield self.http.get(self.base + "/slots").addTimeout(self.timeout_s, self.clock)
            body = yield response.content().addTimeout(self.timeout_s, self.clock)
        except CancelledError:
            raise
        except Exception:
            return True, None  # a long batch: the main loop answers between two
        if response.code != 200:  # 404/501: no /slots in this build; 401: it wants a key (--api-key)
            return True, None if response.code == 503 else UNSUPPORTED
        try:
            return True, slots_signature(json.loads(body))
        except ValueError:
            return True, None

    def _checked(self, result: tuple[bool, Any], check: Deferred[Any]) -> None:
        if not (isinstance(self.state, Checking) and self.state.check is check):
            return  # cancelled on the way (idle, stop)
        self._enter(Resting())
        healthy, signature = result
        now = self.clock.seconds()
        if not healthy:
            self._failures += 1
            if self._failures >= FAILURES:
                return self._hung(f"/health did not answer within {self.timeout_s:g}s, {FAILURES} times in a row")
            self._schedule(min(self.interval_s, self.timeout_s))
            return
        self._failures = 0
        if signature == UNSUPPORTED:
            self.slots_supported = False
        elif signature is not None and signature != self._signature:
            if self._signature is not None or signature:
                self.progress_at = now
            self._signature = signature
        self.suspected = False
        if not self.busy_now:
            return
        if self.slots_supported and now - self.progress_at >= self.stall_s:
            return self._hung(f"no progress in /slots for {now - self.progress_at:.0f}s with work in flight")
        self._schedule(self.interval_s)

    def _check_failed(self, failure: Failure, check: Deferred[Any]) -> None:
        if isinstance(self.state, Checking) and self.state.check is check:
            self._enter(Resting())
        if not failure.check(CancelledError):
            log.failure("liveness check of {name} failed", failure, name=self.name)

    def _hung(self, reason: str) -> None:
        self.stop()
        self.on_hung(reason)
