"""Malformed records published straight to each consumed topic go to ``deadletter``, and the consumer goes on.

Each test publishes, on ONE partition of a topic, records that no rtml producer would write (not JSON, JSON of
the wrong shape, missing fields, NaN/Infinity or out-of-range numbers, another ``rtml-schema`` version, a huge
record, a null value), then a good record on the same partition. It asserts that every bad record is on the
dead-letter topic with its reason and origin in headers, that ``rtml_deadletter_total{topic}`` counted each one,
that the good record after them was applied (feature value, joined example, swapped model), and that nothing of
the bad ones leaked into a feature, a score, a label or the quality sums.

Who dead-letters what: ``events`` -> the features consumer; ``predictions`` and ``outcomes`` -> the feedback
join; ``examples`` -> the feedback examples store; ``models`` -> each serving replica's promotions watcher. The
feedback label-rule consumer also reads ``predictions`` and ``events`` and skips what it cannot read without
dead-lettering it (the join and the features consumer own those records: one dead letter per bad record).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from prometheus_client import REGISTRY

from rtml.core.config import load_config
from rtml.core.kafka import REASON_HEADER, client_options
from rtml.core.redis import Keys, connect
from rtml.core.schemas import SCHEMA_HEADER, SCHEMA_VERSION
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.features.app import create_app as create_features
from rtml.feedback.app import create_app as create_feedback
from rtml.feedback.examples import read_examples
from rtml.serving.app import create_app as create_serving
from rtml.serving.registry import ModelRegistry
from rtml.serving.train import DEMO_CONFIG, train_model
from tests.helpers import eventually, free_port, running, served

pytestmark = pytest.mark.integration

GOOD = [(SCHEMA_HEADER, SCHEMA_VERSION.encode())]
HUGE = 1024 * 1024  # a 1 MiB record: more than any rtml record, well under the broker's limit


def dead_letters(settings: Settings, topic: str) -> float:
    return REGISTRY.get_sample_value("rtml_deadletter_total", {"topic": settings.topic(topic)}) or 0.0


async def publish(settings: Settings, topic: str, records: Iterable[tuple[bytes, bytes | None, Any]]) -> None:
    """Publish ``(key, value, headers)`` records exactly as given (no header added) to partition 0 of ``topic``,
    in order, each acknowledged before the next."""
    producer = AIOKafkaProducer(**client_options(settings.kafka), acks="all", max_request_size=4 * HUGE)
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(settings.topic(topic), value, key=key, partition=0, headers=headers)
    finally:
        await producer.stop()


async def read_all(settings: Settings, topic: str, at_least: int, timeout: float = 30.0) -> list[ConsumerRecord]:
    """Every record of ``topic`` (all partitions, from the start, no group): once ``at_least`` arrived, read on
    until nothing more came for 1 s, so a record too many is seen too."""
    consumer = AIOKafkaConsumer(**client_options(settings.kafka), group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=200)  # fmt: skip
    got: list[ConsumerRecord] = []
    await consumer.start()
    try:
        name = settings.topic(topic)
        partitions = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(got) < at_least and loop.time() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                got.extend(batch)
        quiet = loop.time() + 1.0
        while loop.time() < quiet:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                got.extend(batch)
                quiet = loop.time() + 1.0
    finally:
        await consumer.stop()
    return got


def reasons_by_key(records: list[ConsumerRecord], source: str) -> dict[bytes, str]:
    """key -> reason header of each dead letter that came from ``source`` (a full topic name)."""
    out: dict[bytes, str] = {}
    for r in records:
        headers = dict(r.headers)
        if headers.get("rtml-source-topic") == source.encode():
            assert r.key not in out, f"dead-lettered twice: {r.key!r}"
            assert int(headers["rtml-source-partition"]) == 0 and int(headers["rtml-source-offset"]) >= 0
            out[r.key] = headers[REASON_HEADER].decode()
    return out


def assert_reasons(got: dict[bytes, str], expected: dict[bytes, str]) -> None:
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for key, fragment in expected.items():
        assert fragment in got[key], (key, fragment, got[key][:300])


def event(
    event_id: str, user: str, *, type_: str = "purchase", amount: Any = 12.5, ts: Any = None, item: str = "t1"
) -> bytes:
    now = now_ms()
    return dumps(
        {
            "event_id": event_id,
            "type": type_,
            "user_id": user,
            "item_id": item,
            "ts": now if ts is None else ts,
            "received_at": now,
            "properties": {"amount": amount},
        }
    )


def dumps(value: Any) -> bytes:
    """JSON as compact as orjson's, but any int (orjson refuses ints past 64 bits)."""
    return json.dumps(value, separators=(",", ":")).encode()


