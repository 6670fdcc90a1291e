"""The graceful drain before the node stops (SIGTERM, SIGINT, a twistd stop).

A small state machine on the clock it is given::

    serving ──start()──► draining ──nothing in flight or waiting──► done ──► the services stop
                            │  drain_timeout_s runs out, or hurry() (a second SIGTERM)
                            └──► ending: end_all() ends what is left ──► done

On :meth:`Drain.start` the node stops taking requests at once — ``Node.serving()``
answers ``draining`` (``/ready`` 503) and the proxy answers new requests 503 with
``Retry-After`` while :attr:`Node.draining` is set — and the dispatcher is told
first (``announce``: heartbeats stop, then a deregistration with reason
``draining``, or ``shutdown`` when nothing is in flight). The requests in flight
and the requests already waiting for a device are served meanwhile. At the
deadline ``end_all`` ends the rest: a stream gets a final SSE error event and
its terminating chunk, a request whose answer has not begun gets a 503 JSON
error (``ProxyResource.end_for_drain``). Then the services stop: children get
SIGTERM, then SIGKILL after ``llama_server_stop_grace_s``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()

#: how often the drain looks whether the requests are done
POLL_S = 0.05


class Drain:
    """One drain. ``in_flight()`` counts the requests in flight or waiting; ``end_all()`` ends them;
    ``announce(reason)`` tells the dispatcher (its result is not waited for here)."""

    SERVING, DRAINING, DONE = "serving", "draining", "done"

    def __init__(self, clock: Any, timeout_s: Callable[[], float], *, in_flight: Callable[[], int],
                 end_all: Callable[[], int], announce: Callable[[str], Any] | None = None,
                 poll_s: float = POLL_S) -> None:
        self.clock = clock
        self._timeout_s = timeout_s
        self._in_flight = in_flight
        self._end_all = end_all
        self._announce = announce
        self.poll_s = poll_s
        self.state = self.SERVING
        self.began: float | None = None
        self.deadline: float | None = None
        #: how the drain ended: ``drained`` (all done in time), ``timeout``, ``hurried`` (a second signal)
        self.outcome: str | None = None
        self.ended = 0  # requests ended at the deadline
        self._timer: Any = None
        self._poll: Any = None
        self._waiters: list[Deferred[None]] = []

    def start(self) -> Deferred[None]:
        """Begin draining (once); fires when the drain is over."""
        d: Deferred[None] = Deferred()
        if self.state == self.DONE:
            d.callback(None)
            return d
        self._waiters.append(d)
        if self.state == self.SERVING:
            self._begin()
        return d

    def _begin(self) -> None:
        self.state = self.DRAINING
        timeout_s = self._timeout_s()
        self.began = self.clock.seconds()
        self.deadline = self.began + timeout_s
        busy = self._in_flight()
        if self._announce is not None:
            self._announce("draining" if busy else "shutdown")
        if not busy:
            self._finish("drained")
            return
        log.info("draining: {count} request(s) in flight or waiting; new requests get 503 for up to "
                 "drain_timeout_s={timeout:g}s", count=busy, timeout=timeout_s)
        self._timer = self.clock.callLater(timeout_s, self._expired)
        self._poll = self.clock.callLater(self.poll_s, self._check)

    def hurry(self) -> None:
        """End the drain now (a second SIGTERM)."""
        if self.state == self.DRAINING:
            log.info("ending the drain now: {count} request(s) left", count=self._in_flight())
            self._end("hurried")

    def retry_after_s(self) -> int:
        """For a refused request's ``Retry-After``: until the drain is over, at least 1 s."""
        if self.deadline is None:
            return 1
        return max(1, math.ceil(self.deadline - self.clock.seconds()))

    def _check(self) -> None:
        self._poll = None
        if self.state != self.DRAINING:
            return
        if self._in_flight():
            self._poll = self.clock.callLater(self.poll_s, self._check)
        else:
            self._finish("drained")

    def _expired(self) -> None:
        self._timer = None
        if self.state == self.DRAINING:
            log.warn("drain_timeout_s ran out with {count} request(s) left; ending them", count=self._in_flight())
            self._end("timeout")

    def _end(self, outcome: str) -> None:
        self.ended = self._end_all()
        self._finish(outcome)

    def _finish(self, outcome: str) -> None:
        for name in ("_timer", "_poll"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        self.state = self.DONE
        self.outcome = outcome
        if outcome == "drained" and self.began is not None and self.clock.seconds() > self.began:
            log.info("drained in {seconds:.1f}s", seconds=self.clock.seconds() - self.began)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
