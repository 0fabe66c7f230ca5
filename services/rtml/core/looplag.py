"""How far behind its event loop a process runs, and whether that is overload of its own: the signal the
in-flight limits cannot see.

Why. ``RTML_PREDICT_MAX_IN_FLIGHT`` and ``RTML_INGEST_MAX_IN_FLIGHT`` count requests a process has started.
When a dependency is slow those pile up and the limit refuses the excess at once. When the process's own CPU is
the bottleneck, requests wait *before* that count sees them: in socket buffers and in the loop's queue of ready
callbacks. The count stays low while callers wait (measured at twice capacity: admitted p99 8 s, refused p99
0.1-2.4 s; docs/reliability.md#overload). Every request waits behind that backlog, a refusal included, so a
refusal is only fast while the backlog is short.

How. A timer that should fire every ``INTERVAL_S`` fires late by as long as the loop is behind. That lateness
drives a cap on the requests the process has in flight, the way TCP's congestion window follows loss (AIMD,
also what Envoy's and Netflix's adaptive concurrency limits do with latency):

- a tick ``max_lag_s`` late or more, while the loop's thread spent most of the recent past on the CPU, halves
  the cap from the requests in flight (the most of: now, and what admissions saw since the tick before), never
  below 1;
- every other tick raises it by one; past ``CAP_CEILING`` it is gone;
- a request that finds the cap full is refused at once (503 + Retry-After). The cap counts every request in
  flight, those awaiting Redis or the broker too.

Why a cap and not "refuse everything while behind". When the CPU is the bottleneck, how long the loop takes
to come back to its sockets is how much admitted work each turn runs. Refusing all while behind and admitting
all once caught up made the loop swing between the two: the turn after it caught up admitted every request
that had queued meanwhile, and the refusals read in the turns after waited behind that batch (refused p99
18 ms at a 5 ms limit, measured). The cap settles where the loop keeps about ``max_lag_s`` (benchmarks/
overload_cpu.py). A request that finds nothing else in flight is always taken, so a capped process still makes
progress. Lateness with nothing in flight lowers nothing: it did not come from requests, and refusing them
would not shorten it. One late tick with requests in flight does (one long callback, a garbage collection),
and requests started together after it may be refused for the few ticks the cap takes to grow back: waiting
for two late ticks in a row measured worse at twice capacity (refused p99 8.0 against 6.4 ms, the first
half-second's p99 80-176 against 54 ms; ``--confirm-ticks 2``).

The CPU condition tells overload of this process from a loop that is late because the machine did not run it
(another process had the core, a model loading in a worker thread held the GIL): refusing then would not
shorten anything, so such a tick counts as on time. The flip side: a process that gets less than ``MIN_BUSY``
of a core (more workers than cores, a CPU quota under 0.7 core, neighbours taking the cores) never lowers its
cap.

Only a detector told what is in flight (``watch``: serving's fast path, ingest's admission) keeps a cap; in the
other services it only measures.

The same idea as Node's toobusy (loop lag) with the overload test of Envoy's overload manager (resource
pressure of the process itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from rtml.core import metrics
from rtml.core.errors import Overloaded

log = logging.getLogger(__name__)

INTERVAL_S = 0.005  # a tick every 5 ms: 200 wake-ups per second, a few microseconds each
BUSY_HALF_LIFE_S = 0.05  # the loop thread's CPU share is averaged over about this long
MIN_BUSY = 0.7  # lower the cap only while the loop's thread ran at least this share of the time
CONFIRM_TICKS = 1  # late ticks in a row before the cap is halved (2 measured worse: see the module docstring)
CAP_CEILING = 1024.0  # a cap raised past this is lifted (far above any in-flight limit a process would set)


class LoopLag:
    """The lag of the running event loop, sampled by a timer task (``start``/``stop`` inside the loop).

    ``max_lag_s`` 0 turns refusing off (the lag is still measured and exported)."""

    def __init__(
        self,
        max_lag_s: float,
        interval_s: float = INTERVAL_S,
        min_busy: float = MIN_BUSY,
        confirm_ticks: int = CONFIRM_TICKS,
    ) -> None:
        self.max_lag_s = max_lag_s
        self.interval_s = interval_s
        self.min_busy = min_busy
        self.confirm_ticks = confirm_ticks
        self.lag_s = 0.0  # how late the last tick ran
        self.cap = math.inf  # requests in flight admitted (AIMD on the lag); inf: no cap
        self._peak = 0  # the most requests in flight ``admits`` was asked about since the last tick
        self._late = 0  # late busy ticks in a row since the last halving
        self._in_flight: Callable[[], int] | None = None
        self.busy = 0.0  # the loop thread's recent share of CPU time (0..1, decaying average)
        self._due = math.inf  # when the next tick should run (time.monotonic)
        self.record: list[float] | None = None  # when a list: every tick's lag is appended (benchmarks)
        self._task: asyncio.Task[None] | None = None

    def watch(self, in_flight: Callable[[], int]) -> None:
        """Keep a cap on requests, counted by ``in_flight``; a detector nothing watches only measures."""
        self._in_flight = in_flight

    def admits(self, in_flight: int) -> bool:
        """Whether a new request may start with ``in_flight`` others already started and not finished."""
        if in_flight > self._peak:
            self._peak = in_flight
        return in_flight < self.cap

    def refusal(self) -> Overloaded:
        """The 503 for a request ``admits`` turned away (the caller counts it in its shed counter)."""
        if self.cap == math.inf:  # not capped (a caller that did not ask ``admits`` first): no count to give
            return Overloaded("this process is behind on its own work; retry shortly")
        n = math.ceil(self.cap)
        return Overloaded(
            f"this process is behind on its own work and takes {n} request{'s' if n > 1 else ''} at a time until"
            " it catches up; retry shortly"
        )

    def start(self) -> None:
        if self._task is None or self._task.done():  # (done: it failed, logged and reset; measure again)
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # _run never raises anything else: it logs and resets

    def _reset(self) -> None:
        """Nothing measures the loop any more: no verdict may rest on the last values."""
        self._due, self.lag_s, self.busy, self.cap, self._peak, self._late = math.inf, 0.0, 0.0, math.inf, 0, 0
        metrics.EVENT_LOOP_BUSY.set(0.0)
        metrics.EVENT_LOOP_CAP.set(math.inf)

    async def _run(self) -> None:
        try:
            await self._sample()
        except asyncio.CancelledError:
            raise
        except Exception:  # never leave a frozen cap behind: it would refuse what the process could take
            log.exception("the event-loop lag detector stopped; nothing is refused for lag any more")
        finally:
            self._reset()

    async def _sample(self) -> None:
        wall, cpu = time.monotonic(), time.thread_time()  # the loop's own thread: the one a backlog waits for
        self._peak = self._late = 0
        observe, gauge_busy = metrics.EVENT_LOOP_LAG.observe, metrics.EVENT_LOOP_BUSY
        while True:
            self._due = wall + self.interval_s
            await asyncio.sleep(self.interval_s)
            now, now_cpu = time.monotonic(), time.thread_time()
            elapsed = now - wall
            self.lag_s = max(0.0, now - self._due)
            if self.record is not None:
                self.record.append(self.lag_s)
            if elapsed > 0:
                share = min(1.0, (now_cpu - cpu) / elapsed)
                weight = 1.0 - 0.5 ** (elapsed / BUSY_HALF_LIFE_S)
                self.busy += weight * (share - self.busy)
            wall, cpu = now, now_cpu
            observe(self.lag_s)
            gauge_busy.set(self.busy)
            self.adjust_cap()

    def adjust_cap(self) -> None:
        """Each tick's step of the cap, from the tick's lag, the CPU share and the requests in flight (nothing when
        refusing is off or nothing is watched)."""
        if self.max_lag_s <= 0 or self._in_flight is None:
            return
        if self.lag_s >= self.max_lag_s and self.busy >= self.min_busy:
            self._late += 1
            in_flight = max(self._peak, self._in_flight())
            if self._late >= self.confirm_ticks and in_flight:  # behind on its own work: halve what it had
                self.cap = max(1.0, min(self.cap, in_flight) / 2)
                self._late = 0
        else:
            self._late = 0
            if self.cap < math.inf:
                self.cap = self.cap + 1 if self.cap < CAP_CEILING else math.inf
        self._peak = 0
        metrics.EVENT_LOOP_CAP.set(math.ceil(self.cap) if self.cap < math.inf else math.inf)
