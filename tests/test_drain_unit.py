"""The drain's state machine on a Clock: idle at once, drained in time, out of time, hurried."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from rolemesh_node.drain import Drain


class Work:
    """The requests the drain waits for, and what it was told to do."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.announced: list[str] = []
        self.ended = 0

    def end_all(self) -> int:
        ended, self.busy = self.busy, 0
        self.ended += ended
        return ended


def make(busy: int, timeout_s: float = 30.0) -> tuple[Drain, Work, Clock, list[Any]]:
    clock = Clock()
    work = Work(busy)
    drain = Drain(clock, lambda: timeout_s, in_flight=lambda: work.busy, end_all=work.end_all,
                  announce=work.announced.append)
    done: list[Any] = []
    drain.start().addBoth(done.append)
    return drain, work, clock, done


def test_nothing_in_flight_is_done_at_once() -> None:
    drain, work, clock, done = make(busy=0)
    assert done == [None] and drain.outcome == "drained"
    assert work.announced == ["shutdown"] and work.ended == 0
    assert clock.getDelayedCalls() == []


def test_requests_that_finish_in_time_are_waited_for() -> None:
    drain, work, clock, done = make(busy=2)
    assert work.announced == ["draining"]  # the dispatcher first
    assert done == [] and drain.state == Drain.DRAINING
    assert drain.retry_after_s() == 30
    clock.advance(5)
    work.busy = 1
    clock.advance(5)
    assert done == [] and drain.retry_after_s() == 20
    work.busy = 0
    clock.advance(1)
    assert done == [None] and drain.outcome == "drained" and work.ended == 0
    assert clock.getDelayedCalls() == []  # nothing left scheduled


def test_the_deadline_ends_what_is_left() -> None:
    drain, work, clock, done = make(busy=3, timeout_s=2.0)
    clock.advance(1.9)
    assert done == []
    clock.advance(0.2)
    assert done == [None] and drain.outcome == "timeout" and drain.ended == 3 and work.ended == 3
    assert clock.getDelayedCalls() == []


def test_hurry_ends_the_drain_now_and_only_once() -> None:
    drain, work, clock, done = make(busy=1)
    clock.advance(1)
    drain.hurry()
    assert done == [None] and drain.outcome == "hurried" and work.ended == 1
    drain.hurry()  # a third signal: nothing more
    assert work.ended == 1 and clock.getDelayedCalls() == []


def test_start_twice_waits_for_the_same_drain() -> None:
    drain, work, clock, done = make(busy=1)
    again: list[Any] = []
    drain.start().addBoth(again.append)
    assert work.announced == ["draining"]  # told once
    work.busy = 0
    clock.advance(1)
    assert done == [None] and again == [None]
    late: list[Any] = []
    drain.start().addBoth(late.append)
    assert late == [None]
