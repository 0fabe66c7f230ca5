"""How far behind its event loop a process runs, and whether that is overload of its own: the signal the
in-flight limits cannot see.

Why. ``RTML_PREDICT_MAX_IN_FLIGHT`` and ``RTML_INGEST_MAX_IN_FLIGHT`` count requests a process has started.
When a dependency is slow those pile up and the limit refuses the excess at once. When the process's own CPU is
the bottleneck, requests wait *before* that count sees them: in socket buffers and in the loop's queue of ready
callbacks. The count stays low while callers wait (measured at twice capacity: admitted p99 8 s, refused p99
0.1-2.4 s; docs/reliability.md#overload). Every request waits behind that backlog, a refusal included, so a
refusal is only fast while the backlog is short.

How. A timer that should fire every ``INTERVAL_S`` fires late by as long as the loop is behind. While the loop is
``max_lag_s`` behind twice in a row (two late ticks, or a late tick and the next one already that overdue) *and*
the loop's thread spent most of the recent past on the CPU, new requests are refused (503 + Retry-After). A
refusal costs a fraction of an answer, so the backlog drains within a few loop turns and admission resumes: the
process keeps answering most of what its CPU allows (refusals cost CPU too: 83 % of the admitted rate without
the limit, measured) and the rest is refused within a few ``max_lag_s``. Refusing is all or nothing while the
loop is behind; when refusals alone take a whole core, admission stops.

Twice in a row, because one long callback (a 10,000-event batch, a garbage collection) makes one tick late
without leaving a backlog: the requests that waited behind it are answered, not refused, unless they themselves
keep the loop behind.

The CPU condition tells overload of this process from a loop that is late because the machine did not run it
(another process had the core, a model loading in a worker thread held the GIL): refusing then would not
shorten anything, so it does not. The flip side: a process that gets less than ``MIN_BUSY`` of a core (more
workers than cores, a CPU quota under 0.7 core, neighbours taking the cores) never refuses for lag.

The same idea as Node's toobusy (loop lag) with the overload test of Envoy's overload manager (resource
pressure of the process itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from rtml.core import metrics
from rtml.core.errors import Overloaded

log = logging.getLogger(__name__)

INTERVAL_S = 0.005  # a tick every 5 ms: 200 wake-ups per second, a few microseconds each
BUSY_HALF_LIFE_S = 0.05  # the loop thread's CPU share is averaged over about this long
MIN_BUSY = 0.7  # refuse only while the loop's thread ran at least this share of the time


class LoopLag:
    """The lag of the running event loop, sampled by a timer task (``start``/``stop`` inside the loop).

    ``max_lag_s`` 0 turns refusing off (the lag is still measured and exported)."""

    def __init__(self, max_lag_s: float, interval_s: float = INTERVAL_S, min_busy: float = MIN_BUSY) -> None:
        self.max_lag_s = max_lag_s
        self.interval_s = interval_s
        self.min_busy = min_busy
        self.lag_s = 0.0  # how late the last tick ran
        self.late_ticks = 0  # ticks in a row that ran max_lag_s late or more
        self.busy = 0.0  # the loop thread's recent share of CPU time (0..1, decaying average)
        self._due = math.inf  # when the next tick should run (time.monotonic)
        self.record: list[float] | None = None  # when a list: every tick's lag is appended (benchmarks)
        self._task: asyncio.Task[None] | None = None

    @property
    def overloaded(self) -> bool:
        """Whether a new request should be refused now: the loop is behind and it is this process's own work."""
        if self.max_lag_s <= 0 or self.busy < self.min_busy or not self.late_ticks:
            return False
        return self.late_ticks >= 2 or time.monotonic() - self._due >= self.max_lag_s

    def behind_ms(self) -> int:
        """How far behind the loop is now, in whole ms."""
        return round(1000 * max(self.lag_s, time.monotonic() - self._due))

    def refusal(self) -> Overloaded:
        """The 503 for a request refused because ``overloaded`` (the caller counts it in its shed counter)."""
        return Overloaded(f"this process is {self.behind_ms()} ms behind on its work; retry shortly")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # _run never raises anything else: it logs and resets

    def _reset(self) -> None:
        """Nothing measures the loop any more: no verdict may rest on the last values."""
        self._due, self.lag_s, self.late_ticks, self.busy = math.inf, 0.0, 0, 0.0
        metrics.EVENT_LOOP_BUSY.set(0.0)

    async def _run(self) -> None:
        try:
            await self._sample()
        except asyncio.CancelledError:
            raise
        except Exception:  # never leave a frozen "overloaded" behind: that would refuse every request
            log.exception("the event-loop lag detector stopped; nothing is refused for lag any more")
        finally:
            self._reset()

    async def _sample(self) -> None:
        wall, cpu = time.monotonic(), time.thread_time()  # the loop's own thread: the one a backlog waits for
        observe, gauge_busy = metrics.EVENT_LOOP_LAG.observe, metrics.EVENT_LOOP_BUSY
        while True:
            self._due = wall + self.interval_s
            await asyncio.sleep(self.interval_s)
            now, now_cpu = time.monotonic(), time.thread_time()
            elapsed = now - wall
            self.lag_s = max(0.0, now - self._due)
            self.late_ticks = self.late_ticks + 1 if self.max_lag_s > 0 and self.lag_s >= self.max_lag_s else 0
            if self.record is not None:
                self.record.append(self.lag_s)
            if elapsed > 0:
                share = min(1.0, (now_cpu - cpu) / elapsed)
                weight = 1.0 - 0.5 ** (elapsed / BUSY_HALF_LIFE_S)
                self.busy += weight * (share - self.busy)
            wall, cpu = now, now_cpu
            observe(self.lag_s)
            gauge_busy.set(self.busy)
