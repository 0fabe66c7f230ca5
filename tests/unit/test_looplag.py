"""The event-loop lag detector (rtml.core.looplag) on a real event loop: what counts as overload of the
process itself (behind, and busy on its own CPU work) and what does not (behind while not running).

The loop is held up for real (a CPU spin or a blocking sleep in the loop's thread, in chunks that let the
timer run between them). The thresholds leave wide margins: a chunk (tests.helpers.LOOP_CHUNK_S) is 6x the
lag limit, and the CPU share asked for (0.2) is far below what a spinning thread gets on a busy machine.
"""

from __future__ import annotations

import asyncio
import time

from rtml.core.looplag import LoopLag
from tests.helpers import hold_up_loop, spin_cpu, until

LIMIT_S = 0.005


async def test_a_loop_behind_on_its_own_cpu_work_is_overloaded_until_it_catches_up() -> None:
    lag = LoopLag(LIMIT_S, min_busy=0.2)
    lag.start()
    try:
        await asyncio.sleep(0.05)
        assert not lag.overloaded  # idle: every tick on time

        verdicts = await hold_up_loop(lag, 0.5)
        assert verdicts[-1] is True  # after half a second of CPU work in the loop's thread
        assert lag.busy > 0.2 and lag.behind_ms() >= LIMIT_S * 1000

        await until(lambda: not lag.overloaded)
        assert not lag.overloaded  # caught up: new requests are admitted again
        assert lag.lag_s < LIMIT_S
    finally:
        await lag.stop()


async def test_one_long_callback_without_a_backlog_behind_it_is_not_overload() -> None:
    # a 10,000-event batch or a garbage collection: one tick late, then the loop is on time again
    lag = LoopLag(0.02, min_busy=0.0)  # 20 ms: the check below comes well within it after the tick
    lag.start()
    try:
        await asyncio.sleep(0.05)
        spin_cpu(0.15)
        await asyncio.sleep(0.001)  # one turn for the overdue tick, then this
        assert lag.lag_s >= 0.1 and lag.late_ticks == 1  # the tick saw the stall ...
        assert not lag.overloaded  # ... but nothing queued behind it keeps the loop late
        await asyncio.sleep(0.03)
        assert lag.late_ticks == 0 and not lag.overloaded
    finally:
        await lag.stop()


async def test_a_loop_late_because_its_thread_did_not_run_is_not_overloaded() -> None:
    # a blocking sleep stands for the machine not running the process (another process had the core, a CPU
    # quota ran out): refusing would not shorten anything
    lag = LoopLag(LIMIT_S, min_busy=0.2)
    lag.start()
    try:
        await asyncio.sleep(0.05)
        verdicts = await hold_up_loop(lag, 0.5, block=time.sleep)
        assert lag.lag_s >= LIMIT_S  # it is behind ...
        assert lag.busy < 0.2  # ... but not on its own work
        assert not any(verdicts)
    finally:
        await lag.stop()


async def test_a_limit_of_zero_never_refuses_but_still_measures() -> None:
    lag = LoopLag(0, min_busy=0.2)
    lag.start()
    try:
        verdicts = await hold_up_loop(lag, 0.3)
        assert not any(verdicts)
        assert lag.lag_s >= LIMIT_S and lag.busy > 0.2
    finally:
        await lag.stop()


async def test_a_stopped_detector_is_never_overloaded() -> None:
    lag = LoopLag(LIMIT_S, min_busy=0.0)
    spin_cpu(0.05)
    assert not lag.overloaded  # never started: no tick is due
    lag.start()
    verdicts = await hold_up_loop(lag, 0.2)
    assert verdicts[-1] is True
    await lag.stop()
    spin_cpu(0.05)
    assert not lag.overloaded  # no tick is due once stopped, however long the loop is held up
