"""The prediction log never blocks a request: a full buffer drops (and counts); shutdown drains."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from rtml.core import metrics
from rtml.core.errors import DependencyUnavailable
from rtml.core.schemas import PredictionLogged
from rtml.serving.predictlog import Logged, PredictionLog, encode


class FakeModel:
    name, version, features = "ctr", "1", ("a", "b")


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


def record(i: int) -> Logged:
    return Logged(f"p{i}", FakeModel(), {"user_id": "u"}, [1.0, float(i)], 0.5, False, 1, None)  # type: ignore[arg-type]


def dropped() -> float:
    return metrics.PREDICTION_LOG_DROPPED._value.get()


async def test_full_buffer_drops_and_counts() -> None:
    gate = asyncio.Event()
    producer = FakeProducer(gate=gate)
    log = PredictionLog(producer, capacity=3, linger_s=0)  # type: ignore[arg-type]
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
    log = PredictionLog(producer, capacity=100, linger_s=0)  # type: ignore[arg-type]
    log.start()
    for i in range(20):
        log.offer(record(i))
    await log.close(timeout_s=5)
    assert len(producer.sent) == 20
    assert not log.offer(record(99))  # closed


def test_encoded_record_is_the_published_schema() -> None:
    r = Logged("p1", FakeModel(), {"user_id": "u1", "item_id": "t9"}, [2.0, 0.25], 0.75, True, 123, "t9")  # type: ignore[arg-type]
    got = PredictionLogged.model_validate_json(encode(r))
    assert got == PredictionLogged(
        prediction_id="p1", model="ctr", version="1", entities={"user_id": "u1", "item_id": "t9"},
        features={"a": 2.0, "b": 0.25}, score=0.75, degraded=True, ts=123, item_id="t9",
    )  # fmt: skip


async def test_linger_gathers_a_burst_into_one_publish() -> None:
    calls: list[int] = []

    class Counting(FakeProducer):
        async def send_many(self, topic: str, records: Sequence[tuple[bytes | None, bytes]], headers: Any = None
                            ) -> None:  # fmt: skip
            calls.append(len(records))
            await super().send_many(topic, records, headers)

    producer = Counting()
    log = PredictionLog(producer, capacity=1000, linger_s=0.05)  # type: ignore[arg-type]
    log.start()
    for i in range(10):
        log.offer(record(i))
        await asyncio.sleep(0.001)  # a burst spread over ~10 ms, inside one linger
    await log.close(timeout_s=5)
    assert calls == [10]
