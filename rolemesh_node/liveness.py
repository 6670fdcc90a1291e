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
the clock it is given; :meth:`suspect` asks for checks now even when idle,
until one passes (a request just timed out on it). ``progress_at`` is what
the proxy reads to know whether a request that has no headers yet is getting
anywhere. Verdicts go to ``on_hung(reason)`` once; the device slot kills the
child and replaces it.
"""

from __future__ import annotations

import json
from typing import Any, Callable

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
        self._busy = False
        self._suspect = False
        self._failures = 0
        self._signature: tuple[Any, ...] | None = None
        self._call: Any = None  # the next check, when one is due
        self._check: Deferred[Any] | None = None  # the check in flight
        self._done = False  # stopped, or a verdict was given

    # ------------------------------------------------------------ control

    def busy(self) -> None:
        """Work is in flight: check every ``interval_s`` until :meth:`idle`."""
        if self._busy or self._done:
            return
        self._busy = True
        self.progress_at = self.clock.seconds()  # its no-progress time counts from here
        self._signature = None
        if self._call is None:
            self._schedule(self.interval_s)

    def idle(self) -> None:
        """Nothing in flight: stop checking (unless a check was asked for by :meth:`suspect`).

        The next check stays scheduled and does nothing when it comes, so a
        device that is busy and idle between every request (a closed-loop
        client) does not make and cancel a timer per request; a check in
        flight is cancelled."""
        self._busy = False
        if not self._suspect:
            check, self._check = self._check, None
            if check is not None:
                check.cancel()

    def suspect(self) -> None:
        """A request ran out of time on this child: check it now, until a check passes."""
        if self._done:
            return
        self._suspect = True
        if self._check is None:
            self._schedule(0)

    def stop(self) -> None:
        """The child is gone or no longer watched; nothing is left pending."""
        self._done = True
        self._busy = self._suspect = False
        self._cancel()

    # ------------------------------------------------------------ checks

    def _schedule(self, delay: float) -> None:
        if self._check is not None or self._done:
            return
        if self._call is not None:
            if self._call.getTime() <= self.clock.seconds() + delay:
                return
            self._call.cancel()
        self._call = self.clock.callLater(delay, self._run)

    def _cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        check, self._check = self._check, None
        if check is not None:
            check.cancel()

    def _run(self) -> None:
        self._call = None
        if not (self._busy or self._suspect):
            return
        self.checks += 1
        check = self._check = self._ask()
        check.addCallback(self._checked)
        check.addErrback(self._check_failed)

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

    def _checked(self, result: tuple[bool, Any]) -> None:
        self._check = None
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
        self._suspect = False
        if not self._busy:
            return
        if self.slots_supported and now - self.progress_at >= self.stall_s:
            return self._hung(f"no progress in /slots for {now - self.progress_at:.0f}s with work in flight")
        self._schedule(self.interval_s)

    def _check_failed(self, failure: Failure) -> None:
        self._check = None
        if not failure.check(CancelledError):
            log.failure("liveness check of {name} failed", failure, name=self.name)

    def _hung(self, reason: str) -> None:
        self.stop()
        self.on_hung(reason)
