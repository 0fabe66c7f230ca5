"""The prediction log: every prediction goes to ``predictions`` without delaying its response.

Requests ``offer`` records to a bounded queue (never awaiting); one background task drains it in batches
with ``Producer.send_many``. A full queue drops the record and counts it in PREDICTION_LOG_DROPPED: a
Kafka outage must not turn into serving latency or memory growth. A batch the broker refuses is retried
with backoff (new records are dropped meanwhile once the queue fills); ``close`` drains what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from rtml.core import metrics
from rtml.core.errors import DependencyUnavailable
from rtml.core.kafka import Producer
from rtml.core.schemas import PredictionLogged

log = logging.getLogger(__name__)

TOPIC = "predictions"
MAX_BATCH = 1_000


class PredictionLog:
    def __init__(self, producer: Producer, capacity: int) -> None:
        self._producer = producer
        self._queue: asyncio.Queue[PredictionLogged] = asyncio.Queue(maxsize=max(1, capacity))
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._inflight: list[PredictionLogged] = []
        self._idle = asyncio.Event()  # set when nothing is queued or in flight
        self._idle.set()

    def offer(self, record: PredictionLogged) -> bool:
        """Queue a record for publishing; False (and counted) when the buffer is full or closed."""
        if self._closing:
            metrics.PREDICTION_LOG_DROPPED.inc()
            return False
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            metrics.PREDICTION_LOG_DROPPED.inc()
            return False
        self._idle.clear()
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="prediction-log")

    def _take_batch(self, first: PredictionLogged) -> list[PredictionLogged]:
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch

    async def _send(self, batch: list[PredictionLogged]) -> None:
        records = [(r.prediction_id.encode(), r.model_dump_json().encode()) for r in batch]
        await self._producer.send_many(TOPIC, records)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            self._inflight = self._take_batch(await self._queue.get())
            while True:
                try:
                    await self._send(self._inflight)
                    backoff = 0.1
                    break
                except DependencyUnavailable as exc:
                    log.warning("prediction log: %s; retrying %d records in %.1f s",
                                exc.message, len(self._inflight), backoff)  # fmt: skip
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                except Exception:
                    log.exception("prediction log: dropping %d records that cannot be sent", len(self._inflight))
                    metrics.PREDICTION_LOG_DROPPED.inc(len(self._inflight))
                    break
            self._inflight = []
            metrics.PREDICTION_LOG_PENDING.set(self._queue.qsize())
            if self._queue.empty():
                self._idle.set()

    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._inflight)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, let the task publish what is queued (up to ``timeout_s``), then stop it."""
        self._closing = True
        if self._task is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning("prediction log: %d records not published at shutdown", self.pending)
            metrics.PREDICTION_LOG_DROPPED.inc(self.pending)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
