"""The event-loop lag detector (rtml.core.looplag): the cap its lag sets on requests in flight.

The cap's steps are pure arithmetic, checked tick by tick through ``adjust_cap``. The rest runs on a real event
loop held up for real (a CPU spin or a blocking sleep in the loop's thread, in chunks that let the timer run
between them): overload of the process itself (behind, and busy on its own CPU work) lowers the cap; being
behind while not running does not. The thresholds leave wide margins: a chunk (tests.helpers.LOOP_CHUNK_S) is
6x the lag limit, and the CPU share asked for (0.2) is far below what a spinning thread gets on a busy machine.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import pytest

from rtml.core import metrics
from rtml.core.looplag import CAP_CEILING, LoopLag
from tests.helpers import hold_up_loop, metric_value, spin_cpu, until

LIMIT_S = 0.005


def tick(lag: LoopLag, lag_s: float, busy: float = 1.0) -> float:
    """One tick's step with the given lag and CPU share; the cap after it."""
    lag.lag_s, lag.busy = lag_s, busy
    lag.adjust_cap()
    return lag.cap


def watched(in_flight: list[int], **kwargs: float) -> LoopLag:
    """A detector watching ``in_flight[0]`` as the requests in flight."""
    lag = LoopLag(LIMIT_S, **kwargs)  # type: ignore[arg-type]
    lag.watch(lambda: in_flight[0])
    return lag


def test_late_busy_ticks_in_a_row_halve_what_is_in_flight_and_every_other_tick_adds_one() -> None:
    in_flight = [0]
    lag = watched(in_flight, confirm_ticks=2)
    assert lag.admits(9) and lag.cap == math.inf  # no cap until the loop has been behind
    assert tick(lag, 0.0) == math.inf  # on time: still none
    assert lag.admits(10)
    assert tick(lag, 0.006) == math.inf  # one late tick (a long callback, a GC) lowers nothing ...
    in_flight[0] = 10
    assert tick(lag, 0.006) == 5  # ... two in a row halve the 10 in flight
    assert lag.admits(4) and not lag.admits(5)
    assert tick(lag, 0.006) == 5  # the count starts again: what was admitted before is not halved twice
    assert tick(lag, 0.006) == 2.5  # two more: half the cap (the 10 in flight are more than it)
    assert lag.admits(2) and not lag.admits(3)
    assert tick(lag, 0.0) == 3.5  # on time: one more
    assert lag.admits(3) and not lag.admits(4)
    in_flight[0] = 0
    assert tick(lag, 0.02) == 3.5  # late, with 4 asked about since the tick before: the first of two
    assert tick(lag, 0.02) == 3.5  # nothing in flight or asked since: the lateness is not the requests'
    in_flight[0] = 1
    assert tick(lag, 0.02) == 1  # one in flight: half of it, but never below one ...
    for _ in range(4):
        assert tick(lag, 0.05) == 1
        assert lag.admits(0) and not lag.admits(1)  # ... a request with nothing else in flight is always taken


def test_late_without_being_busy_counts_as_on_time_and_a_cap_grown_past_the_ceiling_is_lifted() -> None:
    lag = watched([6], min_busy=0.7, confirm_ticks=1)
    assert tick(lag, 0.05, busy=0.5) == math.inf  # the machine did not run it: refusing would not help
    assert tick(lag, 0.05, busy=0.8) == 3
    assert tick(lag, 0.05, busy=0.5) == 4  # so it grows back as if on time
    lag.cap = CAP_CEILING - 0.5
    assert tick(lag, 0.0) == CAP_CEILING + 0.5
    assert tick(lag, 0.0) == math.inf


def test_a_detector_nothing_watches_or_with_a_limit_of_zero_keeps_no_cap() -> None:
    unwatched = LoopLag(LIMIT_S, confirm_ticks=1)  # features, feedback: nothing is admitted there
    off = watched([8], confirm_ticks=1)
    off.max_lag_s = 0
    for lag in (unwatched, off):
        for _ in range(3):
            assert tick(lag, 0.05) == math.inf


def test_the_refusal_says_how_many_requests_at_a_time() -> None:
    lag = watched([5], confirm_ticks=1)
    assert "request" not in lag.refusal().message  # not capped: no count to give (and no error)
    tick(lag, 0.012)  # cap 2.5: 0, 1 and 2 in flight admit one more, so 3 at a time
    error = lag.refusal()
    assert error.status == 503 and error.headers() == {"Retry-After": "1"}
    assert "behind on its own work" in error.message and "takes 3 requests at a time" in error.message
    for _ in range(3):
        tick(lag, 0.012)
    assert "takes 1 request at a time" in lag.refusal().message