def replace_number(raw: bytes, literal: bytes) -> bytes:
    """``raw`` with its number 12.5 written as ``literal`` (NaN, Infinity: what json/orjson cannot dump)."""
    assert raw.count(b"12.5") == 1
    return raw.replace(b"12.5", literal)


# -- events -> features ----------------------------------------------------------------------------------------
BAD_EVENTS: list[tuple[bytes, bytes | None, str]] = [  # key, value, a fragment of the reason
    (b"not-json", b"{not json", "Invalid JSON"),
    (b"array", b"[1, 2, 3]", "Input should be an object"),
    (b"missing", b'{"type": "purchase", "user_id": "u-dl"}', "Field required"),
    (b"wrong-type", dumps({**orjson.loads(event("e-wt", "u-dl")), "user_id": 5}), "user_id"),
    (b"nan", replace_number(event("e-nan", "u-dl"), b"NaN"), "properties.amount"),
    (b"inf", replace_number(event("e-inf", "u-dl"), b"-Infinity"), "properties.amount"),
    (b"huge-int", replace_number(event("e-big", "u-dl"), b"1" + b"0" * 400), "properties.amount"),
    (b"ts-range", event("e-ts", "u-dl", ts=10**30), "ts"),
    (b"huge", event("e-huge", "u" * HUGE), "user_id"),
    (b"null", None, "empty record"),
]


async def test_events_consumer_dead_letters_malformed_records_and_applies_the_next_good_one(
    settings: Settings,
) -> None:
    before = dead_letters(settings, "events")
    async with running(create_features(settings)) as features:
        await publish(settings, "events", [(k, v, GOOD) for k, v, _ in BAD_EVENTS])
        await publish(settings, "events", [(b"good", event("e-good", "u-dl", amount=7.25), GOOD)])

        async def applied() -> dict[str, Any]:
            r = await features.get("/v1/features/user/u-dl")
            assert r.status_code == 200
            f: dict[str, Any] = r.json()["features"]
            assert f["user_purchases_5m"] == 1
            return f

        f = await eventually(applied)
        # only the good event counted: none of the NaN/infinite/huge amounts reached the sums
        assert (f["user_spend_1h"], f["user_amount_max_24h"], f["user_purchases_1h"]) == (7.25, 7.25, 1)
        dead = await read_all(settings, "deadletter", len(BAD_EVENTS))
    assert_reasons(reasons_by_key(dead, settings.topic("events")), {k: why for k, _, why in BAD_EVENTS})
    assert dead_letters(settings, "events") - before == len(BAD_EVENTS)
    null = next(r for r in dead if r.key == b"null")
    assert null.value == b""  # the null value is parked as an empty one, with its reason
    huge = next(r for r in dead if r.key == b"huge")
    assert len(huge.value) > HUGE  # parked whole, not truncated


async def test_events_of_another_schema_version_are_dead_lettered_by_features(settings: Settings) -> None:
    before = dead_letters(settings, "events")
    async with running(create_features(settings)) as features:
        await publish(settings, "events", [(b"v2", event("e-v2", "u-v2", amount=100.0), [(SCHEMA_HEADER, b"2")])])
        await publish(settings, "events", [(b"good", event("e-good", "u-v2", amount=1.0), GOOD)])

        async def applied() -> dict[str, Any]:
            r = await features.get("/v1/features/user/u-v2")
            f: dict[str, Any] = r.json()["features"]
            assert f["user_purchases_5m"] >= 1
            return f

        f = await eventually(applied)
    # the version-2 record was not read as a version-1 event, and was parked
    assert (f["user_purchases_5m"], f["user_spend_1h"]) == (1, 1.0)
    assert dead_letters(settings, "events") - before == 1


