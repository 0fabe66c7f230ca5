"""The blocking client and its background event batcher (a thread). Mirror of ``_async``."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
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


class Client:
    """Blocking client for the rtml services. See :mod:`rtml.client` for an example.

    ``base_url``: a host (every service on its default port, 8001-8004) or, with a port or path, one gateway
    for all; ``ingest_url`` ... ``feedback_url`` override one service each. ``api_key`` is sent as
    ``Authorization: Bearer KEY``. ``timeout`` (seconds or ``httpx.Timeout``) applies per attempt; every
    method also takes ``timeout=`` and ``retry=`` (a :class:`Retry`, ``NO_RETRY`` to fail fast).
    ``transport`` replaces the network (an ``httpx.BaseTransport``: tests, proxies); ``sleep`` and ``clock``
    replace ``time.sleep``/``time.monotonic`` for the retry waits. One connection pool per client: create
    one, share it (it is thread-safe), close it (or use ``with``).
    """

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
        transport: httpx.BaseTransport | None = None,
        limits: httpx.Limits | None = None,
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        urls: dict[Service, str | None] = {"ingest": ingest_url, "features": features_url, "serving": serving_url,
                                           "feedback": feedback_url}  # fmt: skip
        self._core = _core.Core(base_url, urls, api_key, timeout, retry, headers, max_batch_events, max_batch_bytes,
                                clock)  # fmt: skip
        self._sleep = sleep or time.sleep
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self._http = httpx.Client(transport=transport, headers=self._core.headers, timeout=timeout, limits=limits)

    @property
    def urls(self) -> dict[Service, str]:
        """Each service's base URL, as resolved."""
        return dict(self._core.urls)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _run(self, call: Call[T], timeout: TimeoutArg = None, retry: Retry | None = None) -> T:
        policy = retry or self._core.retry
        started = self._core.clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._http.request(call.method, call.url, content=call.body, params=call.params,
                                          headers=call.headers, timeout=self._core.timeout_for(timeout))  # fmt: skip
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
            self._sleep(delay)

    # -- events -----------------------------------------------------------------------------------------------
    def send_events(
        self, events: Iterable[Mapping[str, Any]], *, timeout: TimeoutArg = None, retry: Retry | None = None
    ) -> Accepted:
        """Send events (dicts of the contract's event shape), split into requests of at most 10,000 events and
        the body cap; an ``event_id`` is generated for each event without one (the caller's dicts are not
        changed) so a retried request never counts twice. Returns once every event is accepted (the broker
        acknowledged them). 422: :class:`InvalidRequest` whose ``errors`` name each bad index (into
        ``events``) and field; nothing of that request was published, ``accepted`` says how many earlier ones
        were."""
        event_ids, parts = self._core.encode_events(events)
        return self._send_chunks(event_ids, parts, timeout, retry)

    def send_event(
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
        return self.send_events([{k: v for k, v in event.items() if v is not None}], timeout=timeout,
                                retry=retry).event_ids[0]  # fmt: skip

    def _send_chunks(
        self, event_ids: list[str], parts: list[_core.Chunk], timeout: TimeoutArg, retry: Retry | None
    ) -> Accepted:
        accepted = 0
        for chunk in parts:
            try:
                accepted += self._run(self._core.events(chunk), timeout, retry)
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
    ) -> EventBatcher:
        """A background sender of events through this client; see :class:`EventBatcher`."""
        return EventBatcher(self, batch_size=batch_size, linger=linger, max_queue=max_queue, on_error=on_error)

    # -- serving ----------------------------------------------------------------------------------------------
    def predict(
        self,
        entities: Mapping[str, str | int],
        *,
        model: str | None = None,
        features: Mapping[str, float | None] | None = None,
        deadline_ms: int | None = None,
        timeout: TimeoutArg = None,
        retry: Retry | None = None,
    ) -> Prediction:
        """Score ``entities`` (e.g. ``{"user_id": "u1", "item_id": "t9"}``) with ``model`` (the server's
        default when None). ``features`` override stored ones. ``deadline_ms`` (``X-Request-Timeout-Ms``): the
        server answers within it from the model's defaults (``degraded``) when the feature store is slow."""
        return self._run(self._core.predict(entities, model, features, deadline_ms), timeout, retry)

    def recommend(
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
        """The top ``k`` of ``candidates`` for ``user_id``, best first."""
        return self._run(self._core.recommend(user_id, candidates, k, model, deadline_ms), timeout, retry)

    def models(self, *, timeout: TimeoutArg = None, retry: Retry | None = None) -> list[ModelInfo]:
        """Every model, its versions and the live one."""
        return self._run(self._core.models(), timeout, retry)

    def model(self, name: str, *, timeout: TimeoutArg = None, retry: Retry | None = None) -> ModelInfo:
        """One model of :meth:`models`; :class:`NotFound` when there is no such model."""
        return find_model(self.models(timeout=timeout, retry=retry), name)

    def promote(self, name: str, version: str, *, timeout: TimeoutArg = None, retry: Retry | None = None) -> Promoted:
        """Make ``version`` live (scope ``admin``)."""
        return self._run(self._core.promote(name, version), timeout, retry)

    def rollback(self, name: str, *, timeout: TimeoutArg = None, retry: Retry | None = None) -> Promoted:
        """Make the previously live version live again (scope ``admin``); :class:`NotFound` when none."""
        return self._run(self._core.rollback(name), timeout, retry)

    def rollout(self, name: str, *, timeout: TimeoutArg = None, retry: Retry | None = None) -> RolloutState:
        """The model's running rollout (shadow/canary candidate or guard), if any."""
        return self._run(self._core.rollout(name), timeout, retry)

    # -- feedback ---------------------------------------------------------------------------------------------
    def send_outcome(
        self,
        prediction_id: str,
        label: float | bool,
        *,
        item_id: str | None = None,
        ts: int | str | datetime | None = None,
        timeout: TimeoutArg = None,
        retry: Retry | None = None,
    ) -> None:
        """Report what happened after a prediction (``label`` 0/1 or a number); returns once accepted."""
        self._run(self._core.outcome(prediction_id, label, item_id, ts), timeout, retry)

    def quality(self, name: str, *, timeout: TimeoutArg = None, retry: Retry | None = None) -> Quality:
        """Online quality of the model's versions over its quality window."""
        return self._run(self._core.quality(name), timeout, retry)

    def decisions(
        self, name: str, *, limit: int = 50, timeout: TimeoutArg = None, retry: Retry | None = None
    ) -> list[Decision]:
        """The learning loop's decisions about the model, newest first."""
        return self._run(self._core.decisions(name, limit), timeout, retry)

    # -- features ---------------------------------------------------------------------------------------------
    def features(
        self,
        entity: str,
        id: str,
        *,
        names: Sequence[str] | None = None,
        as_of: int | None = None,
        timeout: TimeoutArg = None,
        retry: Retry | None = None,
    ) -> Features:
        """Feature values of one entity (a pair entity's id: its keys' values joined by ``|``)."""
        return self._run(self._core.features(entity, id, names, as_of), timeout, retry)

    def features_batch(
        self,
        entity: str,
        ids: Sequence[str],
        *,
        names: Sequence[str] | None = None,
        timeout: TimeoutArg = None,
        retry: Retry | None = None,
    ) -> list[Features]:
        return self._run(self._core.features_batch(entity, ids, names), timeout, retry)


class EventBatcher:
    """Sends events in the background (one thread): ``add`` queues an event and returns at once, the thread
    posts batches of up to ``batch_size`` events, waiting at most ``linger`` seconds for a batch to fill.

    Back-pressure, never an unbounded queue: ``add`` blocks while ``max_queue`` events wait (up to its
    ``timeout``, then :class:`QueueFull`; ``timeout=0`` raises at once). Nothing is dropped silently: a batch
    that still fails after the client's retries goes to ``on_error(error, events)`` when given, else is kept
    and raised by the next ``flush``/``close`` as :class:`BatcherError` with the events (their ``event_id``
    set, so sending them again counts once). ``close`` sends what is queued, then stops the thread; the
    client stays open (the caller owns it).
    """

    def __init__(
        self,
        client: Client,
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
        self._cond = threading.Condition()
        self._queue: deque[Encoded] = deque()
        self._added = 0  # events ever queued
        self._done = 0  # events sent or failed (FIFO: the first _done of _added)
        self._flushing = 0
        self._closed = False
        self._failures: list[tuple[RtmlError, list[dict[str, Any]]]] = []
        self._thread = threading.Thread(target=self._loop, name="rtml-event-batcher", daemon=True)
        self._thread.start()

    def add(self, event: Mapping[str, Any], *, timeout: float | None = None) -> str:
        """Queue one event; returns its ``event_id`` (generated when absent). Blocks while the queue is full."""
        enc = encode_event(event)
        with self._cond:
            if self._closed:
                raise RtmlError("the batcher is closed", code="closed")
            if not self._cond.wait_for(lambda: len(self._queue) < self._max_queue or self._closed, timeout):
                raise QueueFull(f"{self._max_queue} events wait to be sent (for {timeout} s)", code="queue_full")
            if self._closed:
                raise RtmlError("the batcher is closed", code="closed")
            self._queue.append(enc)
            self._added += 1
            self._cond.notify_all()
        return enc.event_id

    @property
    def pending(self) -> int:
        """Events queued or being sent."""
        with self._cond:
            return self._added - self._done

    def flush(self, timeout: float | None = None) -> None:
        """Send everything added so far now; raise :class:`BatcherError` for what failed since the last call."""
        with self._cond:
            target = self._added
            self._flushing += 1
            self._cond.notify_all()
            try:
                if not self._cond.wait_for(lambda: self._done >= target, timeout):
                    raise RtmlError(f"flush: {target - self._done} event(s) not sent within {timeout} s",
                                    code="timeout")  # fmt: skip
            finally:
                self._flushing -= 1
        self._raise_failures()

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued, stop the thread; raise :class:`BatcherError` for what failed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RtmlError(f"close: {self.pending} event(s) not sent within {timeout} s", code="timeout")
        self._raise_failures()

    def __enter__(self) -> EventBatcher:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _raise_failures(self) -> None:
        with self._cond:
            failures, self._failures = self._failures, []
        if failures:
            raise BatcherError(failures)

    def _take(self) -> list[Encoded] | None:
        """The next batch (None: closed and drained), after waiting for a full batch, a flush, close or linger."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._queue) or self._closed)
            if not self._queue:
                return None
            deadline = time.monotonic() + self._linger
            while len(self._queue) < self._batch_size and not self._flushing and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            self._cond.notify_all()  # room for blocked producers
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                ids = [e.event_id for e in batch]
                parts = chunks(batch, self._client._core.max_batch_events, self._client._core.max_batch_bytes)
                self._client._send_chunks(ids, parts, None, None)
            except Exception as exc:  # noqa: BLE001 - the thread must survive; the events are handed back
                self._failed(exc, batch)
            with self._cond:
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
            except Exception:  # a failing callback must not lose the events either
                log.exception("rtml.client: on_error raised; the events are kept for flush()")
        with self._cond:
            self._failures.append((error, events))
