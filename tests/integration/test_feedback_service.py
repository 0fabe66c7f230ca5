"""The feedback service in-process against a real broker and Redis: outcomes in, joined examples out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import ConsumerRecord
from prometheus_client import REGISTRY

from rtml.core.kafka import REASON_HEADER, Consumed, ConsumerLoop, Producer
from rtml.core.schemas import Example, PredictionLogged
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.feedback.app import create_app

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def service(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://feedback") as client:
            yield client


def prediction(pid: str, *, ts: int | None = None, score: float = 0.75) -> PredictionLogged:
    return PredictionLogged(
        prediction_id=pid, model="ctr", version="7", entities={"user_id": "u1", "item_id": "i9"},
        features={"user_clicks_5m": 3.0, "item_ctr_1h": 0.125, "user_items_24h": None},
        score=score, degraded=False, ts=now_ms() if ts is None else ts, item_id="i9",
    )  # fmt: skip


async def publish_prediction(settings: Settings, p: PredictionLogged) -> None:
    async with Producer(settings) as producer:
        await producer.send("predictions", p, key=p.prediction_id.encode())


async def consume(
    settings: Settings, topic: str, count: int, timeout: float = 30, group: str = "test"
) -> list[ConsumerRecord]:
    """Read ``topic`` from the start with a fresh consumer group, until ``count`` records or ``timeout``."""
    got: list[ConsumerRecord] = []

    async def handle(batch: list[Consumed[ConsumerRecord]]) -> None:
        got.extend(c.value for c in batch)

    async with Producer(settings) as producer:
        loop: ConsumerLoop[ConsumerRecord] = ConsumerLoop(
            settings, name=f"test-{topic}", topics=[topic], group_id=f"{group}-{topic}", decode=lambda r: r,
            handle=handle, producer=producer,
        )  # fmt: skip
        async with loop:
            await loop.run(timeout=timeout, count=count)
    return got


def outcomes(result: str) -> float:
    return REGISTRY.get_sample_value("rtml_outcomes_total", {"result": result}) or 0.0


async def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_outcome_joins_its_prediction_once_and_quality_reflects_it(settings: Settings) -> None:
    p = prediction("pred-1")
    await publish_prediction(settings, p)
    duplicates = outcomes("duplicate")
    async with service(settings) as client:
        r = await client.post("/v1/outcomes", json={"prediction_id": "pred-1", "label": 1})
        assert r.status_code == 202, r.text
        assert r.json() == {"accepted": 1}

        [record] = await consume(settings, "examples", 1)
        assert record.key == b"pred-1"
        ex = Example.model_validate_json(record.value)
        assert ex.features == p.features
        assert (ex.score, ex.label, ex.model, ex.version, ex.entities) == (0.75, 1.0, "ctr", "7", p.entities)
        assert ex.predicted_at == p.ts and ex.labelled_at >= p.ts

        # A second outcome for the same prediction is a duplicate: counted, never re-joined.
        r = await client.post("/v1/outcomes", json={"prediction_id": "pred-1", "label": 0.0})
        assert r.status_code == 202
        await wait_for(lambda: outcomes("duplicate") >= duplicates + 1)

        q = await client.get("/v1/models/ctr/quality")
        assert q.status_code == 200
        body = q.json()
        assert body["model"] == "ctr"
        [v] = body["versions"]
        assert (v["version"], v["count"], v["positive_rate"], v["mean_score"]) == ("7", 1, 1.0, 0.75)
        assert v["log_loss"] == pytest.approx(0.2876820724517809)
        assert v["auc"] is None  # one class only
        assert v["calibration"] == pytest.approx(0.25)  # one bin: |0.75 - 1|
        assert v["score_drift"] is None and v["feature_drift"] == {}  # version 7 is not in the registry
        assert body["window"] == "1h" and body["as_of"] > 0

        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
    assert len(await consume(settings, "examples", 2, timeout=8, group="recount")) == 1


async def test_outcome_before_its_prediction_joins_when_the_prediction_arrives(settings: Settings) -> None:
    unmatched = outcomes("unmatched")
    async with service(settings) as client:
        r = await client.post("/v1/outcomes", json={"prediction_id": "early", "label": False, "ts": now_ms()})
        assert r.status_code == 202
        await wait_for(lambda: outcomes("unmatched") >= unmatched + 1)
        p = prediction("early", ts=now_ms() - 1_000, score=0.2)
        await publish_prediction(settings, p)
        [record] = await consume(settings, "examples", 1)
    ex = Example.model_validate_json(record.value)
    assert (ex.prediction_id, ex.label, ex.score, ex.features) == ("early", 0.0, 0.2, p.features)


async def test_late_outcome_goes_to_the_dead_letter_topic_with_its_reason(settings: Settings) -> None:
    p = prediction("old", ts=now_ms() - 2 * settings.join_ttl)
    await publish_prediction(settings, p)
    async with service(settings) as client:
        r = await client.post("/v1/outcomes", json={"prediction_id": "old", "label": 1})
        assert r.status_code == 202
        [dead] = await consume(settings, "deadletter", 1)
        assert dead.key == b"old"
        assert orjson.loads(dead.value)["prediction_id"] == "old"
        assert b"late" in dict(dead.headers)[REASON_HEADER]
        assert await consume(settings, "examples", 1, timeout=5) == []


async def test_undecodable_prediction_records_are_dead_lettered(settings: Settings) -> None:
    async with Producer(settings) as producer:
        await producer.send_many("predictions", [(b"x", b'{"prediction_id": "x"}')])
    async with service(settings):
        [dead] = await consume(settings, "deadletter", 1)
    assert b"ValidationError" in dict(dead.headers)[REASON_HEADER]


INVALID: list[tuple[dict[str, Any], str]] = [
    ({"label": 1}, "prediction_id"),
    ({"prediction_id": "p", "label": "yes"}, "label"),
    ({"prediction_id": "p", "label": None}, "label"),
    ({"prediction_id": "", "label": 1}, "prediction_id"),
    ({"prediction_id": "p", "label": 1, "ts": "yesterday"}, "ts"),
    ({"prediction_id": "p", "label": 1, "extra": True}, "extra"),
    ({"prediction_id": "p", "label": 1, "ts": now_ms() + 3_600_000}, "ts"),
]


async def test_invalid_outcomes_get_422_in_the_contract_shape(settings: Settings) -> None:
    async with service(settings) as client:
        for body, field in INVALID:
            r = await client.post("/v1/outcomes", json=body)
            assert r.status_code == 422, (body, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid"
            assert any(d["field"].startswith(field) for d in err["details"]), (body, err)
        r = await client.post("/v1/outcomes", content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"


async def test_routes_need_their_scope_when_api_keys_are_set(make_settings: Any) -> None:
    from rtml.core.kafka import create_topics

    s: Settings = make_settings(api_keys="app:ingest,dash:read")
    await create_topics(s)
    async with service(s) as client:
        body = {"prediction_id": "p", "label": 1}
        assert (await client.post("/v1/outcomes", json=body)).status_code == 401
        bad = await client.post("/v1/outcomes", json=body, headers={"Authorization": "Bearer dash"})
        assert bad.status_code == 403
        ok = await client.post("/v1/outcomes", json=body, headers={"Authorization": "Bearer app"})
        assert ok.status_code == 202
        q = await client.get("/v1/models/ctr/quality", headers={"Authorization": "Bearer dash"})
        assert q.status_code == 200 and q.json()["versions"] == []


async def test_outcome_answers_503_with_retry_after_when_the_broker_does_not_ack(settings: Settings) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        producer: Producer = app.state.producer
        await producer.stop()  # stands in for a broker that went away
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:
            r = await client.post("/v1/outcomes", json={"prediction_id": "p", "label": 1})
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "unavailable"


async def test_labels_from_the_rule_and_from_callers_make_one_example_each(make_settings: Any, tmp_path: Any) -> None:
    """The whole feedback service with a 5 s click rule: a click before its prediction is processed, a
    prediction never clicked (negative at window + grace), a caller's outcome that beats the rule (the
    rule's label is then a duplicate), a duplicate click event: one example per prediction, exact labels.

    Times start once the service is up (its three consumer groups take seconds to join on Tansu): a window
    that had begun before would let the sweep give "clicked" its negative before the click is read."""
    import yaml

    from rtml.core.kafka import create_topics

    demo = yaml.safe_load((ROOT / "services/rtml/demo/rtml.yaml").read_text())
    demo["models"]["ctr"]["label"]["within"] = "5s"
    path = tmp_path / "rtml.yaml"
    path.write_text(yaml.safe_dump(demo))
    s: Settings = make_settings(config=path, label_grace="500ms")
    await create_topics(s)
    duplicates = outcomes("duplicate")
    async with Producer(s) as producer, service(s) as client:
        t = now_ms()
        clicked, ignored, told = prediction("clicked", ts=t), prediction("ignored", ts=t), prediction("told", ts=t)
        ignored = ignored.model_copy(update={"entities": {"user_id": "u2", "item_id": "i9"}})
        click = {"event_id": "c1", "type": "click", "user_id": "u1", "item_id": "i9", "ts": t + 300, "received_at": t}
        for _ in range(2):  # the same click event twice, both before the predictions
            await producer.send("events", click, key=b"u1")
        # first on its partition (outcomes are keyed by prediction_id): it comes before the rule's label
        r = await client.post("/v1/outcomes", json={"prediction_id": "told", "label": 0.25})
        assert r.status_code == 202
        for p in (clicked, ignored, told):
            await producer.send("predictions", p, key=p.prediction_id.encode())
        records = await consume(s, "examples", 3, timeout=30)
        await wait_for(lambda: outcomes("duplicate") >= duplicates + 1)  # the rule's label for "told"
    labels = {Example.model_validate_json(r.value).prediction_id: Example.model_validate_json(r.value).label
              for r in records}  # fmt: skip
    assert labels == {"clicked": 1.0, "ignored": 0.0, "told": 0.25}


async def test_a_quality_write_that_fails_after_the_join_counts_once_when_the_batch_comes_again(
    settings: Settings,
) -> None:
    """The join claimed the pairs, then the quality write failed (Redis, or a Cluster node, gone between the two
    calls): the consumer retries the batch, whose claims are now replays. Each label counts once in the quality
    window and the learning counter, however often the batch comes."""
    from rtml.core.errors import DependencyUnavailable
    from rtml.core.redis import connect
    from rtml.feedback.consumer import Joiner
    from rtml.feedback.quality import learn_key

    now = now_ms()
    n = 10
    records = []
    for i in range(n):
        p = prediction(f"qx-{i}", ts=now - 2_000, score=0.1 + 0.08 * i)
        o = {"prediction_id": p.prediction_id, "label": float(i % 2), "ts": now - 1_000, "received_at": now - 900}
        for topic, partition, offset, value in (("predictions", 0, 100 + i, p.model_dump_json().encode()),
                                                ("outcomes", 2, 500 + i, orjson.dumps(o))):  # fmt: skip
            records.append(
                ConsumerRecord(settings.topic(topic), partition, offset, now, 0, None, value, None, 0, 0, [])
            )
    redis = connect(settings)
    try:
        async with Producer(settings) as producer:
            joiner = Joiner(settings, redis, producer)
            batch = [Consumed(r, joiner.decode(r)) for r in records]
            real_write = joiner.quality._write

            async def failing_write(*args: Any) -> None:
                raise DependencyUnavailable("redis", "gone between the join and the quality write")

            joiner.quality._write = failing_write  # type: ignore[method-assign]
            with pytest.raises(DependencyUnavailable):
                await joiner.handle(batch)
            joiner.quality._write = real_write  # type: ignore[method-assign]
            for _ in range(2):  # the retry, then one more redelivery (a crash before the commit)
                await joiner.handle(batch)
            window = await joiner.quality.window("ctr", now)
            labels = await redis.hget(learn_key(joiner.keys, "ctr"), "labels")
            await joiner.store.aclose()
    finally:
        await redis.aclose()
    sums = window["7"]
    assert sums.n == n, sums  # 0 before: a replayed claim never counted
    assert sums.fields["y"] == pytest.approx(n // 2)  # the sum of the labels
    assert float(labels) == n
