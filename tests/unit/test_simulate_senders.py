"""Both senders publish what ingest would: the Kafka path in ingest's normalised shape, keyed by user_id."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from rtml.core.errors import DependencyUnavailable, InvalidInput, RtmlError
from rtml.core.schemas import Event
from rtml.core.settings import Settings
from rtml.simulate.outcomes import run_outcomes
from rtml.simulate.senders import HttpSender, KafkaSender, PurchaseScorer, ScoringSender, run_clickstream
from rtml.simulate.world import Clickstream, World


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[tuple[bytes | None, bytes]]]] = []

    async def send_many(self, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
        self.sent.append((topic, records))


async def test_kafka_sender_publishes_normalised_events_keyed_by_user() -> None:
    producer = FakeProducer()
    events = Clickstream(World(20, 10, seed=3)).batch(50, 1_700_000_000_000)
    await KafkaSender(producer, Settings()).send(events)  # type: ignore[arg-type]
    [(topic, records)] = producer.sent
    assert topic == "events" and len(records) == 50
    for (key, value), original in zip(records, events, strict=True):
        event = Event.model_validate(orjson.loads(value))
        assert key == original["user_id"].encode()
        assert event.event_id == original["event_id"] and event.ts == original["ts"]
        assert event.type == original["type"] and event.item_id == original["item_id"]
        assert event.received_at >= event.ts


async def test_http_sender_posts_one_batch_and_maps_failures() -> None:
    bodies: list[dict[str, Any]] = []
    status = 202

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(orjson.loads(request.content))
        return httpx.Response(status, json={"accepted": len(bodies[-1]["events"])})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        sender = HttpSender(client, "http://ingest/")
        events = Clickstream(World(5, 5)).batch(7, 1000)
        await sender.send(events)
        assert bodies == [{"events": events}]
        status = 503
        with pytest.raises(DependencyUnavailable):
            await sender.send(events)


async def test_keep_going_drops_failed_batches_and_reports_them() -> None:
    calls = 0
    errors: list[RtmlError] = []

    class Flaky:
        async def send(self, events: list[dict[str, Any]]) -> None:
            nonlocal calls
            calls += 1
            if calls % 2:
                raise DependencyUnavailable("ingest", "down")

    sent = await run_clickstream(
        Flaky(), Clickstream(World(3, 3)), rate=100, duration_s=0.2, tick_s=0.05, on_error=errors.append
    )
    assert errors and sent > 0 and sent % 5 == 0
    with pytest.raises(DependencyUnavailable):
        await run_clickstream(Flaky(), Clickstream(World(3, 3)), rate=100, duration_s=0.2, tick_s=0.05)


class Collect:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.batches: list[list[dict[str, Any]]] = []

    async def send(self, events: list[dict[str, Any]]) -> None:
        if self.fail:
            raise DependencyUnavailable("ingest", "down")
        self.batches.append(events)


def purchase_stream() -> list[dict[str, Any]]:
    stream = Clickstream(World(200, 20, seed=3))
    events = [stream.next_event(1_700_000_000_000 + t * 1000) for t in range(3_000)]
    assert sum(e["type"] == "purchase" for e in events) >= 5
    return events


async def test_scoring_sender_scores_each_accepted_purchase_by_its_event_id() -> None:
    bodies: list[dict[str, Any]] = []

    def serving(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/predict"
        bodies.append(orjson.loads(request.content))
        return httpx.Response(200, json={"prediction_id": "p", "model": "fraud", "version": "1", "score": 0.1})

    events = purchase_stream()
    inner = Collect()
    async with httpx.AsyncClient(transport=httpx.MockTransport(serving)) as client:
        scorer = PurchaseScorer(client, "http://serving/", delay_s=0.01, max_pending=2)
        sender = ScoringSender(inner, scorer)
        for i in range(0, len(events), 100):
            await sender.send(events[i : i + 100])
        await scorer.drain()
    purchases = [e for e in events if e["type"] == "purchase"]
    assert inner.batches and sum(map(len, inner.batches)) == len(events)
    assert sorted(bodies, key=lambda b: b["entities"]["purchase_id"]) == sorted(
        ({"model": "fraud", "entities": {"user_id": e["user_id"], "purchase_id": e["event_id"]}} for e in purchases),
        key=lambda b: b["entities"]["purchase_id"],
    )
    assert scorer.scored == len(purchases) and scorer.failed == 0

    # a batch ingest refused is not scored
    bodies.clear()
    async with httpx.AsyncClient(transport=httpx.MockTransport(serving)) as client:
        scorer = PurchaseScorer(client, "http://serving", delay_s=0)
        with pytest.raises(DependencyUnavailable):
            await ScoringSender(Collect(fail=True), scorer).send(events)
        await scorer.drain()
    assert bodies == [] and scorer.scored == 0


async def test_scoring_failures_are_counted_with_on_error_and_raised_without() -> None:
    status = 404

    def serving(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"code": "not_found", "message": "unknown model 'fraud'"}})

    events = purchase_stream()
    n = sum(e["type"] == "purchase" for e in events)
    errors: list[RtmlError] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(serving)) as client:
        scorer = PurchaseScorer(client, "http://serving", delay_s=0, on_error=errors.append)
        await scorer.submit(events)
        await scorer.drain()
        assert scorer.failed == len(errors) == n and scorer.scored == 0
        assert "serving answered 404" in errors[0].message and "unknown model" in errors[0].message

        scorer = PurchaseScorer(client, "http://serving", delay_s=0)
        await scorer.submit(events)
        with pytest.raises(InvalidInput, match="404"):
            await scorer.drain()
        status = 503
        scorer = PurchaseScorer(client, "http://serving", delay_s=0)
        await scorer.submit(events)
        with pytest.raises(DependencyUnavailable):
            await scorer.drain()

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    async with httpx.AsyncClient(transport=httpx.MockTransport(unreachable)) as client:
        scorer = PurchaseScorer(client, "http://serving", delay_s=0)
        await scorer.submit(events)
        with pytest.raises(DependencyUnavailable, match="cannot reach serving"):
            await scorer.drain()


async def test_scoring_waits_the_score_delay_after_the_send() -> None:
    """Purchases are scored only after the delay: nothing is requested while the delay runs."""
    calls = 0

    def serving(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, json={})

    async with httpx.AsyncClient(transport=httpx.MockTransport(serving)) as client:
        scorer = PurchaseScorer(client, "http://serving", delay_s=1.0)
        await scorer.submit(purchase_stream())
        await asyncio.sleep(0.05)
        assert calls == 0
        await scorer.drain()
        assert calls == scorer.scored > 0


async def test_the_outcome_simulator_sends_clicks_and_posts_outcomes_only_when_asked() -> None:
    seen: dict[str, list[dict[str, Any]]] = {"recommend": [], "outcomes": [], "events": []}

    def platform(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        seen[request.url.path.rsplit("/", 1)[1]].append(body)
        if request.url.path == "/v1/recommend":
            items = [{"item_id": i, "score": 0.5} for i in body["candidates"][: body["k"]]]
            return httpx.Response(200, json={"prediction_id": f"p{len(seen['recommend'])}", "items": items})
        return httpx.Response(202, json={})

    urls = {"serving_url": "http://s", "feedback_url": "http://f", "ingest_url": "http://i"}
    world = World(20, 10, seed=1)
    done = await run_outcomes(world, **urls, rate=200, duration_s=0.3, transport=httpx.MockTransport(platform))
    assert done.rounds == len(seen["recommend"]) > 10
    assert done.outcomes == 0 and seen["outcomes"] == []
    clicks = [e for batch in seen["events"] for e in batch["events"]]
    assert done.clicks == len(clicks) > 0 and all(e["type"] == "click" for e in clicks)

    seen = {"recommend": [], "outcomes": [], "events": []}
    done = await run_outcomes(
        world, **urls, rate=200, duration_s=0.3, post_outcomes=True, transport=httpx.MockTransport(platform)
    )
    assert done.outcomes == len(seen["outcomes"]) == 3 * done.rounds
    assert {o["label"] for o in seen["outcomes"]} == {0, 1}
    assert sum(o["label"] for o in seen["outcomes"]) == done.clicks
