"""The prediction log never blocks a request: a full buffer drops (and counts); shutdown drains."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from rtml.core import metrics
from rtml.core.errors import DependencyUnavailable
from rtml.core.schemas import PredictionLogged
from rtml.serving.predictlog import PredictionLog


class FakeProducer:
    def __init__(self, fail: int = 0, gate: asyncio.Event | None = None) -> None:
        self.sent: list[tuple[bytes | None, bytes]] = []
        self.fail = fail
        self.gate = gate

    async def send_many(self, topic: str, records: Sequence[tuple[bytes | None, bytes]], headers: Any = None) -> None:
        assert topic == "predictions"
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise DependencyUnavailable("kafka", "down")
        self.sent.extend(records)


def record(i: int) -> PredictionLogged:
    return PredictionLogged.model_construct(
        prediction_id=f"p{i}", model="ctr", version="1", entities={"user_id": "u"}, features={"a": 1.0},
        score=0.5, degraded=False, ts=1, item_id=None,
    )  # fmt: skip


def dropped() -> float:
    return metrics.PREDICTION_LOG_DROPPED._value.get()


async def test_full_buffer_drops_and_counts() -> None:
    gate = asyncio.Event()
    producer = FakeProducer(gate=gate)
    log = PredictionLog(producer, capacity=3)  # type: ignore[arg-type]
    log.start()
    before = dropped()
    assert all(log.offer(record(i)) for i in range(3))
    await asyncio.sleep(0.01)  # the drainer takes the first batch and blocks on the broker
    results = [log.offer(record(i)) for i in range(3, 10)]
    assert results.count(False) == 4 and dropped() - before == 4
    gate.set()
    await log.close()
    assert [k for k, _ in producer.sent] == [f"p{i}".encode() for i in range(6)]


async def test_retries_a_refused_batch_and_drains_on_close() -> None:
    producer = FakeProducer(fail=1)
    log = PredictionLog(producer, capacity=100)  # type: ignore[arg-type]
    log.start()
    for i in range(20):
        log.offer(record(i))
    await log.close(timeout_s=5)
    assert len(producer.sent) == 20
    assert not log.offer(record(99))  # closed
