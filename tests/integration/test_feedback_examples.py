"""The examples store on a real broker: Parquet files from ``rtml.examples``, offsets committed only after
the rows are on disk, dead letters for invalid records, flush before a rebalance, the service's wiring."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY

from rtml.core.kafka import REASON_HEADER, Consumed, Producer
from rtml.core.schemas import Example
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.feedback.app import create_app
from rtml.feedback.examples import ExamplesWriter, examples_loop, read_examples
from tests.integration.test_feedback_service import consume, prediction, publish_prediction, service, wait_for

pytestmark = pytest.mark.integration

DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def example(pid: str, *, model: str = "ctr", t: int = T0, label: float = 1.0, clicks: float | None = 2.0) -> Example:
    return Example(
        prediction_id=pid, model=model, version="5", entities={"user_id": "u1"},
        features={"user_clicks_5m": clicks, "item_ctr_1h": 0.5}, score=0.75, label=label,
        predicted_at=t, labelled_at=t + 30_000,
    )  # fmt: skip


async def publish(settings: Settings, records: list[tuple[bytes, bytes]]) -> None:
    async with Producer(settings) as producer:
        await producer.send_many("examples", records)


def keyed(*examples: Example) -> list[tuple[bytes, bytes]]:
    return [(ex.prediction_id.encode(), ex.model_dump_json().encode()) for ex in examples]


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))


def stored(model: str) -> float:
    return REGISTRY.get_sample_value("rtml_examples_stored_total", {"model": model}) or 0.0


async def test_examples_land_in_parquet_per_model_and_day_deduplicated_on_read_and_bad_ones_dead_lettered(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"examples_dir": tmp_path, "examples_flush_s": 0.2})
    a, b, f = example("a", label=0.0), example("b", t=T0 + DAY, clicks=None), example("f", model="fraud")
    invalid = example("x").model_dump(mode="json")
    del invalid["label"]
    before = stored("ctr")
    # "a" twice, byte-identical, as the join re-publishes on redelivery
    await publish(s, [*keyed(a, b, f, a), (b"x", orjson.dumps(invalid))])

    async with Producer(s) as producer:
        loop = examples_loop(s, producer, ExamplesWriter(s))
        async with loop:
            await loop.run(timeout=30, count=5)

    names = files(tmp_path)
    assert {n.rsplit("/", 1)[0] for n in names} == {
        "model=ctr/date=2026-01-01", "model=ctr/date=2026-01-02", "model=fraud/date=2026-01-01"
    }  # fmt: skip
    assert all(n.rsplit("/", 1)[1].startswith("part-") for n in names)
    assert not [p for p in tmp_path.rglob(".*")]
    assert stored("ctr") - before == 3  # what was delivered, the duplicate included: dedup is the reader's

    whole = ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()
    assert sorted(zip(whole.column("model").to_pylist(), whole.column("date").to_pylist(), strict=True)) == [
        ("ctr", "2026-01-01"), ("ctr", "2026-01-01"), ("ctr", "2026-01-02"), ("fraud", "2026-01-01")
    ]  # fmt: skip

    ctr = read_examples(tmp_path, "ctr")
    assert ctr.prediction_ids == ["a", "b"]
    assert ctr.labels.tolist() == [0.0, 1.0]
    assert ctr.predicted_at.tolist() == [T0, T0 + DAY]
    assert ctr.matrix(["user_clicks_5m", "item_ctr_1h"], {"user_clicks_5m": -1.0}).tolist() == [
        [2.0, 0.5], [-1.0, 0.5]
    ]  # fmt: skip
    assert ctr.scores.tolist() == [0.75, 0.75] and ctr.versions == ["5", "5"]
    assert read_examples(tmp_path, "fraud").prediction_ids == ["f"]

    [dead] = await consume(s, "deadletter", 1)
    assert orjson.loads(dead.value) == invalid
    assert dict(dead.headers)[REASON_HEADER] == b"UnprocessableRecord: not an example: label: Field required"


async def test_offsets_are_committed_only_after_the_rows_are_on_disk(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(update={"examples_dir": tmp_path, "examples_flush_rows": 100, "examples_flush_s": 3600})
    await publish(s, keyed(*(example(f"p{i}", t=T0 + i) for i in range(3))))

    async with Producer(s) as producer:
        # 1. handled and buffered, then the process dies before any flush: nothing written, nothing committed
        writer = ExamplesWriter(s)
        loop = examples_loop(s, producer, writer)
        async with loop:
            task = asyncio.create_task(loop.run())
            await wait_for(lambda: writer.buffered == 3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert files(tmp_path) == [] and loop.processed == 0

        # 2. the next member of the group gets all three again; it stops cleanly: flushed, then committed
        writer = ExamplesWriter(s)
        loop = examples_loop(s, producer, writer)
        async with loop:
            task = asyncio.create_task(loop.run())
            await wait_for(lambda: writer.buffered == 3)
            assert files(tmp_path) == []  # neither full nor old: still buffered
            await loop.stop()
            assert await task == 3
        assert [len(pq.read_table(tmp_path / n)) for n in files(tmp_path)] == [3]
        assert read_examples(tmp_path, "ctr").prediction_ids == ["p0", "p1", "p2"]

        # 3. committed: a third member (writing every record at once) gets nothing again, only what is new
        await publish(s, keyed(example("p3", t=T0 + 3)))
        one = s.model_copy(update={"examples_flush_rows": 1})
        loop = examples_loop(one, producer, ExamplesWriter(one))
        async with loop:
            assert await loop.run(timeout=30, count=1) == 1
    assert read_examples(tmp_path, "ctr").prediction_ids == ["p0", "p1", "p2", "p3"]
    assert len(files(tmp_path)) == 2


class PeakWriter(ExamplesWriter):
    peak = 0

    async def handle(self, batch: list[Consumed[Example]]) -> None:
        await super().handle(batch)
        self.peak = max(self.peak, self.buffered)


async def test_a_full_buffer_is_written_before_more_is_fetched(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(update={"examples_dir": tmp_path, "examples_flush_rows": 2, "examples_flush_s": 3600})
    exs = [example(f"p{i}", t=T0 + i) for i in range(7)]
    async with Producer(s) as producer:
        await producer.send_many("examples", [(b"same-partition", ex.model_dump_json().encode()) for ex in exs])
        writer = PeakWriter(s)
        loop = examples_loop(s, producer, writer)
        async with loop:
            assert await loop.run(timeout=30, count=6) == 6  # three full buffers written and committed
    assert writer.peak == 2
    names = [n.rsplit("/", 1)[1] for n in files(tmp_path)]
    partition = names[0].split("-")[1]
    assert names == [f"part-{partition}-{first}-{first + 1}.parquet" for first in (0, 2, 4)]
    assert [len(pq.read_table(tmp_path / n)) for n in files(tmp_path)] == [2, 2, 2]


async def test_a_member_writes_and_commits_its_buffer_before_its_partitions_are_revoked(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"examples_dir": tmp_path, "examples_flush_rows": 100, "examples_flush_s": 3600})
    exs = [example(f"p{i}", t=T0 + i) for i in range(20)]
    await publish(s, keyed(*exs))
    async with Producer(s) as producer:
        first_writer = ExamplesWriter(s)
        first = examples_loop(s, producer, first_writer)
        async with first:
            first_task = asyncio.create_task(first.run())
            await wait_for(lambda: first_writer.buffered == 20)
            assert files(tmp_path) == []
            # a second member joins: the first one's partitions are revoked, so it must write them now
            second_writer = ExamplesWriter(s)
            second = examples_loop(s, producer, second_writer)
            async with second:
                second_task = asyncio.create_task(second.run())
                await wait_for(lambda: first.processed == 20, timeout=60)
                assert sum(len(pq.read_table(tmp_path / n)) for n in files(tmp_path)) == 20
                await asyncio.sleep(1.0)  # let the second member fetch, if anything were uncommitted
                await second.stop()
                await first.stop()
                assert await second_task == 0  # nothing delivered twice
                await first_task
    assert sorted(read_examples(tmp_path, "ctr").prediction_ids) == sorted(ex.prediction_id for ex in exs)


async def test_the_feedback_service_stores_the_examples_it_joins(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(update={"examples_dir": tmp_path, "examples_flush_s": 0.2})
    p = prediction("pred-store")
    await publish_prediction(s, p)
    async with service(s) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        r = await client.post("/v1/outcomes", json={"prediction_id": "pred-store", "label": 1, "ts": now_ms()})
        assert r.status_code == 202
        await wait_for(lambda: bool(files(tmp_path)), timeout=60)
    got = read_examples(tmp_path, "ctr")
    assert got.prediction_ids == ["pred-store"]
    assert got.matrix(["user_clicks_5m", "item_ctr_1h", "user_items_24h"], {"user_items_24h": 9.0}).tolist() == [
        [3.0, 0.125, 9.0]
    ]
    assert got.scores.tolist() == [0.75] and got.versions == ["7"] and got.item_ids == ["i9"]


async def test_readiness_fails_naming_the_examples_store_when_its_loop_is_gone(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"examples_dir": tmp_path})
    app = create_app(s)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:
            await wait_for(lambda: app.state.examples_loop.healthy)
            assert (await client.get("/readyz")).status_code == 200
            await app.state.examples_loop.shutdown()
            r = await client.get("/readyz")
    assert r.status_code == 503
    assert list(r.json()["failed"]) == ["examples"]