def late_ticks_seen(lag: LoopLag, n: int) -> Callable[[], bool]:
    """Done once ``n`` ticks have run at least LIMIT_S late (the loop really was held up that often)."""
    lag.record = []
    return lambda: sum(1 for x in lag.record or () if x >= LIMIT_S) >= n


async def started(lag: LoopLag) -> LoopLag:
    lag.start()
    await asyncio.sleep(0.02)  # the tick task runs from its first turn
    return lag


async def test_a_loop_behind_on_its_own_cpu_work_takes_one_request_at_a_time_until_it_catches_up() -> None:
    lag = watched([1], min_busy=0.2)  # one request in flight
    await started(lag)
    try:
        assert lag.cap == math.inf  # idle: every tick on time
        await hold_up_loop(lag, lambda: lag.cap <= 1)
        assert lag.busy > 0.2 and lag.lag_s >= LIMIT_S
        assert metric_value(metrics.scrape().decode(), "rtml_event_loop_in_flight_cap") == 1
        assert lag.admits(0) and not lag.admits(1)

        await until(lambda: lag.cap >= 4)  # caught up: one more per tick on time
        assert lag.admits(3)
    finally:
        await lag.stop()


async def test_a_loop_behind_with_nothing_in_flight_keeps_no_cap() -> None:
    # the lateness is not the requests' (a model loading, a consumer's batch): capping them would not shorten it
    lag = watched([0], min_busy=0.2)
    await started(lag)
    try:
        caps = await hold_up_loop(lag, late_ticks_seen(lag, 5))
        assert lag.busy > 0.2  # behind on its own work ...
        assert set(caps) == {math.inf}  # ... but not with requests
    finally:
        await lag.stop()


async def test_a_loop_late_because_its_thread_did_not_run_keeps_no_cap() -> None:
    # a blocking sleep stands for the machine not running the process (another process had the core, the GIL
    # held by another thread): refusing would not shorten anything
    lag = watched([1], min_busy=0.2)
    await started(lag)
    try:
        caps = await hold_up_loop(lag, late_ticks_seen(lag, 5), block=time.sleep)
        assert lag.busy < 0.2  # behind, but not on its own work
        assert set(caps) == {math.inf}
    finally:
        await lag.stop()


async def test_a_limit_of_zero_never_refuses_but_still_measures() -> None:
    lag = LoopLag(0, min_busy=0.2)
    lag.watch(lambda: 1)
    await started(lag)
    try:
        caps = await hold_up_loop(lag, late_ticks_seen(lag, 5))
        assert set(caps) == {math.inf}
        assert lag.lag_s >= LIMIT_S  # measured all the same
    finally:
        await lag.stop()


async def test_a_stopped_detector_keeps_no_cap_and_starts_again() -> None:
    lag = watched([1], min_busy=0.0)
    await started(lag)
    await hold_up_loop(lag, lambda: lag.cap <= 1)
    await lag.stop()
    assert lag.cap == math.inf and lag.busy == 0.0  # lifted once stopped, however long the loop is then held
    spin_cpu(0.05)
    assert lag.admits(100)
    await started(lag)  # a new tick task, counting from scratch
    assert lag.cap == math.inf
    await hold_up_loop(lag, lambda: lag.cap <= 1)
    await lag.stop()


async def test_a_detector_that_fails_lifts_its_cap_instead_of_freezing(monkeypatch: pytest.MonkeyPatch) -> None:
    lag = watched([1], min_busy=0.0)
    real = metrics.EVENT_LOOP_LAG.observe

    def fails_once_capped(value: float) -> None:  # fails at the first tick after the cap came down to 1
        if lag.cap <= 1:
            raise RuntimeError("metrics backend gone")
        real(value)

    monkeypatch.setattr(metrics.EVENT_LOOP_LAG, "observe", fails_once_capped)
    await started(lag)
    await hold_up_loop(lag, lambda: lag._task is not None and lag._task.done())
    assert lag.cap == math.inf  # lifted, not frozen at one request at a time
    spin_cpu(0.05)
    assert lag.admits(100)
    monkeypatch.setattr(metrics.EVENT_LOOP_LAG, "observe", real)
    lag.start()  # a detector that failed can be started again
    await hold_up_loop(lag, lambda: lag.cap <= 1)
    await lag.stop()
