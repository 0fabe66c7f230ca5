"""The event-loop lag detector (rtml.core.looplag) on a real event loop: what counts as overload of the
process itself (behind, and busy on its own CPU work) and what does not (behind while not running).

The loop is held up for real (a CPU spin or a blocking sleep in the loop's thread, in chunks that let the
timer run between them). The thresholds leave wide margins: a chunk (tests.helpers.LOOP_CHUNK_S) is 6x the
lag limit, and the CPU share asked for (0.2) is far below what a spinning thread gets on a busy machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from rtml.core import metrics
from rtml.core.looplag import LoopLag
from tests.helpers import hold_up_loop, spin_cpu, until

LIMIT_S = 0.005


def late_ticks_seen(lag: LoopLag, n: int) -> Callable[[], bool]:
    """Done once ``n`` ticks have run at least LIMIT_S late (the loop really was held up that often)."""
    lag.record = []
    return lambda: sum(1 for x in lag.record or () if x >= LIMIT_S) >= n


async def started(lag: LoopLag) -> LoopLag:
    lag.start()
    await asyncio.sleep(0.02)  # the tick task runs from its first turn
    return lag


async def test_a_loop_behind_on_its_own_cpu_work_is_overloaded_until_it_catches_up() -> None:
    lag = await started(LoopLag(LIMIT_S, min_busy=0.2))
    try:
        assert not lag.overloaded  # idle: every tick on time
        verdicts = await hold_up_loop(lag, lambda: bool(lag.overloaded))
        assert verdicts[-1] is True and lag.busy > 0.2 and lag.behind_ms() >= LIMIT_S * 1000

        await until(lambda: not lag.overloaded)  # caught up: new requests are admitted again
        assert lag.lag_s < LIMIT_S and lag.late_ticks == 0
    finally:
        await lag.stop()


async def test_one_long_callback_without_a_backlog_behind_it_is_not_overload() -> None:
    # a 10,000-event batch or a garbage collection: one tick late, then the loop is on time again
    lag = await started(LoopLag(0.05, min_busy=0.0))  # 50 ms: the check below comes well within it
    try:
        spin_cpu(0.3)
        await asyncio.sleep(0.001)  # one turn for the overdue tick, then this
        assert lag.lag_s >= 0.1 and lag.late_ticks == 1  # the tick saw the stall ...
        assert not lag.overloaded  # ... but nothing queued behind it keeps the loop late
        await until(lambda: lag.late_ticks == 0)
        assert not lag.overloaded
    finally:
        await lag.stop()


async def test_a_loop_late_because_its_thread_did_not_run_is_not_overloaded() -> None:
    # a blocking sleep stands for the machine not running the process (another process had the core, the GIL
    # held by another thread): refusing would not shorten anything
    lag = await started(LoopLag(LIMIT_S, min_busy=0.2))
    try:
        verdicts = await hold_up_loop(lag, late_ticks_seen(lag, 5), block=time.sleep)
        assert lag.late_ticks >= 1  # it is behind ...
        assert lag.busy < 0.2  # ... but not on its own work
        assert not any(verdicts)
    finally:
        await lag.stop()


async def test_a_limit_of_zero_never_refuses_but_still_measures() -> None:
    lag = await started(LoopLag(0, min_busy=0.2))
    try:
        verdicts = await hold_up_loop(lag, late_ticks_seen(lag, 5))
        assert not any(verdicts)
        assert lag.lag_s >= LIMIT_S and lag.late_ticks == 0  # measured, never counted as late
    finally:
        await lag.stop()


async def test_a_stopped_detector_is_never_overloaded() -> None:
    lag = LoopLag(LIMIT_S, min_busy=0.0)
    spin_cpu(0.05)
    assert not lag.overloaded  # never started: no tick is due
    await started(lag)
    verdicts = await hold_up_loop(lag, lambda: bool(lag.overloaded))
    assert verdicts[-1] is True
    await lag.stop()
    spin_cpu(0.05)
    assert not lag.overloaded and lag.busy == 0.0  # no tick is due once stopped, however long the loop is held


async def test_a_detector_that_fails_stops_refusing_instead_of_freezing(monkeypatch: pytest.MonkeyPatch) -> None:
    lag = LoopLag(LIMIT_S, min_busy=0.0)
    real = metrics.EVENT_LOOP_LAG.observe

    def fails_once_behind(value: float) -> None:  # fails at the tick that made the verdict "overloaded"
        if lag.late_ticks >= 2:
            raise RuntimeError("metrics backend gone")
        real(value)

    monkeypatch.setattr(metrics.EVENT_LOOP_LAG, "observe", fails_once_behind)
    await started(lag)
    await hold_up_loop(lag, lambda: lag._task is not None and lag._task.done())
    assert not lag.overloaded and lag.late_ticks == 0  # reset, not frozen at "overloaded"
    spin_cpu(0.05)
    assert not lag.overloaded
    await lag.stop()  # and stopping it afterwards raises nothing
