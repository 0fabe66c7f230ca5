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


def test_a_late_busy_tick_halves_what_was_in_flight_and_each_tick_on_time_adds_one() -> None:
    lag = LoopLag(LIMIT_S)
    assert lag.admits(9) and lag.cap == math.inf  # no cap until the loop has been behind
    assert tick(lag, 0.0) == math.inf  # on time: still none
    assert lag.admits(10)
    assert tick(lag, 0.006) == 5  # behind with 10 in flight: half of that
    assert lag.admits(4) and not lag.admits(5)
    assert tick(lag, 0.006) == 2.5  # the 5 asked about since: half again
    assert lag.admits(2) and not lag.admits(3)
    assert tick(lag, 0.0) == 3.5  # caught up: one more per tick on time
    assert lag.admits(3) and not lag.admits(4)
    assert tick(lag, 0.02) == 1.75  # behind again: half the cap (the 4 asked about were more than it)
    assert tick(lag, 0.02) == 1  # behind with nothing asked since the last tick: one at a time ...
    for _ in range(5):
        assert tick(lag, 0.05) == 1  # ... and never below one:
        assert lag.admits(0) and not lag.admits(1)  # a process with nothing in flight always takes a request


def test_behind_without_being_busy_leaves_the_cap_and_a_cap_grown_past_the_ceiling_is_lifted() -> None:
    lag = LoopLag(LIMIT_S, min_busy=0.7)
    assert lag.admits(6)
    assert tick(lag, 0.05, busy=0.5) == math.inf  # the machine did not run it: refusing would not help
    assert lag.admits(6)
    assert tick(lag, 0.05, busy=0.8) == 3
    assert tick(lag, 0.05, busy=0.5) == 3  # neither lowered nor raised while behind and not busy
    lag.cap = CAP_CEILING - 0.5
    assert tick(lag, 0.0) == CAP_CEILING + 0.5
    assert tick(lag, 0.0) == math.inf


def test_the_refusal_says_how_far_behind_and_how_many_at_a_time() -> None:
    lag = LoopLag(LIMIT_S)
    lag.admits(5)
    tick(lag, 0.012)  # cap 2.5: 0, 1 and 2 in flight admit one more, so 3 at a time
    error = lag.refusal()
    assert error.status == 503 and error.headers() == {"Retry-After": "1"}
    assert "12 ms behind" in error.message and "takes 3 requests at a time" in error.message


def late_ticks_seen(lag: LoopLag, n: int) -> Callable[[], bool]:
    """Done once ``n`` ticks have run at least LIMIT_S late (the loop really was held up that often)."""
    lag.record = []
    return lambda: sum(1 for x in lag.record or () if x >= LIMIT_S) >= n


async def started(lag: LoopLag) -> LoopLag:
    lag.start()
    await asyncio.sleep(0.02)  # the tick task runs from its first turn
    return lag


async def test_a_loop_behind_on_its_own_cpu_work_takes_one_request_at_a_time_until_it_catches_up() -> None:
    lag = await started(LoopLag(LIMIT_S, min_busy=0.2))
    try:
        assert lag.cap == math.inf  # idle: every tick on time
        caps = await hold_up_loop(lag, lambda: lag.cap <= 1)
        assert caps[-1] == 1 and lag.busy > 0.2 and lag.behind_ms() >= LIMIT_S * 1000
        assert metric_value(metrics.scrape().decode(), "rtml_event_loop_in_flight_cap") == 1

        await until(lambda: lag.cap >= 4)  # caught up: one more per tick on time
        assert lag.admits(3)
    finally:
        await lag.stop()


async def test_a_loop_late_because_its_thread_did_not_run_keeps_no_cap() -> None:
    # a blocking sleep stands for the machine not running the process (another process had the core, the GIL
    # held by another thread): refusing would not shorten anything
    lag = await started(LoopLag(LIMIT_S, min_busy=0.2))
    try:
        caps = await hold_up_loop(lag, late_ticks_seen(lag, 5), block=time.sleep)
        assert lag.busy < 0.2  # behind, but not on its own work
        assert set(caps) == {math.inf}
    finally:
        await lag.stop()


async def test_a_limit_of_zero_never_refuses_but_still_measures() -> None:
    lag = await started(LoopLag(0, min_busy=0.2))
    try:
        caps = await hold_up_loop(lag, late_ticks_seen(lag, 5))
        assert set(caps) == {math.inf}
        assert lag.lag_s >= LIMIT_S  # measured all the same
    finally:
        await lag.stop()


async def test_a_stopped_detector_keeps_no_cap() -> None:
    lag = LoopLag(LIMIT_S, min_busy=0.0)
    spin_cpu(0.05)
    assert lag.cap == math.inf  # never started: no tick is due
    await started(lag)
    caps = await hold_up_loop(lag, lambda: lag.cap <= 1)
    assert caps[-1] == 1
    await lag.stop()
    assert lag.cap == math.inf and lag.busy == 0.0  # lifted once stopped, however long the loop is then held
    spin_cpu(0.05)
    assert lag.admits(100)


async def test_a_detector_that_fails_lifts_its_cap_instead_of_freezing(monkeypatch: pytest.MonkeyPatch) -> None:
    lag = LoopLag(LIMIT_S, min_busy=0.0)
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
    await lag.stop()  # and stopping it afterwards raises nothing
