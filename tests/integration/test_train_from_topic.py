"""``rtml train --from-topic`` on the real broker and redis-server: the examples topic read from its start to
its end (idle, not end offsets), deduplicated and ordered exactly as the examples store, one training path
with ``--from-examples`` (time-ordered holdout, live version compared, candidate in shadow)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from typer.testing import CliRunner

from rtml.cli.main import app
from rtml.core.errors import DependencyUnavailable, InvalidInput
from rtml.core.kafka import Producer
from rtml.core.redis import Keys, Redis, connect
from rtml.core.schemas import Example
from rtml.core.settings import Settings
from rtml.feedback.examples import Stored, read_examples, read_topic_examples, write_stored
from rtml.feedback.retrain import TopicSource, retrain_from_examples
from rtml.serving.registry import ModelRegistry, train_and_register
from tests.integration.test_models_cli import env_of, one_line
from tests.integration.test_retrain import examples

pytestmark = pytest.mark.integration

runner = CliRunner()
START = 1_700_000_000_000


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    r = connect(settings)
    yield r
    await r.aclose()


async def publish(settings: Settings, values: list[bytes]) -> None:
    async with Producer(settings) as producer:
        for i in range(0, len(values), 150):  # several sends: several record batches per partition
            chunk = values[i : i + 150]
            await producer.send_many("examples", [(v[:16], v) for v in chunk])


def encoded(rows: list[Example]) -> list[bytes]:
    return [orjson.dumps(ex.model_dump(mode="json")) for ex in rows]


def mixed_topic(n: int = 600) -> tuple[list[Example], list[bytes]]:
    """``n`` distinct ctr examples plus a redelivered one (labelled later), another model's and two malformed
    records; returns the distinct ctr examples and the records as published (shuffled)."""
    rows = examples(n, START, seed=7)
    again = rows[10].model_copy(update={"labelled_at": rows[10].labelled_at + 60_000, "label": 1 - rows[10].label})
    other = [ex.model_copy(update={"model": "fraud", "prediction_id": f"f{i}"}) for i, ex in enumerate(rows[:40])]
    values = encoded(rows + [again] + other) + [b"not json at all", orjson.dumps({"prediction_id": "x"})]
    random.Random(5).shuffle(values)
    return rows, values


async def test_topic_reads_the_same_table_as_the_store(settings: Settings) -> None:
    rows, values = mixed_topic()
    await publish(settings, values)
    again = [orjson.loads(v) for v in values if b'"p7-10"' in v]
    assert len(again) == 2, "the duplicate is on the topic"
    stored = [Example.model_validate(orjson.loads(v)) for v in values if v.startswith(b"{") and b'"version"' in v]
    write_stored(settings.examples_dir, [Stored(0, i, ex) for i, ex in enumerate(stored)])

    seen: list[int] = []
    table, found = await read_topic_examples(settings, "ctr", progress=seen.append)

    assert (found.records, found.malformed, found.matched) == (len(values), 2, len(rows) + 1)
    assert found.first_malformed is not None and "not" in found.first_malformed
    assert seen and seen[-1] == len(values) and seen == sorted(seen), "progress counts the records read"
    assert table.table.equals(read_examples(settings.examples_dir, "ctr").table), "same dedup, same order"
    assert len(table) == len(rows)
    assert np.all(np.diff(table.predicted_at) >= 0)
    kept = table.labels[table.prediction_ids.index("p7-10")]
    assert kept == rows[10].label, "the earliest labelled copy of a duplicate is kept"


async def test_since_and_model_filter(settings: Settings) -> None:
    rows, values = mixed_topic(300)
    await publish(settings, values)
    cut = rows[200].predicted_at
    table, found = await read_topic_examples(settings, "ctr", since_ms=cut)
    assert len(table) == 100 and found.matched == 100 and int(table.predicted_at.min()) == cut
    fraud, _ = await read_topic_examples(settings, "fraud")
    assert len(fraud) == 40
    with pytest.raises(InvalidInput, match=r"no examples for model 'nobody': 343 records read from .*examples, 2 not"):
        await read_topic_examples(settings, "nobody")


async def test_reads_records_published_while_it_reads(settings: Settings) -> None:
    """The end is where the topic went idle: records that keep coming are read, whatever the end offsets."""
    rows = examples(400, START, seed=8)
    values = encoded(rows)

    async def trickle() -> None:
        for i in range(0, len(values), 50):
            await publish(settings, values[i : i + 50])
            await asyncio.sleep(0.5)

    producing = asyncio.create_task(trickle())
    table, found = await read_topic_examples(settings, "ctr", idle_s=2.0)
    await producing
    assert found.records == len(values) and len(table) == len(rows)


async def test_a_broker_that_stops_serving_fetches_is_an_error_not_a_short_read(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle is not enough to call it the end when the broker lists records the reader never got."""
    await publish(settings, encoded(examples(50, START, seed=9)))

    async def nothing(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        await asyncio.sleep(0.05)
        return {}

    monkeypatch.setattr(AIOKafkaConsumer, "getmany", nothing)
    with pytest.raises(DependencyUnavailable, match=r"stalled before its end \(partition \d at 0 of [1-9]"):
        await read_topic_examples(settings, "ctr", idle_s=0.3)


async def test_retrain_from_topic_registers_and_starts_shadow(settings: Settings, redis: Redis) -> None:
    live_version = await train_and_register(settings, "ctr")
    rows, values = mixed_topic(1000)
    await publish(settings, values)

    source = TopicSource(settings)
    done = await retrain_from_examples(settings, redis, "ctr", by="test", source=source)

    registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
    _, metadata = await registry.get("ctr", done.version)
    m = metadata["metrics"]
    assert m["n_train"] + m["n_holdout"] == len(rows) == 1000, "the distinct examples of the model"
    assert (m["n_train"], m["n_holdout"]) == (800, 200)
    ordered = sorted(rows, key=lambda ex: ex.predicted_at)
    assert m["holdout_from"] == ordered[800].predicted_at, "the holdout is the newest fifth"
    assert metadata["source"] == f"topic {settings.topic('examples')} (1000 examples)"
    assert m["auc"] > 0.8 > m["live_auc"], "trained on the served features it learns what the live one cannot"
    assert done.compared_with == live_version and not done.promoted
    assert await registry.live_version("ctr") == live_version
    rollout = await registry.rollout("ctr")
    assert rollout is not None and (rollout.version, rollout.stage) == (done.version, "shadow")
    assert source.found is not None and source.found.malformed == 2


async def test_retrain_from_topic_without_live_version_promotes(settings: Settings, redis: Redis) -> None:
    rows, values = mixed_topic(500)
    await publish(settings, values)
    done = await retrain_from_examples(settings, redis, "ctr", source=TopicSource(settings))
    registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
    assert done.promoted and done.compared_with is None
    assert await registry.live_version("ctr") == done.version and await registry.rollout("ctr") is None


def cli(settings: Settings, *args: str) -> Any:
    return runner.invoke(app, ["train", *args], env=env_of(settings))


def test_cli_trains_from_the_topic(settings: Settings) -> None:
    live_version = asyncio.run(train_and_register(settings, "ctr"))
    rows, values = mixed_topic(600)
    asyncio.run(publish(settings, values))

    result = cli(settings, "--from-topic", "--model", "ctr")

    assert result.exit_code == 0, result.stderr
    assert "registered ctr version 2 from 600 examples; newest 120 held out" in result.stdout
    assert f"live version {live_version}" in result.stdout and "serves in shadow" in result.stdout
    warning = [ln for ln in result.stderr.splitlines() if "warning" in ln]
    assert len(warning) == 1 and f"{len(values)} records read" in warning[0] and "2 not examples" in warning[0]

    async def rollout_of() -> Any:
        r = connect(settings)
        try:
            return await ModelRegistry(r, Keys(settings.redis.key_prefix)).rollout("ctr")
        finally:
            await r.aclose()

    rollout = asyncio.run(rollout_of())
    assert rollout is not None and (rollout.version, rollout.stage) == ("2", "shadow")


def test_cli_no_examples_is_one_clear_line(settings: Settings) -> None:
    result = cli(settings, "--from-topic", "--model", "ctr")
    assert result.exit_code != 0
    line = one_line(result.stderr)
    assert "no examples for model 'ctr'" in line and settings.topic("examples") in line, line


def test_cli_source_flags_exclude_each_other(settings: Settings, tmp_path: Path) -> None:
    jsonl = tmp_path / "ex.jsonl"
    jsonl.write_text("{}\n")
    result = cli(settings, "--from-topic", "--from-examples")
    assert result.exit_code == 1
    assert one_line(result.stderr) == "rtml: give either --from-examples or --from-topic, not both"
    result = cli(settings, "--from-topic", "--examples", str(jsonl))
    assert result.exit_code == 1
    assert one_line(result.stderr) == "rtml: give either --examples PATH or --from-topic, not both"


async def test_a_record_of_another_schema_version_is_malformed_not_read(settings: Settings) -> None:
    # the topic reader is no ConsumerLoop, so it makes the loop's rtml-schema check itself
    from tests.integration.test_deadletter_topics import GOOD
    from tests.integration.test_deadletter_topics import publish as publish_raw

    rows = examples(3, START, seed=11)
    good, other_version, headerless = encoded(rows)
    await publish_raw(settings, "examples", [
        (b"k0", good, GOOD), (b"k1", other_version, [("rtml-schema", b"2")]), (b"k2", headerless, []),
    ])  # fmt: skip
    table, found = await read_topic_examples(settings, "ctr")
    assert (found.records, found.malformed, found.matched) == (3, 1, 2)
    assert found.first_malformed is not None and "rtml-schema" in found.first_malformed
    assert sorted(table.prediction_ids) == sorted([rows[0].prediction_id, rows[2].prediction_id])