# -- predictions, outcomes, events, examples -> feedback --------------------------------------------------------
def prediction(pid: str, *, user: str = "u-fb", item: str = "t-fb", score: Any = 0.75) -> bytes:
    return dumps({"prediction_id": pid, "model": "ctr", "version": "7", "item_id": item,
                         "entities": {"user_id": user, "item_id": item},
                         "features": {"user_clicks_5m": 3.0, "item_ctr_1h": 0.125, "user_items_24h": None},
                         "score": score, "degraded": False, "ts": now_ms()})  # fmt: skip


def outcome(pid: str, label: Any = 1.0) -> bytes:
    now = now_ms()
    return dumps({"prediction_id": pid, "label": label, "ts": now, "received_at": now})


def example(pid: str, label: Any = 1.0) -> bytes:
    now = now_ms()
    return dumps({"prediction_id": pid, "model": "ctr", "version": "7", "entities": {"user_id": "u-ex"},
                         "features": {"user_clicks_5m": 1.0}, "score": 0.5, "label": label,
                         "predicted_at": now - 1000, "labelled_at": now})  # fmt: skip


BAD_PREDICTIONS: list[tuple[bytes, bytes | None, Any, str]] = [  # key, value, headers, reason fragment
    (b"p-not-json", b"\xff\xfe not json", GOOD, "Invalid JSON"),
    (b"p-shape", b'{"predictions": []}', GOOD, "Field required"),
    (b"p-missing", b'{"prediction_id": "p-missing"}', GOOD, "Field required"),
    (b"p-nan", replace_number(prediction("p-nan", score=12.5), b"NaN"), GOOD, "score"),
    (b"p-inf", prediction("p-inf").replace(b"0.125", b"Infinity"), GOOD, "features.item_ctr_1h"),
    (b"p-ts", prediction("p-ts").replace(b'"ts":', b'"ts":1' + b"0" * 30 + b', "x":'), GOOD, "ts"),
    (b"p-version", prediction("p-version"), [(SCHEMA_HEADER, b"2")], "unsupported rtml-schema header '2'"),
    (b"p-huge", prediction("p" * HUGE), GOOD, "prediction_id"),
    (b"p-null", None, GOOD, "empty record"),
]
BAD_OUTCOMES: list[tuple[bytes, bytes | None, Any, str]] = [
    (b"o-not-json", b"yes", GOOD, "Invalid JSON"),
    (b"o-shape", b'[{"prediction_id": "good", "label": 1}]', GOOD, "Input should be an object"),
    (b"o-missing", b'{"prediction_id": "good"}', GOOD, "label"),
    (b"o-nan", replace_number(outcome("good", 12.5), b"NaN"), GOOD, "label"),
    (b"o-inf", replace_number(outcome("good", 12.5), b"Infinity"), GOOD, "label"),
    (b"o-type", outcome("good", "positive"), GOOD, "label"),
    (b"o-version", outcome("good", 0.0), [(SCHEMA_HEADER, b"\xff")], "unsupported rtml-schema header"),
    (
        b"o-huge",
        dumps({"prediction_id": "good", "label": 0.0, "ts": 1, "received_at": 1, "item_id": 1, "pad": "x" * HUGE}),
        GOOD,
        "item_id",
    ),  # fmt: skip
    (b"o-null", None, GOOD, "empty record"),
]
BAD_EXAMPLES: list[tuple[bytes, bytes | None, Any, str]] = [
    (b"x-not-json", b"\x00\x01", GOOD, "not an example"),
    (b"x-shape", b'{"example": {}}', GOOD, "not an example"),
    (b"x-nan", replace_number(example("x-nan", 12.5), b"NaN"), GOOD, "label"),
    (b"x-version", example("x-version"), [(SCHEMA_HEADER, b"0")], "unsupported rtml-schema header '0'"),
    (b"x-huge", example("x" * HUGE), GOOD, "prediction_id"),
    (b"x-null", None, GOOD, "empty record"),
]
BAD_RULE_EVENTS: list[tuple[bytes, bytes | None, Any]] = [  # what the label-rule consumer must skip
    (b"e-not-json", b"{", GOOD),
    (b"e-shape", b'"click"', GOOD),
    (b"e-ts", event("e-ts", "u-fb", type_="click", ts=10**30, item="t-fb"), GOOD),
    (b"e-version", event("e-v", "u-fb", type_="click", item="t-fb"), [(SCHEMA_HEADER, b"2")]),
    (b"e-null", None, GOOD),
]


