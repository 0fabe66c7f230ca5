"""Label rules against a real redis-server and broker: every prediction gets the label a plain reference gives.

The records are fed to ``LabelRules.handle`` and the sweeps run at chosen clock times, so the test controls
arrival order, lag, duplicates and crashes exactly; the outcomes are read back from the real topic.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY

from rtml.core.config import load_config
from rtml.core.kafka import Consumed, ConsumerLoop, Producer, create_topics
from rtml.core.redis import connect
from rtml.core.settings import Settings
from rtml.feedback.labels import SWEEP_LEASE_MS, LabelRules

pytestmark = pytest.mark.integration

WITHIN = 10_000
GRACE = 2_000
CONFIG = f"""
entities:
  user: {{key: user_id}}
  item: {{key: item_id}}
features:
  user_clicks_5m: {{entity: user, agg: count, events: [click], window: 5m}}
models:
  ctr:
    features: [user_clicks_5m]
    label: {{events: [click], match: {{user_id: user_id, item_id: item_id}}, within: {WITHIN}ms}}
  fraud:
    features: [user_clicks_5m]
    label: {{events: [chargeback], match: {{purchase_id: properties.purchase_id}}, within: {WITHIN}ms,
             negative: null}}
  plain:
    features: [user_clicks_5m]
