"""The liveness check of a child with work in flight, on a Clock with a scripted HTTP client."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from rolemesh_node.liveness import Liveness, slots_signature
from tests.fakes import FakeResponse


class Child:
    """Scripted answers: ``health`` (None: no answer), ``slots`` (a list, an int status, or None: no answer)."""

    def __init__(self) -> None:
        self.health: Any = 200
        self.slots: Any = []
        self.asked: list[str] = []
        self.open: list[Deferred[Any]] = []

    def get(self, url: str) -> Deferred[Any]:
        path = "/" + url.split("/", 3)[3]
        self.asked.append(path)
        answer = self.health if path == "/health" else self.slots
        if answer is None:
            d: Deferred[Any] = Deferred()
            self.open.append(d)
            return d
        if isinstance(answer, int):
            return succeed(FakeResponse(answer, {"status": "ok"} if answer == 200 else {"error": {}}))
        return succeed(FakeResponse(200, json.dumps(answer).encode()))


def processing(n_decoded: int, task: int = 1) -> list[dict[str, Any]]:
    return [{"id": 0, "is_processing": True, "id_task": task, "n_prompt_tokens_processed": 10,
             "next_token": [{"n_decoded": n_decoded}]}, {"id": 1, "is_processing": False}]


def make(child: Child, clock: Clock, hung: list[str], stall_s: float = 10.0) -> Liveness:
    return Liveness(clock=clock, http=child, port=1, interval_s=1.0, timeout_s=0.5, stall_s=stall_s,
                    on_hung=hung.append)


def test_slots_signature_reads_what_moves() -> None:
    assert slots_signature(processing(5)) == ((0, 1, 10, 5),)
    assert slots_signature([{"id": 0, "is_processing": False}]) == ()
    assert slots_signature({"error": 1}) is None


def test_checks_only_while_busy_and_nothing_is_left_pending() -> None:
    clock, child, hung = Clock(), Child(), []
    live = make(child, clock, hung)
    clock.advance(5)
    assert child.asked == [] and not clock.getDelayedCalls()
    live.busy()
    clock.advance(1.0)
    assert child.asked == ["/health", "/slots"]
    live.idle()
    clock.advance(5)  # the check that was due comes and does nothing
    assert len(child.asked) == 2 and hung == [] and not clock.getDelayedCalls()
    live.busy()
    live.idle()
    live.busy()  # busy and idle between every request: one timer, not one per request
    assert len(clock.getDelayedCalls()) == 1
    live.stop()
    assert not clock.getDelayedCalls()


def test_a_long_request_that_progresses_is_never_hung() -> None:
    clock, child, hung = Clock(), Child(), []
    live = make(child, clock, hung, stall_s=3.0)
    live.busy()
    for step in range(30):  # 30 s, ten times stall_s: tokens keep coming
        child.slots = processing(step)
        clock.advance(1.0)
        assert live.progress_at == clock.seconds()
    assert hung == []
    live.stop()
    assert not clock.getDelayedCalls()


def test_health_that_does_not_answer_twice_is_hung() -> None:
    clock, child, hung = Clock(), Child(), []
    live = make(child, clock, hung)
    live.busy()
    clock.advance(1.0)
    child.health = None  # SIGSTOPped: the connection is accepted, nothing answers
    clock.advance(1.0)
    clock.advance(0.5)  # the first check times out
    assert hung == []
    clock.advance(0.5)
    clock.advance(0.5)  # the second one too
    assert hung == ["/health did not answer within 0.5s, 2 times in a row"]
    assert not clock.getDelayedCalls()


def test_one_missed_health_is_forgiven() -> None:
    clock, child, hung = Clock(), Child(), []
    live = make(child, clock, hung)
    live.busy()
    child.health = 503
    clock.advance(1.0)
    child.health = 200
    clock.advance(5.0)
    assert hung == []
    live.stop()


def test_no_progress_for_stall_s_with_work_in_flight_is_hung() -> None:
    clock, child, hung = Clock(), Child(), []
    live = make(child, clock, hung, stall_s=3.0)
    live.busy()
    child.slots = processing(7)  # processing, and stuck there
    for _ in range(5):
        clock.advance(1.0)
    assert len(hung) == 1 and "no progress" in hung[0]


@pytest.mark.parametrize("status", [404, 501, 401])  # not in this build, --no-slots, --api-key
def test_a_child_without_usable_slots_is_judged_on_health_alone(status: int) -> None:
    clock, child, hung = Clock(), Child(), []
    live = make(child, clock, hung, stall_s=3.0)
    live.busy()
    child.slots = status
    for _ in range(10):
        clock.advance(1.0)
    assert hung == [] and not live.slots_supported
    assert child.asked.count("/slots") == 1  # not asked again
    live.stop()


def test_slots_that_do_not_answer_in_time_are_no_news() -> None:
    clock, child, hung = Clock(), Child(), []
    live = make(child, clock, hung, stall_s=30.0)
    live.busy()
    child.slots = None  # a long batch: the main loop answers between two
    for _ in range(20):
        clock.advance(0.5)
    assert hung == [] and live.slots_supported and child.asked.count("/health") >= 5
    live.stop()
    assert not clock.getDelayedCalls()


def test_suspect_checks_an_idle_child_until_a_check_passes() -> None:
    clock, child, hung = Clock(), Child(), []
    live = make(child, clock, hung)
    child.health = None
    live.suspect()
    clock.advance(0)
    clock.advance(0.5)
    clock.advance(0.5)
    clock.advance(0.5)
    assert len(hung) == 1
    clock2, child2, hung2 = Clock(), Child(), []
    live2 = make(child2, clock2, hung2)
    live2.suspect()
    clock2.advance(0)
    assert child2.asked == ["/health", "/slots"] and not clock2.getDelayedCalls() and hung2 == []
    live2.stop()


def test_the_checker_is_a_state_table() -> None:
    clock, child, hung = Clock(), Child(), []
    live = make(child, clock, hung)
    seen = [live.state.name]
    live.busy()
    seen.append(live.state.name)
    child.slots = None  # the check stays in flight until answered
    child.health = None
    clock.advance(1.0)
    seen.append(live.state.name)
    live.idle()  # nothing in flight any more: the check in flight is dropped
    seen.append(live.state.name)
    live.stop()
    seen.append(live.state.name)
    assert seen == ["resting", "scheduled", "checking", "resting", "stopped"]
    assert not clock.getDelayedCalls() and all(d.called for d in child.open)  # the dropped check was cancelled
    with pytest.raises(RuntimeError):
        live._enter(type(live.state)())  # stopped is final
