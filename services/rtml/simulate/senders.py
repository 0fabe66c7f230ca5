"""Where simulated events go: ingest over HTTP, or straight to Kafka in the same shape ingest publishes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import httpx

from rtml.core.errors import DependencyUnavailable, InvalidInput, RtmlError
from rtml.core.kafka import Producer
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.ingest.validate import parse_events
from rtml.simulate.world import Clickstream, due


class Sender(Protocol):
    async def send(self, events: list[dict[str, Any]]) -> None: ...


class HttpSender:
    def __init__(self, client: httpx.AsyncClient, ingest_url: str) -> None:
        self.client = client
        self.url = ingest_url.rstrip("/") + "/v1/events"

    async def send(self, events: list[dict[str, Any]]) -> None:
        try:
            resp = await self.client.post(self.url, json={"events": events})
        except httpx.HTTPError as exc:
            raise DependencyUnavailable("ingest", f"cannot reach ingest at {self.url}: {exc!r}") from exc
        if resp.status_code == 503:
            raise DependencyUnavailable("ingest", f"ingest is unavailable: {resp.text[:200]}")
        if resp.status_code != 202:
            raise InvalidInput(f"ingest answered {resp.status_code}: {resp.text[:300]}")


class KafkaSender:
    def __init__(self, producer: Producer, settings: Settings) -> None:
        self.producer = producer
        self.max_future_ms = settings.max_future_s * 1000

    async def send(self, events: list[dict[str, Any]]) -> None:
        records = parse_events({"events": events}, now=now_ms(), max_future_ms=self.max_future_ms,
                               max_events=len(events))  # fmt: skip
        await self.producer.send_many("events", records)


async def run_clickstream(
    sender: Sender,
    stream: Clickstream,
    *,
    rate: float,
    duration_s: float | None,
    tick_s: float = 0.1,
    on_sent: Callable[[int], None] | None = None,
    on_error: Callable[[RtmlError], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Send ``rate`` events/s for ``duration_s`` seconds (None: until ``stop``); returns events sent.

    Ticks are scheduled on absolute times, so a slow send shortens the next wait instead of drifting.
    Without ``on_error`` a failed send ends the run (raises); with it, the batch is dropped, ``on_error``
    hears why, and the schedule goes on (what ``rtml up --demo`` wants while a service restarts).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    chunk = 10_000
    tick = 0
    while True:
        if stop is not None and stop.is_set():
            break
        if duration_s is not None and loop.time() - start >= duration_s:
            break
        tick += 1
        n = due(rate, tick_s, tick) - due(rate, tick_s, tick - 1)
        for i in range(0, n, chunk):
            batch = stream.batch(min(chunk, n - i), now_ms())
            try:
                await sender.send(batch)
            except RtmlError as exc:
                if on_error is None:
                    raise
                on_error(exc)
                continue
            sent += len(batch)
            if on_sent is not None:
                on_sent(len(batch))
        delay = start + tick * tick_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    return sent