"""


@pytest.fixture
async def lsettings(make_settings: Any, tmp_path: Path) -> Settings:
    path = tmp_path / "rtml.yaml"
    path.write_text(CONFIG)
    s: Settings = make_settings(config=path, label_grace=f"{GRACE}ms")
    await create_topics(s)
    return s


@pytest.fixture
async def rules(lsettings: Settings) -> AsyncIterator[LabelRules]:
    redis = connect(lsettings)
    async with Producer(lsettings) as producer:
        r = LabelRules(lsettings, load_config(lsettings.platform_config_path()), redis, producer)
        yield r
        await r.aclose()
    await redis.aclose()


def record(settings: Settings, topic: str, offset: int, value: dict[str, Any]) -> ConsumerRecord:
    return ConsumerRecord(settings.topic(topic), 0, offset, 0, 0, None, orjson.dumps(value), None, 0, 0, ())


async def feed(rules: LabelRules, records: list[ConsumerRecord]) -> None:
    await rules.handle([Consumed(r, rules.decode(r)) for r in records])


async def read_outcomes(settings: Settings, count: int, timeout: float = 20) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []

    async def handle(batch: list[Consumed[dict[str, Any]]]) -> None:
        got.extend(c.value for c in batch)

    async with Producer(settings) as producer:
        loop: ConsumerLoop[dict[str, Any]] = ConsumerLoop(
            settings, name="test-outcomes", topics=["outcomes"], group_id="test-outcomes",
            decode=lambda r: orjson.loads(r.value), handle=handle, producer=producer,
        )  # fmt: skip
        async with loop:
            await loop.run(timeout=timeout, count=count)
    return got


def counted(model: str, result: str) -> float:
    return REGISTRY.get_sample_value("rtml_rule_labels_total", {"model": model, "result": result}) or 0.0


@dataclass
class Arrival:
    at: int  # when feedback sees it (ms)
    topic: str
    value: dict[str, Any]
    offset: int


async def test_random_stream_labels_equal_the_reference(rules: LabelRules, lsettings: Settings) -> None:
    """Predictions and clicks with random lag (events before their prediction too), duplicate events,
    redelivered records, clicks outside every window and clicks too late for a label already given."""
    rng = random.Random(7)
    pairs = [(f"u{u}", f"t{i}") for u in range(4) for i in range(3)]
    preds = []
    for n in range(150):
        user, item = rng.choice(pairs)
        preds.append({"prediction_id": f"p{n}", "model": "ctr", "version": "1", "entities": {"user_id": user,
                      "item_id": item}, "features": {}, "score": 0.5, "degraded": False,
                      "ts": rng.randrange(0, 60_000), "item_id": item})  # fmt: skip
    clicks = []
    for n in range(160):
        user, item = rng.choice(pairs)
        clicks.append({"event_id": f"e{n}", "type": "click", "user_id": user, "item_id": item,
                       "ts": rng.randrange(0, 75_000), "received_at": 0})  # fmt: skip
    arrivals: list[Arrival] = []
    offset = 0
    for p in preds:
        offset += 1
        arrivals.append(Arrival(p["ts"] + rng.randrange(0, 1_500), "predictions", p, offset))
    for c in clicks:
        lag = rng.randrange(0, 1_500) if rng.random() < 0.9 else rng.randrange(12_000, 20_000)  # some very late
        offset += 1
        arrivals.append(Arrival(c["ts"] + lag, "events", c, offset))
        if rng.random() < 0.15:  # the producer sent it twice: same event_id, another record
            offset += 1
            arrivals.append(Arrival(c["ts"] + lag + rng.randrange(0, 3_000), "events", c, offset))
    # views and other models' traffic the rules must ignore
    arrivals.append(Arrival(5, "events", {"event_id": "v1", "type": "view", "user_id": "u0", "item_id": "t0",
                                           "ts": 5, "received_at": 0}, 10_000))  # fmt: skip
    arrivals.sort(key=lambda a: a.at)

    # Reference: sweeps every second; at equal times records are processed before the sweep.
    def sweep_tick(deadline: int) -> int:
        t = deadline + GRACE
        return -(-t // 1000) * 1000

    expected: dict[str, float] = {}
    late = 0
    first_arrival: dict[str, int] = {}
    for a in arrivals:
        if a.topic == "events":
            first_arrival.setdefault(a.value["event_id"], a.at)
    for p in preds:
        tick = sweep_tick(p["ts"] + WITHIN)
        hits = [c for c in clicks if (c["user_id"], c["item_id"]) == (p["entities"]["user_id"], p["item_id"])
                and p["ts"] <= c["ts"] <= p["ts"] + WITHIN]  # fmt: skip
        positive = any(first_arrival[c["event_id"]] <= tick for c in hits)
        expected[p["prediction_id"]] = 1.0 if positive else 0.0
        if not positive:
            late += len(hits)
    assert 20 < sum(expected.values()) < 130, "the stream should give both labels"

    late_before = counted("ctr", "late")
    i = 0
    redelivered = 0
    for tick in range(0, 100_000, 1000):
        batch = []
        while i < len(arrivals) and arrivals[i].at <= tick:
            a = arrivals[i]
            batch.append(record(lsettings, a.topic, a.offset, a.value))
            i += 1
        if batch:
            await feed(rules, batch)
            if rng.random() < 0.2:  # a crash before the commit: the batch comes again
                await feed(rules, batch)
                redelivered += 1
        await rules.sweep(now=tick)
    assert redelivered > 3

    got = await read_outcomes(lsettings, count=10**6, timeout=8)  # redeliveries re-send: read until quiet
    labels: dict[str, set[float]] = {}
    for o in got:
        assert o["source"] == "rule"
        labels.setdefault(o["prediction_id"], set()).add(o["label"])
    assert {pid: next(iter(v)) for pid, v in labels.items()} == expected
    assert all(len(v) == 1 for v in labels.values()), "a prediction got two different labels"
    assert counted("ctr", "late") - late_before == late


async def test_click_seen_before_its_prediction_still_labels_it(rules: LabelRules, lsettings: Settings) -> None:
    click = {"event_id": "c1", "type": "click", "user_id": "u1", "item_id": "t1", "ts": 1_500, "received_at": 0}
    pred = {"prediction_id": "pa", "model": "ctr", "version": "1", "entities": {"user_id": "u1", "item_id": "t1"},
            "features": {}, "score": 0.2, "degraded": False, "ts": 1_000, "item_id": "t1"}  # fmt: skip
    await feed(rules, [record(lsettings, "events", 1, click)])
    await feed(rules, [record(lsettings, "predictions", 2, pred)])
    [o] = await read_outcomes(lsettings, count=1)
    assert (o["prediction_id"], o["item_id"], o["label"], o["ts"]) == ("pa", "t1", 1.0, 1_500)
    # the due entry left behind does not produce a negative at the deadline
    assert await rules.sweep(now=1_000 + WITHIN + GRACE) == 1
    assert await read_outcomes(lsettings, count=1, timeout=3) == []  # the same group: only what is new


async def test_null_negative_gives_no_outcome_and_other_paths_match(rules: LabelRules, lsettings: Settings) -> None:
    """fraud: matched on properties.purchase_id; no chargeback = no outcome at all (negative: null)."""
    preds = [{"prediction_id": f"f{n}", "model": "fraud", "version": "1",
              "entities": {"user_id": "u1", "purchase_id": f"buy{n}"}, "features": {}, "score": 0.9,
              "degraded": False, "ts": 1_000} for n in range(3)]  # fmt: skip
    chargeback = {"event_id": "cb", "type": "chargeback", "user_id": "u1", "ts": 4_000, "received_at": 0,
                  "properties": {"purchase_id": "buy1"}}  # fmt: skip
    no_rule = {**preds[0], "prediction_id": "x", "model": "plain"}
    unkeyed = {**preds[0], "prediction_id": "y", "entities": {"user_id": "u1"}}
    before = counted("fraud", "negative"), counted("fraud", "unkeyed")
    await feed(rules, [record(lsettings, "predictions", n, p) for n, p in enumerate([*preds, no_rule, unkeyed])])
    await feed(rules, [record(lsettings, "events", 9, chargeback)])
    assert await rules.sweep(now=1_000 + WITHIN + GRACE) == 3
    got = await read_outcomes(lsettings, count=2, timeout=5)
    assert [(o["prediction_id"], o["label"], o["item_id"]) for o in got] == [("f1", 1.0, None)]
    assert counted("fraud", "negative") - before[0] == 2
    assert counted("fraud", "unkeyed") - before[1] == 1


async def test_a_sweep_that_dies_before_publishing_is_redone_after_its_lease(
    rules: LabelRules, lsettings: Settings
) -> None:
    pred = {"prediction_id": "pz", "model": "ctr", "version": "1", "entities": {"user_id": "u2", "item_id": "t2"},
            "features": {}, "score": 0.2, "degraded": False, "ts": 1_000, "item_id": "t2"}  # fmt: skip
    await feed(rules, [record(lsettings, "predictions", 1, pred)])
    due = 1_000 + WITHIN + GRACE

    async def broken(_: Any) -> None:
        raise RuntimeError("publish failed")

    publish = rules._publish  # noqa: SLF001
    rules._publish = broken  # type: ignore[method-assign]  # noqa: SLF001
    with pytest.raises(RuntimeError):
        await rules.sweep(now=due)
    rules._publish = publish  # type: ignore[method-assign]  # noqa: SLF001
    assert await rules.sweep(now=due + 1) == 0, "leased: another sweeper must not take it"
    assert await rules.sweep(now=due + SWEEP_LEASE_MS + 1) == 1
    [o] = await read_outcomes(lsettings, count=2, timeout=5)
    assert (o["prediction_id"], o["label"], o["ts"]) == ("pz", 0.0, 1_000 + WITHIN)
    assert await rules.sweep(now=due + 2 * SWEEP_LEASE_MS) == 0
