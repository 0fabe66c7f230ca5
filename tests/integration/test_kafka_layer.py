"""The Kafka layer against a real broker: acks, headers, dead letters, commit and redelivery."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord

from rtml.core.kafka import REASON_HEADER, Consumed, ConsumerLoop, Producer, decode_json
from rtml.core.schemas import SCHEMA_HEADER
from rtml.core.settings import Settings

pytestmark = pytest.mark.integration


async def test_published_records_are_consumed_with_schema_header_and_bad_ones_dead_lettered(
    settings: Settings,
) -> None:
    got: list[Consumed[object]] = []

    async def handle(batch: list[Consumed[object]]) -> None:
        got.extend(batch)

    async with Producer(settings) as producer:
        await producer.send_many(
            "events", [(b"u1", orjson.dumps({"n": i})) for i in range(5)] + [(b"u2", b"{not json")]
        )
        loop: ConsumerLoop[object] = ConsumerLoop(
            settings,
            name="t",
            topics=["events"],
            group_id="t",
            decode=decode_json,
            handle=handle,
            producer=producer,
        )
        async with loop:
            await loop.run(timeout=20, count=6)

        dead: list[ConsumerRecord] = []

        async def handle_dead(batch: list[Consumed[ConsumerRecord]]) -> None:
            dead.extend(c.value for c in batch)

        dl: ConsumerLoop[ConsumerRecord] = ConsumerLoop(
            settings,
            name="dl",
            topics=["deadletter"],
            group_id="dl",
            decode=lambda r: r,
            handle=handle_dead,
            producer=producer,
        )
        async with dl:
            await dl.run(timeout=20, count=1)

    assert sorted(c.value["n"] for c in got) == [0, 1, 2, 3, 4]  # type: ignore[index]
    assert all(dict(c.record.headers)[SCHEMA_HEADER] == b"1" for c in got)
    assert len(dead) == 1
    assert dead[0].value == b"{not json"
    assert b"not JSON" in dict(dead[0].headers)[REASON_HEADER]


@pytest.mark.parametrize("in_flight", [1, 2])
async def test_committed_offsets_resume_and_uncommitted_batches_are_redelivered(
    settings: Settings, in_flight: int
) -> None:
    from rtml.core.errors import DependencyUnavailable

    seen: list[int] = []
    fail_once = {"armed": True}

    async def handle(batch: list[Consumed[object]]) -> None:
        if fail_once["armed"]:
            fail_once["armed"] = False
            raise DependencyUnavailable("redis", "simulated outage")
        seen.extend(c.value["n"] for c in batch)  # type: ignore[index]

    async with Producer(settings) as producer:
        await producer.send_many("events", [(b"k", orjson.dumps({"n": i})) for i in range(3)])
        loop: ConsumerLoop[object] = ConsumerLoop(
            settings,
            name="t",
            topics=["events"],
            group_id="g",
            decode=decode_json,
            handle=handle,
            producer=producer,
            max_in_flight=in_flight,
            max_records=1,  # one record per batch, so several batches are in flight
        )
        async with loop:
            await loop.run(timeout=20, count=3)
        # the failed batch came back after the retriable error; with two in flight, the batch handled beside
        # the failed one is handled again after the rewind (at least once; handlers are idempotent)
        assert set(seen) == {0, 1, 2}
        if in_flight == 1:
            assert sorted(seen) == [0, 1, 2]

        await producer.send_many("events", [(b"k", orjson.dumps({"n": 3}))])
        seen.clear()
        again: ConsumerLoop[object] = ConsumerLoop(
            settings,
            name="t2",
            topics=["events"],
            group_id="g",
            decode=decode_json,
            handle=handle,
            producer=producer,
        )
        async with again:
            await again.run(timeout=20, count=1)
    assert seen == [3]  # only what was not committed before


async def test_a_poison_record_is_dead_lettered_and_the_rest_of_its_batch_is_handled(settings: Settings) -> None:
    handled: list[int] = []

    async def handle(batch: list[Consumed[object]]) -> None:
        for c in batch:
            if c.value["n"] == 2:  # type: ignore[index]
                raise ValueError("cannot apply n=2")
        handled.extend(c.value["n"] for c in batch)  # type: ignore[index]

    async with Producer(settings) as producer:
        await producer.send_many("events", [(b"k", orjson.dumps({"n": i})) for i in range(5)])
        loop: ConsumerLoop[object] = ConsumerLoop(
            settings, name="p", topics=["events"], group_id="p", decode=decode_json, handle=handle, producer=producer
        )
        async with loop:
            await loop.run(timeout=20, count=5)
        dead: list[ConsumerRecord] = []

        async def handle_dead(batch: list[Consumed[ConsumerRecord]]) -> None:
            dead.extend(c.value for c in batch)

        dl: ConsumerLoop[ConsumerRecord] = ConsumerLoop(
            settings, name="dl", topics=["deadletter"], group_id="dl", decode=lambda r: r, handle=handle_dead,
            producer=producer,
        )  # fmt: skip
        async with dl:
            await dl.run(timeout=20, count=1)
    assert sorted(handled) == [0, 1, 3, 4]
    assert [orjson.loads(d.value) for d in dead] == [{"n": 2}]
    assert dict(dead[0].headers)[REASON_HEADER] == b"ValueError: cannot apply n=2"


async def test_keys_land_on_the_java_clients_partition_and_big_sends_split_into_batches(settings: Settings) -> None:
    """send_many partitions itself (whole batches per partition): a user's records must land where any Kafka
    client would put them, in order, and a send larger than one batch (256 KiB) must arrive whole."""
    from aiokafka.partitioner import DefaultPartitioner

    got: list[Consumed[object]] = []

    async def handle(batch: list[Consumed[object]]) -> None:
        got.extend(batch)

    pad = "x" * 900
    records = [(f"user-{i % 37}".encode(), orjson.dumps({"n": i, "pad": pad})) for i in range(600)]  # ~560 KB
    records += [(None, orjson.dumps({"n": 600 + i, "pad": ""})) for i in range(5)]
    async with Producer(settings) as producer:
        await producer.send_many("events", records)
        loop: ConsumerLoop[object] = ConsumerLoop(
            settings, name="p", topics=["events"], group_id="p", decode=decode_json, handle=handle, producer=producer
        )
        async with loop:
            await loop.run(timeout=30, count=len(records))
    partitions = sorted({c.record.partition for c in got} | set(range(settings.kafka.partitions)))
    assert sorted(c.value["n"] for c in got) == list(range(605))  # type: ignore[index]
    for c in got:
        if c.record.key is not None:
            assert c.record.partition == DefaultPartitioner()(c.record.key, partitions, partitions)
    keyless = {c.record.partition for c in got if c.record.key is None}
    assert len(keyless) == 1  # one random partition per call for records without a key
    for user in {c.record.key for c in got if c.record.key is not None}:
        ns = [c.value["n"] for c in got if c.record.key == user]  # type: ignore[index]
        assert ns == sorted(ns)  # per-key order kept


async def test_a_loop_that_dies_unexpectedly_restarts_from_the_committed_offsets(settings: Settings) -> None:
    """An unexpected error (here: commit raising something that is not a Kafka error) must not leave a live
    process that consumes nothing, nor skip the batch that was in flight."""
    from rtml.core import metrics

    got: list[int] = []

    async def handle(batch: list[Consumed[object]]) -> None:
        got.extend(c.value["n"] for c in batch)  # type: ignore[index]

    async with Producer(settings) as producer:
        await producer.send_many("events", [(b"k", orjson.dumps({"n": i})) for i in range(6)])
        loop: ConsumerLoop[object] = ConsumerLoop(
            settings, name="sup", topics=["events"], group_id="sup", decode=decode_json, handle=handle,
            producer=producer,
        )  # fmt: skip
        await loop.start()
        real_commit = loop._consumer.commit
        calls = {"n": 0}

        async def flaky_commit(*args: object, **kwargs: object) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a bug in the commit path")
            await real_commit(*args, **kwargs)  # type: ignore[arg-type]

        loop._consumer.commit = flaky_commit  # type: ignore[method-assign]
        before = metrics.CONSUMER_RESTARTS.labels(consumer="sup")._value.get()
        task = loop.run_in_background()
        try:
            for _ in range(300):
                if calls["n"] >= 2 and sorted(set(got)) == list(range(6)):
                    break
                await asyncio.sleep(0.1)
            assert not task.done()  # still consuming after the failure
            await loop.ready()
        finally:
            await loop.shutdown()
    assert metrics.CONSUMER_RESTARTS.labels(consumer="sup")._value.get() == before + 1
    assert sorted(set(got)) == list(range(6))
    assert len(got) > 6  # the first batch was handled, its commit failed, so it was delivered again


async def test_loops_without_a_group_each_read_every_partition_and_leave_no_group(settings: Settings) -> None:
    """Serving's promotions watcher: every replica must see every announcement, and restarts must not leave a
    consumer group per process behind on the brokers."""
    from aiokafka.admin import AIOKafkaAdminClient

    from rtml.core import metrics
    from rtml.core.kafka import client_options

    seen: dict[str, list[int]] = {"a": [], "b": []}

    def records(start: int) -> list[tuple[bytes, bytes]]:  # spread over every partition
        return [(f"k{i}".encode(), orjson.dumps({"n": i})) for i in range(start, start + 40)]

    async def until(done: Any) -> None:
        for _ in range(300):
            if done():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"not done in 30 s: {seen}")

    async with Producer(settings) as producer:
        await producer.send_many("models", records(0))
        loops = []
        for name in seen:

            async def handle(batch: list[Consumed[object]], name: str = name) -> None:
                seen[name].extend(c.value["n"] for c in batch)  # type: ignore[index]

            loops.append(ConsumerLoop(settings, name=f"nogroup-{name}", topics=["models"], group_id=None,
                                      decode=decode_json, handle=handle, producer=producer))  # fmt: skip
        for loop in loops:
            await loop.start()
        # once the first 40 are handled, a failure after handling the next batch, before its position is kept:
        # the restarted loop takes that batch again, and nothing it had handled before
        real = loops[0]._commit_offsets
        armed = {"fail": False, "failed": 0}

        async def flaky(*args: object) -> None:
            if armed["fail"]:
                armed["fail"], armed["failed"] = False, armed["failed"] + 1
                raise RuntimeError("a bug after handling")
            await real(*args)  # type: ignore[arg-type]

        loops[0]._commit_offsets = flaky  # type: ignore[method-assign]
        tasks = [loop.run_in_background() for loop in loops]
        try:
            await until(lambda: all(sorted(set(v)) == list(range(40)) for v in seen.values()))
            armed["fail"] = True
            await producer.send_many("models", records(40))
            # ... until the restarted loop took the failed batch again (after its 1 s back-off)
            await until(lambda: all(sorted(set(v)) == list(range(80)) for v in seen.values()) and len(seen["a"]) > 80)
            await until(lambda: loops[0].healthy)
            assert not any(t.done() for t in tasks)
            partitions = {tp.partition for tp in loops[1]._consumer.assignment()}
            assert partitions == set(range(settings.kafka.partitions))  # all of them, to each loop
            for loop in loops:
                await loop.ready()
                await loop._refresh_lag()
                lags = {tp.partition: metrics.CONSUMER_LAG.labels(loop.name, "", tp.topic, str(tp.partition))
                        ._value.get() for tp in loop._consumer.assignment()}  # fmt: skip
                assert lags == dict.fromkeys(partitions, 0), lags
        finally:
            for loop in loops:
                await loop.shutdown()
    assert sorted(seen["b"]) == list(range(80))  # each record once
    a = Counter(seen["a"])
    assert all(a[n] == 1 for n in range(40)), a  # resumed from its position, not from the start
    assert set(a) == set(range(80)) and len(seen["a"]) > 80  # the failed batch redelivered, not skipped
    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    await admin.start()
    try:
        groups = await admin.list_consumer_groups()
    finally:
        await admin.close()
    assert not [g for g in groups if "nogroup" in str(g) or settings.topic_prefix in str(g)], groups