async def test_feedback_consumers_dead_letter_malformed_records_and_join_the_next_good_ones(
    make_settings: Any,
) -> None:
    from rtml.core.kafka import create_topics

    settings: Settings = make_settings(examples_flush_s=0.2, learning_interval_s=3600)
    await create_topics(settings)
    before = {t: dead_letters(settings, t) for t in ("predictions", "outcomes", "examples", "events")}
    async with running(create_feedback(settings)) as feedback:
        await publish(settings, "predictions", [(k, v, h) for k, v, h, _ in BAD_PREDICTIONS])
        await publish(settings, "outcomes", [(k, v, h) for k, v, h, _ in BAD_OUTCOMES])
        await publish(settings, "examples", [(k, v, h) for k, v, h, _ in BAD_EXAMPLES])
        await publish(settings, "events", BAD_RULE_EVENTS)
        # the good records, on the same partitions, after the bad ones
        await publish(settings, "predictions", [(b"good", prediction("good", user="u-x", item="t-x"), GOOD),
                                                (b"ruled", prediction("ruled"), GOOD)])  # fmt: skip
        await publish(settings, "outcomes", [(b"good", outcome("good", 1.0), GOOD)])
        await publish(settings, "examples", [(b"x-good", example("x-good", 0.0), GOOD)])
        # the label rule of ctr: a click by u-fb on t-fb within 30 minutes makes "ruled" a positive
        await publish(settings, "events", [(b"u-fb", event("e-click", "u-fb", type_="click", item="t-fb"), GOOD)])

        async def stored() -> dict[str, float]:
            try:
                table = read_examples(settings.examples_dir, "ctr").table
            except Exception as exc:  # noqa: BLE001 -- not written yet
                raise AssertionError(str(exc)) from exc
            labels = dict(zip(table.column("prediction_id").to_pylist(), table.column("label").to_pylist(),
                              strict=True))  # fmt: skip
            assert {"good", "ruled", "x-good"} <= set(labels), labels
            return labels

        labels = await eventually(stored, timeout=30)
        assert labels == {"good": 1.0, "ruled": 1.0, "x-good": 0.0}  # nothing of the bad records was stored
        q = (await feedback.get("/v1/models/ctr/quality")).json()
        [v] = q["versions"]
        # the quality sums saw the two joined examples only, and stayed finite (no NaN score or label)
        assert (v["version"], v["count"], v["positive_rate"], v["mean_score"]) == ("7", 2, 1.0, 0.75)
        assert v["log_loss"] == pytest.approx(0.2876820724517809)
        dead = await read_all(settings, "deadletter", len(BAD_PREDICTIONS) + len(BAD_OUTCOMES) + len(BAD_EXAMPLES))
    for topic, bad in (("predictions", BAD_PREDICTIONS), ("outcomes", BAD_OUTCOMES), ("examples", BAD_EXAMPLES)):
        assert_reasons(reasons_by_key(dead, settings.topic(topic)), {k: why for k, _, _, why in bad})
        assert dead_letters(settings, topic) - before[topic] == len(bad), topic
    # bad events are the features consumer's to dead-letter: the label-rule consumer skipped them, once each
    assert reasons_by_key(dead, settings.topic("events")) == {}
    assert dead_letters(settings, "events") == before["events"]
    assert len(dead) == len(BAD_PREDICTIONS) + len(BAD_OUTCOMES) + len(BAD_EXAMPLES)


