"""Both senders publish what ingest would: the Kafka path in ingest's normalised shape, keyed by user_id."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from rtml.core.errors import DependencyUnavailable, RtmlError
from rtml.core.schemas import Event
from rtml.core.settings import Settings
from rtml.simulate.senders import HttpSender, KafkaSender, run_clickstream
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
