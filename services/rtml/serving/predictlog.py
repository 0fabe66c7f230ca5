"""The prediction log: every prediction goes to ``predictions`` without delaying its response.

Requests ``offer`` records to a bounded queue (never awaiting); one background task drains it in batches
with ``Producer.send_many``, waiting ``LINGER_S`` after the first record so a busy replica sends a few fat
produce requests a second rather than one per request (each costs the broker far more than a record), and
encoding the JSON there, off the request path. A full queue drops the record and counts it in PREDICTION_LOG_DROPPED: a
Kafka outage must not turn into serving latency or memory growth. A batch the broker refuses is retried
with backoff (new records are dropped meanwhile once the queue fills); ``close`` drains what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import NamedTuple

import orjson

from rtml.core import metrics
from rtml.core.errors import DependencyUnavailable
from rtml.core.kafka import Producer
from rtml.serving.inference.session import LoadedModel

log = logging.getLogger(__name__)

TOPIC = "predictions"
MAX_BATCH = 1_000
LINGER_S = 0.02


class Logged(NamedTuple):
    """One prediction as the request path hands it over (encoded later, as ``PredictionLogged`` JSON).

    During a rollout, ``shadow`` holds the score of the version that did not answer (version -> score), and
    ``extra`` the inputs that version has and the answering ``model`` lacks: they are added to the record's
    ``features``, so the one features dict an example keeps holds every input of both versions (retraining
    and the candidate's online quality read it). The answering model's own inputs are never overwritten.
    """

    prediction_id: str
    model: LoadedModel  # the version that answered
    entities: Mapping[str, str]
    row: list[float]  # the model's inputs, in ``model.features`` order
    score: float
    degraded: bool
    ts: int
    item_id: str | None
    shadow: Mapping[str, float] | None = None
    extra: Mapping[str, float] | None = None


def encode(r: Logged) -> bytes:
    """The record's value: the JSON of ``rtml.core.schemas.PredictionLogged``."""
    features = dict(zip(r.model.features, r.row, strict=True))
    if r.extra:
        features = {**r.extra, **features}  # the answering version's own values win
    return orjson.dumps({
        "prediction_id": r.prediction_id, "model": r.model.name, "version": r.model.version,
        "entities": r.entities, "features": features, "score": r.score,
        "degraded": r.degraded, "ts": r.ts, "item_id": r.item_id, "shadow": r.shadow or {},
    })  # fmt: skip


class PredictionLog:
    def __init__(self, producer: Producer, capacity: int, linger_s: float = LINGER_S) -> None:
        self._producer = producer
        self._linger_s = linger_s
        self._queue: asyncio.Queue[Logged] = asyncio.Queue(maxsize=max(1, capacity))
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._inflight: list[Logged] = []
        self._idle = asyncio.Event()  # set when nothing is queued or in flight
        self._idle.set()

    def offer(self, record: Logged) -> bool:
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

    def _take_batch(self, first: Logged) -> list[Logged]:
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch

    async def _send(self, batch: list[Logged]) -> None:
        records = [(r.prediction_id.encode(), encode(r)) for r in batch]
        await self._producer.send_many(TOPIC, records)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            first = await self._queue.get()
            if self._linger_s > 0 and not self._closing:
                await asyncio.sleep(self._linger_s)
            self._inflight = self._take_batch(first)
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
