"""The asyncio client and its background event batcher (a task). Mirror of ``_sync``: same methods, awaited.

``timeout=`` parameters are httpx's per-attempt timeout (as in httpx's own async API), not a whole-call
``asyncio.timeout``: the whole call is bounded by ``Retry.max_elapsed``.
"""
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import httpx
import orjson

from rtml.client import _core
from rtml.client._core import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    Call,
    Encoded,
    Retry,
    Service,
    TimeoutArg,
    annotate,
    chunks,
    encode_event,
    find_model,
    result,
    transport_error,
)
from rtml.client.errors import BatcherError, QueueFull, RtmlError
from rtml.client.models import (
    Accepted,
    Decision,
    Features,
    ModelInfo,
    Prediction,
    Promoted,
    Quality,
    Recommendation,
    RolloutState,
)

T = TypeVar("T")
log = logging.getLogger("rtml.client")
OnError = Callable[[RtmlError, list[dict[str, Any]]], None]


class AsyncClient:
    """Asyncio client for the rtml services: the same constructor and methods as :class:`rtml.client.Client`,
    awaited (``transport`` is an ``httpx.AsyncBaseTransport``, e.g. ``httpx.ASGITransport(app)``; ``sleep`` an
    async function). Close with ``await client.aclose()`` or ``async with``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1",
        *,
        ingest_url: str | None = None,
        features_url: str | None = None,
        serving_url: str | None = None,
        feedback_url: str | None = None,
        api_key: str | None = None,
        timeout: TimeoutArg = 10.0,
        retry: Retry | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: httpx.Limits | None = None,
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        urls: dict[Service, str | None] = {"ingest": ingest_url, "features": features_url, "serving": serving_url,
                                           "feedback": feedback_url}  # fmt: skip
        self._core = _core.Core(base_url, urls, api_key, timeout, retry, headers, max_batch_events, max_batch_bytes,
                                clock)  # fmt: skip
        self._sleep = sleep or asyncio.sleep
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self._http = httpx.AsyncClient(transport=transport, headers=self._core.headers, timeout=timeout, limits=limits)

    @property
    def urls(self) -> dict[Service, str]:
        return dict(self._core.urls)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def _run(self, call: Call[T], timeout: TimeoutArg = None, retry: Retry | None = None) -> T:
        policy = retry or self._core.retry
        started = self._core.clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = await self._http.request(
                    call.method, call.url, content=call.body, params=call.params, headers=call.headers,
                    timeout=self._core.timeout_for(timeout),
                )  # fmt: skip
                return result(call, resp)
            except httpx.TransportError as exc:
                error: RtmlError = transport_error(exc)
            except RtmlError as exc:
                error = exc
            delay = policy.next_delay(error, attempt, self._core.clock() - started, call.idempotent)
            if delay is None:
                raise error
            log.debug("rtml.client: %s %s failed (%s); retry %d in %.2f s", call.method, call.url, error, attempt,
                      delay)  # fmt: skip
            await self._sleep(delay)

    # -- events -----------------------------------------------------------------------------------------------
    async def send_events(
        self, events: Iterable[Mapping[str, Any]], *, timeout: TimeoutArg = None, retry: Retry | None = None
    ) -> Accepted:
        """See :meth:`rtml.client.Client.send_events`."""
        event_ids, parts = self._core.encode_events(events)
        return await self._send_chunks(event_ids, parts, timeout, retry)

    async def send_event(
        self,
        type: str,
        *,
        user_id: str | None = None,
        item_id: str | None = None,
        ts: int | str | datetime | None = None,
        properties: Mapping[str, bool | int | float | str] | None = None,
        event_id: str | None = None,
        timeout: TimeoutArg = None,
        retry: Retry | None = None,
    ) -> str:
        """Send one event; returns its ``event_id``."""
        event = {"event_id": event_id, "type": type, "user_id": user_id, "item_id": item_id, "ts": ts,
                 "properties": dict(properties) if properties else None}  # fmt: skip
        accepted = await self.send_events([{k: v for k, v in event.items() if v is not None}], timeout=timeout,
                                          retry=retry)  # fmt: skip
        return accepted.event_ids[0]

    async def _send_chunks(
        self, event_ids: list[str], parts: list[_core.Chunk], timeout: TimeoutArg, retry: Retry | None
    ) -> Accepted:
        accepted = 0
        for chunk in parts:
            try:
                accepted += await self._run(self._core.events(chunk), timeout, retry)
            except RtmlError as exc:
                raise annotate(exc, chunk, accepted, event_ids) from exc.__cause__
        return Accepted(accepted=accepted, event_ids=event_ids, requests=len(parts))

    def batcher(
        self,
        *,
        batch_size: int = 1_000,
        linger: float = 0.1,
        max_queue: int = 10_000,
        on_error: OnError | None = None,
    ) -> AsyncEventBatcher:
        """A background sender of events through this client (call inside the running loop)."""
        return AsyncEventBatcher(self, batch_size=batch_size, linger=linger, max_queue=max_queue, on_error=on_error)

    # -- serving ----------------------------------------------------------------------------------------------
    async def predict(
        self,
        entities: Mapping[str, str | int],
        *,
        model: str | None = None,
        features: Mapping[str, float | None] | None = None,
        deadline_ms: int | None = None,
        timeout: TimeoutArg = None,
        retry: Retry | None = None,
    ) -> Prediction:
        """See :meth:`rtml.client.Client.predict`."""
        return await self._run(self._core.predict(entities, model, features, deadline_ms), timeout, retry)

    async def recommend(
        self,
        user_id: str,
        candidates: Sequence[str],
        *,
        k: int = 10,
        model: str | None = None,
        deadline_ms: int | None = None,
        timeout: TimeoutArg = None,
        retry: Retry | None = None,
    ) -> Recommendation:
        return await self._run(self._core.recommend(user_id, candidates, k, model, deadline_ms), timeout, retry)

    async def models(self, *, timeout: TimeoutArg = None, retry: Retry | None = None) -> list[ModelInfo]:
        return await self._run(self._core.models(), timeout, retry)

    async def model(self, name: str, *, timeout: TimeoutArg = None, retry: Retry | None = None) -> ModelInfo:
        return find_model(await self.models(timeout=timeout, retry=retry), name)

    async def promote(
        self, name: str, version: str, *, timeout: TimeoutArg = None, retry: Retry | None = None
    ) -> Promoted:
        return await self._run(self._core.promote(name, version), timeout, retry)

    async def rollback(self, name: str, *, timeout: TimeoutArg = None, retry: Retry | None = None) -> Promoted:
        return await self._run(self._core.rollback(name), timeout, retry)

    async def rollout(self, name: str, *, timeout: TimeoutArg = None, retry: Retry | None = None) -> RolloutState:
        return await self._run(self._core.rollout(name), timeout, retry)

    # -- feedback ---------------------------------------------------------------------------------------------
    async def send_outcome(
        self,
        prediction_id: str,
        label: float | bool,
        *,
        item_id: str | None = None,
        ts: int | str | datetime | None = None,
        timeout: TimeoutArg = None,
        retry: Retry | None = None,
    ) -> None:
        await self._run(self._core.outcome(prediction_id, label, item_id, ts), timeout, retry)

    async def quality(self, name: str, *, timeout: TimeoutArg = None, retry: Retry | None = None) -> Quality:
        return await self._run(self._core.quality(name), timeout, retry)

    async def decisions(
        self, name: str, *, limit: int = 50, timeout: TimeoutArg = None, retry: Retry | None = None
    ) -> list[Decision]:
        return await self._run(self._core.decisions(name, limit), timeout, retry)

    # -- features ---------------------------------------------------------------------------------------------
    async def features(
        self,
        entity: str,
        id: str,
        *,
        names: Sequence[str] | None = None,
        as_of: int | None = None,
        timeout: TimeoutArg = None,
        retry: Retry | None = None,
    ) -> Features:
        return await self._run(self._core.features(entity, id, names, as_of), timeout, retry)

    async def features_batch(
        self,
        entity: str,
        ids: Sequence[str],
        *,
        names: Sequence[str] | None = None,
        timeout: TimeoutArg = None,
        retry: Retry | None = None,
    ) -> list[Features]:
        return await self._run(self._core.features_batch(entity, ids, names), timeout, retry)


class AsyncEventBatcher:
    """The asyncio twin of :class:`rtml.client.EventBatcher` (one task instead of a thread): ``await add``
    waits while ``max_queue`` events wait (back-pressure; ``timeout`` then :class:`QueueFull`), ``await
    flush()``, ``await close()`` (or ``async with``). Create it inside the running event loop."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        batch_size: int = 1_000,
        linger: float = 0.1,
        max_queue: int = 10_000,
        on_error: OnError | None = None,
    ) -> None:
        if batch_size < 1 or max_queue < 1:
            raise ValueError("batch_size and max_queue must be at least 1")
        self._client = client
        self._batch_size = min(batch_size, client._core.max_batch_events)
        self._linger = linger
        self._max_queue = max_queue
        self._on_error = on_error
        self._cond = asyncio.Condition()
        self._queue: deque[Encoded] = deque()
        self._added = 0
        self._done = 0
        self._flushing = 0
        self._closed = False
        self._failures: list[tuple[RtmlError, list[dict[str, Any]]]] = []
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="rtml-event-batcher")

    async def add(self, event: Mapping[str, Any], *, timeout: float | None = None) -> str:
        """Queue one event; returns its ``event_id``. Waits while the queue is full."""
        enc = encode_event(event)
        async with self._cond:
            if self._closed:
                raise RtmlError("the batcher is closed", code="closed")
            try:
                async with asyncio.timeout(timeout):
                    await self._cond.wait_for(lambda: len(self._queue) < self._max_queue or self._closed)
            except TimeoutError:
                raise QueueFull(f"{self._max_queue} events wait to be sent (for {timeout} s)",
                                code="queue_full") from None  # fmt: skip
            if self._closed:
                raise RtmlError("the batcher is closed", code="closed")
            self._queue.append(enc)
            self._added += 1
            self._cond.notify_all()
        return enc.event_id

    @property
    def pending(self) -> int:
        return self._added - self._done

    async def flush(self, timeout: float | None = None) -> None:
        async with self._cond:
            target = self._added
            self._flushing += 1
            self._cond.notify_all()
            try:
                async with asyncio.timeout(timeout):
                    await self._cond.wait_for(lambda: self._done >= target)
            except TimeoutError:
                raise RtmlError(f"flush: {target - self._done} event(s) not sent within {timeout} s",
                                code="timeout") from None  # fmt: skip
            finally:
                self._flushing -= 1
        self._raise_failures()

    async def close(self, timeout: float | None = None) -> None:
        async with self._cond:
            self._closed = True
            self._cond.notify_all()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            raise RtmlError(f"close: {self.pending} event(s) not sent within {timeout} s", code="timeout") from None
        self._raise_failures()

    async def __aenter__(self) -> AsyncEventBatcher:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _raise_failures(self) -> None:
        failures, self._failures = self._failures, []
        if failures:
            raise BatcherError(failures)

    async def _take(self) -> list[Encoded] | None:
        loop = asyncio.get_running_loop()
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._queue) or self._closed)
            if not self._queue:
                return None
            deadline = loop.time() + self._linger
            while len(self._queue) < self._batch_size and not self._flushing and not self._closed:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        await self._cond.wait()
                except TimeoutError:
                    break
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            self._cond.notify_all()
            return batch

    async def _loop(self) -> None:
        while (batch := await self._take()) is not None:
            try:
                ids = [e.event_id for e in batch]
                parts = chunks(batch, self._client._core.max_batch_events, self._client._core.max_batch_bytes)
                await self._client._send_chunks(ids, parts, None, None)
            except Exception as exc:  # noqa: BLE001 - the task must survive; the events are handed back
                self._failed(exc, batch)
            async with self._cond:
                self._done += len(batch)
                self._cond.notify_all()

    def _failed(self, exc: Exception, batch: list[Encoded]) -> None:
        error = exc if isinstance(exc, RtmlError) else RtmlError(f"{type(exc).__name__}: {exc}", code="client")
        events = [orjson.loads(e.json) for e in batch]
        log.warning("rtml.client: %d event(s) could not be sent: %s", len(events), error)
        if self._on_error is not None:
            try:
                self._on_error(error, events)
                return
            except Exception:
                log.exception("rtml.client: on_error raised; the events are kept for flush()")
        self._failures.append((error, events))