# -- models -> serving -------------------------------------------------------------------------------------------
async def serving_with_two_versions(settings: Settings) -> ModelRegistry:
    """v1 live and v2 registered (not live) for ctr; the registry's Redis client is the caller's to close."""
    redis = connect(settings)
    registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
    config = load_config(DEMO_CONFIG)
    for seed in (0, 1):
        t = train_model(config, "ctr", n_synthetic=500, seed=seed)
        version = await registry.register("ctr", t.onnx_bytes, t.metadata)
        if seed == 0:
            await registry.promote("ctr", version)
    return registry


def announcement(version: str) -> bytes:
    return orjson.dumps({"model": "ctr", "version": version, "event": "promoted", "ts": now_ms()})


BAD_MODELS: list[tuple[bytes, bytes | None, Any, str]] = [
    (b"m-not-json", b"promote v2 please", GOOD, "not JSON"),
    (b"m-huge", b"{" * HUGE, GOOD, "not JSON"),
    (b"m-null", None, GOOD, "empty record value"),
]


async def test_serving_dead_letters_malformed_announcements_and_swaps_on_the_next_good_one(make_settings: Any) -> None:
    from rtml.core.kafka import create_topics

    # the registry poll is an hour away: only the models topic can make serving swap within this test
    settings: Settings = make_settings(model_poll_interval_s=3600.0, serving_port=free_port())
    await create_topics(settings)
    registry = await serving_with_two_versions(settings)
    before = dead_letters(settings, "models")
    try:
        async with (
            served(create_serving(settings), settings.serving_port) as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            body = {"entities": {"user_id": "u1", "item_id": "t1"}}
            assert (await client.post("/v1/predict", json=body)).json()["version"] == "1"
            await publish(settings, "models", [(k, v, h) for k, v, h, _ in BAD_MODELS])

            async def counted() -> None:
                assert dead_letters(settings, "models") - before == len(BAD_MODELS)

            await eventually(counted)
            await registry.promote("ctr", "2")  # in Redis only: the announcement below is what serving sees
            await publish(settings, "models", [(b"ctr", announcement("2"), GOOD)])

            async def swapped() -> None:
                r = await client.post("/v1/predict", json=body)
                assert r.status_code == 200 and r.json()["version"] == "2", r.text

            await eventually(swapped)
            dead = await read_all(settings, "deadletter", len(BAD_MODELS))
    finally:
        await registry.redis.aclose()
    assert_reasons(reasons_by_key(dead, settings.topic("models")), {k: why for k, _, _, why in BAD_MODELS})
    assert dead_letters(settings, "models") - before == len(BAD_MODELS)


BAD_MODEL_SHAPES: list[tuple[bytes, bytes | None, Any]] = [
    (b"m-shape", b"[1, 2]", GOOD),
    (b"m-missing", b'{"model": "ctr"}', GOOD),
    (b"m-version", announcement("1"), [(SCHEMA_HEADER, b"2")]),
]


async def test_serving_dead_letters_announcements_of_the_wrong_shape_or_schema(make_settings: Any) -> None:
    from rtml.core.kafka import create_topics

    settings: Settings = make_settings(model_poll_interval_s=3600.0, serving_port=free_port())
    await create_topics(settings)
    registry = await serving_with_two_versions(settings)
    before = dead_letters(settings, "models")
    try:
        async with (
            served(create_serving(settings), settings.serving_port) as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            await publish(settings, "models", BAD_MODEL_SHAPES)
            await registry.promote("ctr", "2")
            await publish(settings, "models", [(b"ctr", announcement("2"), GOOD)])

            async def swapped() -> None:
                r = await client.post("/v1/predict", json={})
                assert r.json()["version"] == "2", r.text

            await eventually(swapped)
    finally:
        await registry.redis.aclose()
    assert dead_letters(settings, "models") - before == len(BAD_MODEL_SHAPES)
