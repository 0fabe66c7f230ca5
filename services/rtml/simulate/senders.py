"""Where simulated events go: ingest over HTTP, or straight to Kafka in the same shape ingest publishes.

``ScoringSender`` wraps either and, once a batch is accepted, has serving score each purchase in it
(``PurchaseScorer``), so the ``fraud`` label rule can join the chargeback that may follow.
"""

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


def _serving_error(url: str, resp: httpx.Response) -> RtmlError:
    if resp.status_code == 503:
        return DependencyUnavailable("serving", f"serving is unavailable: {resp.text[:200]}")
    return InvalidInput(f"serving answered {resp.status_code} at {url}: {resp.text[:300]}")


class PurchaseScorer:
    """Scores purchases on serving: ``POST /v1/predict {"model": model, "entities": {"user_id": ...,
    "purchase_id": <the purchase's event_id>}}``, ``delay_s`` after they were sent.

    The delay gives the features service time to fold the purchase in (the ``fraud`` features include it,
    as they did in training). Work is bounded: at most ``max_pending`` batches wait or run at once (``submit``
    waits for the oldest beyond that, slowing the clickstream rather than queueing without end) and at most
    ``concurrency`` requests are in flight. A failed predict goes to ``on_error`` (counted in ``failed``);
    without ``on_error`` it is raised by the next ``submit`` or by ``drain``.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        serving_url: str,
        *,
        model: str = "fraud",
        delay_s: float = 0.2,
        concurrency: int = 16,
        max_pending: int = 64,
        on_error: Callable[[RtmlError], None] | None = None,
    ) -> None:
        if delay_s < 0 or concurrency < 1 or max_pending < 1:
            raise ValueError("delay_s must be >= 0, concurrency and max_pending >= 1")
        self.client = client
        self.url = serving_url.rstrip("/") + "/v1/predict"
        self.model = model
        self.delay_s = delay_s
        self.max_pending = max_pending
        self.on_error = on_error
        self.scored = 0
        self.failed = 0
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, events: list[dict[str, Any]]) -> None:
        """Schedule the purchases among ``events`` (already accepted) for scoring; returns without waiting."""
        self._reap()
        purchases = [e for e in events if e.get("type") == "purchase"]
        if not purchases:
            return
        while len(self._tasks) >= self.max_pending:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            self._reap()
        self._tasks.add(asyncio.create_task(self._score_later(purchases)))

    async def drain(self) -> None:
        """Wait for every scheduled purchase to be scored (or to fail)."""
        while self._tasks:
            await asyncio.wait(self._tasks)
            self._reap()

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _reap(self) -> None:
        done = [t for t in self._tasks if t.done()]
        self._tasks.difference_update(done)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                self.cancel()
                raise exc

    async def _score_later(self, purchases: list[dict[str, Any]]) -> None:
        await asyncio.sleep(self.delay_s)
        await asyncio.gather(*(self._score(p) for p in purchases))

    async def _score(self, purchase: dict[str, Any]) -> None:
        body = {"model": self.model, "entities": {"user_id": purchase["user_id"], "purchase_id": purchase["event_id"]}}
        async with self._slots:
            try:
                try:
                    resp = await self.client.post(self.url, json=body)
                except httpx.HTTPError as exc:
                    raise DependencyUnavailable("serving", f"cannot reach serving at {self.url}: {exc!r}") from exc
                if resp.status_code != 200:
                    raise _serving_error(self.url, resp)
            except RtmlError as exc:
                if self.on_error is None:
                    raise
                self.failed += 1
                self.on_error(exc)
                return
        self.scored += 1


class ScoringSender:
    """``inner.send``, then the batch's purchases go to ``scorer`` (only once the batch was accepted)."""

    def __init__(self, inner: Sender, scorer: PurchaseScorer) -> None:
        self.inner = inner
        self.scorer = scorer

    async def send(self, events: list[dict[str, Any]]) -> None:
        await self.inner.send(events)
        await self.scorer.submit(events)


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
