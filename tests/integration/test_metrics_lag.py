"""rtml_consumer_lag_records on the real broker: exact while records wait, 0 once they are committed.

On Tansu the ListOffsets end is too low (the base offset of the last batch) and only the fetch responses' high
watermark is exact; on Apache Kafka both are. These tests assert the exact number of waiting records, so they
fail if the lag relied on the listed end alone (Tansu) or on a stale fetch alone.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from rtml.core.kafka import Consumed, ConsumerLoop, Producer, create_topics, decode_json
from rtml.core.settings import Settings
from tests.helpers import eventually

pytestmark = pytest.mark.integration


def lags(loop: ConsumerLoop[Any]) -> dict[int, float]:
    """partition -> the lag gauge's value, for the series of this loop's consumer and group."""
    out: dict[int, float] = {}
    for family in REGISTRY.collect():
        if family.name == "rtml_consumer_lag_records":
            for s in family.samples:
                if s.labels["consumer"] == loop.name and s.labels["group"] == loop.group:
                    out[int(s.labels["partition"])] = s.value
    return out


class Gate:
    """A handler that records what it got and blocks while the gate is closed."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.got: list[Consumed[Any]] = []

    async def handle(self, batch: list[Consumed[Any]]) -> None:
        await self.open.wait()
        self.got.extend(batch)


def loop_of(settings: Settings, producer: Producer, gate: Gate) -> ConsumerLoop[Any]:
    return ConsumerLoop(
        settings, name="lagtest", topics=["events"], group_id="lagtest", decode=decode_json, handle=gate.handle,
        producer=producer,
    )  # fmt: skip


async def send(producer: Producer, start: int, n: int) -> None:
    await producer.send_many(
        "events", [(f"u{i % 7}".encode(), orjson.dumps({"n": i})) for i in range(start, start + n)]
    )


async def test_lag_counts_waiting_records_and_drops_to_zero_once_committed(make_settings: Any) -> None:
    settings: Settings = make_settings(kafka={"lag_interval_s": 0.2})

    await create_topics(settings)
    async with Producer(settings) as producer:
        await send(producer, 0, 30)  # before any member exists: the group has no committed offset yet
        gate = Gate()
        loop = loop_of(settings, producer, gate)
        await loop.start()
        loop.run_in_background()
        try:
            # 1. nothing committed yet: every record waits, the handler holds the first batch
            async def all_30_wait() -> dict[int, float]:
                now = lags(loop)
                assert sum(now.values()) == 30, now
                return now

            waiting = await eventually(all_30_wait)
            assert all(v > 0 for v in waiting.values()) and set(waiting) == {0, 1}
            gate.open.set()

            async def caught_up() -> None:
                assert len(gate.got) == 30
                assert lags(loop) == {0: 0.0, 1: 0.0}

            await eventually(caught_up)
            per_partition = Counter(c.record.partition for c in gate.got)
            assert waiting == {p: float(n) for p, n in per_partition.items()}  # exact, per partition

            # 2. records that arrive while the member runs and its handler is stuck
            gate.open.clear()
            await send(producer, 30, 12)

            async def twelve_wait() -> None:
                assert sum(lags(loop).values()) == 12, lags(loop)

            await eventually(twelve_wait)
            gate.open.set()
            await eventually(caught_up_to(gate, loop, 42))
        finally:
            gate.open.set()
            await loop.shutdown()
        assert lags(loop) == {}  # a member that left reports nothing: its partitions are someone else's

        # 3. a new member of the same group starts from the committed offsets: only the new records lag
        await send(producer, 42, 5)
        gate2 = Gate()
        loop2 = loop_of(settings, producer, gate2)
        await loop2.start()
        loop2.run_in_background()
        try:

            async def five_wait() -> None:
                assert sum(lags(loop2).values()) == 5, lags(loop2)

            await eventually(five_wait)
            gate2.open.set()
            await eventually(caught_up_to(gate2, loop2, 5))
            assert sorted(c.value["n"] for c in gate2.got) == list(range(42, 47))
        finally:
            gate2.open.set()
            await loop2.shutdown()


def caught_up_to(gate: Gate, loop: ConsumerLoop[Any], n: int) -> Any:
    async def check() -> None:
        assert len(gate.got) == n
        assert lags(loop) == {0: 0.0, 1: 0.0}

    return check
