"""The one Kafka layer: client options, explicit topic creation, a producer, a consumer-group loop.

Works on Apache Kafka and on the embedded Tansu broker; it relies on nothing only Tansu does. Consumers
never trust ``latest``/``end_offsets`` (wrong on Tansu with batching producers): they start from the
committed offset or ``earliest`` and commit manually after a batch is fully applied, so every handler
must be idempotent (rtml's are: features dedup by event_id, feedback by prediction_id).

Consumer lag (``rtml_consumer_lag_records``) is the partition's end minus the group's committed offset. The
end is the larger of the high watermark of the latest fetch response (exact on both brokers, but only as
fresh as the last fetch of that partition) and a periodic ListOffsets ``end_offsets`` (always fresh on
Apache Kafka; on Tansu it answers the base offset of the last record batch, i.e. too low, measured) — so it is
right on both and never negative.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from rtml.core import metrics
from rtml.core.errors import DependencyUnavailable, RtmlError, UnprocessableRecord
from rtml.core.schemas import SCHEMA_HEADER, SCHEMA_VERSION, schema_mismatch
from rtml.core.settings import KafkaSettings, Settings

log = logging.getLogger(__name__)

TOPICS = ("events", "predictions", "outcomes", "examples", "models", "deadletter")
REASON_HEADER = "rtml-reason"
Headers = list[tuple[str, bytes]]
_Entry = tuple[list[tuple[bytes | None, bytes]], Headers, "asyncio.Future[None]"]  # records queued by one caller


def client_options(k: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by producer, consumer and admin client."""
    if not k.bootstrap:
        raise DependencyUnavailable("kafka", "RTML_KAFKA_BOOTSTRAP is not set")
    opts: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap,
        "client_id": k.client_id,
        "security_protocol": k.security_protocol,
        "request_timeout_ms": k.request_timeout_ms,
    }
    if k.security_protocol in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=k.ssl_cafile)
        if k.ssl_certfile:
            ctx.load_cert_chain(k.ssl_certfile, k.ssl_keyfile)
        opts["ssl_context"] = ctx
    if k.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = k.sasl_mechanism or "PLAIN"
        opts["sasl_plain_username"] = k.sasl_username
        opts["sasl_plain_password"] = k.sasl_password.get_secret_value() if k.sasl_password else None
    return opts


async def create_topics(settings: Settings, names: Sequence[str] = TOPICS) -> None:
    """Create rtml's topics with explicit partition counts (auto-creation picks its own). Idempotent."""
    k = settings.kafka
    admin = AIOKafkaAdminClient(**client_options(k))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(settings.topic(n), num_partitions=k.partitions, replication_factor=k.replication_factor)
            for n in names
            if settings.topic(n) not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    finally:
        await admin.close()


def encode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return orjson.dumps(value)


class Producer:
    """acks=all producer. ``send_many`` returns only once the broker acknowledged every record."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        k = settings.kafka
        self._producer = AIOKafkaProducer(
            **client_options(k),
            acks="all",
            enable_idempotence=k.enable_idempotence,
            linger_ms=k.linger_ms,
            max_batch_size=256 * 1024,
            max_request_size=16 * 1024 * 1024,
        )
        self._started = False
        # topic -> (partition count, key -> partition): murmur2 is pure Python in aiokafka (~1.5 us a key)
        self._partition_cache: dict[str, tuple[int, dict[bytes, int]]] = {}
        # (topic, partition) -> records waiting for the flusher (bounded by the callers waiting on them)
        self._queued: dict[tuple[str, int], list[_Entry]] = {}
        self._flushers: dict[tuple[str, int], asyncio.Task[None]] = {}

    async def start(self) -> None:
        """Connect; ``DependencyUnavailable`` when the broker does not answer. A failed start closes the
        aiokafka client (no leaked connection, no "Unclosed AIOKafkaProducer"): make a new Producer to retry."""
        try:
            await self._producer.start()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            if isinstance(exc, KafkaError):
                raise DependencyUnavailable("kafka", f"cannot connect to Kafka: {exc}") from exc
            raise
        self._started = True
        for topic in TOPICS:  # series at 0 from the start (see ConsumerLoop.__init__)
            metrics.KAFKA_PUBLISH_ERRORS.labels(topic=self._settings.topic(topic))

    async def stop(self) -> None:
        if self._started:
            self._started = False
            for task in list(self._flushers.values()):
                task.cancel()
            await self._producer.stop()

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def send_many(
        self, topic: str, records: Sequence[tuple[bytes | None, bytes]], headers: Headers | None = None
    ) -> None:
        """Publish ``(key, value)`` records to the topic *name* (without prefix) and wait for acks=all.

        Records are grouped by partition (the Java client's murmur2 of the key, so a user's records share a
        partition whoever produced them; keyless records share one random partition per call) and queued
        per partition; one flusher per partition turns everything queued into whole record batches
        (aiokafka's batch API: ~1.3 us a record instead of ~9 us through ``send()``), so concurrent callers
        share batches the way ``linger`` would make them.

        ``DependencyUnavailable`` (503) after ``publish_timeout_s`` without every ack: the records no flusher
        took yet are withdrawn (never sent), those already handed to aiokafka may still be published, so a
        503 means "not acknowledged", not "not published": a caller retries with the same ids (event_id is
        the dedup key) and each record counts once.
        """
        full = self._settings.topic(topic)
        hdrs = [(SCHEMA_HEADER, SCHEMA_VERSION.encode()), *(headers or [])]
        loop = asyncio.get_running_loop()
        started = loop.time()
        queued: list[tuple[tuple[str, int], _Entry]] = []
        acked = False
        try:
            waits = []
            for partition, recs in (await self._by_partition(full, records)).items():
                done: asyncio.Future[None] = loop.create_future()
                entry: _Entry = (recs, hdrs, done)
                self._queued.setdefault((full, partition), []).append(entry)
                queued.append(((full, partition), entry))
                if (full, partition) not in self._flushers:
                    self._flushers[(full, partition)] = asyncio.create_task(self._flush(full, partition))
                waits.append(done)
            if waits:
                await asyncio.wait_for(asyncio.gather(*waits), timeout=self._settings.kafka.publish_timeout_s)
            acked = True
        except (KafkaError, TimeoutError) as exc:
            metrics.KAFKA_PUBLISH_ERRORS.labels(topic=topic).inc()
            raise DependencyUnavailable("kafka", f"Kafka did not acknowledge the publish: {exc!r}") from exc
        finally:
            if not acked:  # timed out, failed or cancelled: what no flusher took yet is never sent
                self._withdraw(queued)
        metrics.KAFKA_PUBLISH_SECONDS.labels(topic=topic).observe(loop.time() - started)
        metrics.KAFKA_PUBLISHED.labels(topic=topic).inc(len(records))

    def _withdraw(self, queued: list[tuple[tuple[str, int], _Entry]]) -> None:
        """Take a failed caller's records out of the queues (by identity: a client's retry of the same records
        may be queued too). Without this, records of callers that gave up during a broker outage would pile up
        (every retry adds a copy) and all go out once it is back: the queue would grow with the outage."""
        for tp, entry in queued:
            waiting = self._queued.get(tp)
            if waiting:
                for i, other in enumerate(waiting):
                    if other is entry:
                        del waiting[i]
                        break

    async def _flush(self, topic: str, partition: int) -> None:
        """Send what callers queued for one partition, as few batches as fit, until the queue is empty.

        aiokafka keeps one open batch per partition and makes ``send_batch`` wait until the previous one was
        taken for sending; records queued meanwhile go out together in the next round."""
        tp = (topic, partition)
        entries: list[_Entry] = []
        try:
            while self._queued.get(tp):
                entries = self._queued.pop(tp)
                waiters = [done for _, _, done in entries]
                try:
                    sent = await self._send_batches(topic, partition, entries)
                except Exception as exc:  # noqa: BLE001 -- handed to every waiting caller
                    _settle(waiters, exc)
                    continue
                sent.add_done_callback(functools.partial(_settle_from, waiters))
        except asyncio.CancelledError:
            stopped = KafkaError("the producer stopped")
            _settle([done for _, _, done in entries + self._queued.pop(tp, [])], stopped)
            raise
        finally:
            del self._flushers[tp]

    async def _send_batches(self, topic: str, partition: int, entries: list[_Entry]) -> asyncio.Future[Any]:
        futures = []
        batch = self._producer.create_batch()
        for recs, hdrs, done in entries:
            if done.done():  # its caller gave up (timeout) while the flusher held it: not sent
                continue
            for key, value in recs:
                if batch.append(key=key, value=value, timestamp=None, headers=hdrs) is None:
                    batch.close()
                    futures.append(await self._producer.send_batch(batch, topic, partition=partition))
                    batch = self._producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None, headers=hdrs) is None:
                        raise MessageSizeTooLargeError(f"a record of {len(value)} bytes exceeds the batch size")
        batch.close()
        if batch.record_count():  # none at all when every caller gave up: nothing to send
            futures.append(await self._producer.send_batch(batch, topic, partition=partition))
        return asyncio.gather(*futures)

    async def _by_partition(
        self, topic: str, records: Sequence[tuple[bytes | None, bytes]]
    ) -> dict[int, list[tuple[bytes | None, bytes]]]:
        partitions = sorted(await self._producer.partitions_for(topic))
        cached = self._partition_cache.get(topic)
        if cached is None or cached[0] != len(partitions) or len(cached[1]) > 100_000:  # bounded; new count: redo
            cached = self._partition_cache[topic] = (len(partitions), {})
        memo = cached[1]
        out: dict[int, list[tuple[bytes | None, bytes]]] = {}
        keyless: int | None = None
        for key, value in records:
            if key is None:
                if keyless is None:
                    keyless = random.choice(partitions)  # noqa: S311 -- load spreading, not security
                p = keyless
            else:
                p = memo.get(key, -1)
                if p < 0:
                    p = memo[key] = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
            group = out.get(p)
            if group is None:
                out[p] = [(key, value)]
            else:
                group.append((key, value))
        return out

    async def send(self, topic: str, value: Any, key: bytes | None = None, headers: Headers | None = None) -> None:
        await self.send_many(topic, [(key, encode(value))], headers)

    async def ping(self, timeout_s: float = 1.0) -> None:
        """Raise DependencyUnavailable unless the broker answers a metadata request."""
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout_s)
        except Exception as exc:
            raise DependencyUnavailable("kafka", f"Kafka does not answer: {exc!r}") from exc

    async def dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        """Park a record that cannot be processed, with its reason and origin in headers."""
        headers: Headers = [
            (REASON_HEADER, reason.encode()[:4096]),
            ("rtml-source-topic", str(record.topic).encode()),
            ("rtml-source-partition", str(record.partition).encode()),
            ("rtml-source-offset", str(record.offset).encode()),
        ]
        await self.send_many("deadletter", [(record.key, record.value or b"")], headers)
        metrics.DEAD_LETTERS.labels(topic=str(record.topic)).inc()


def _settle(waiters: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    for done in waiters:
        if not done.done():  # a caller that timed out cancelled its own
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)


def _settle_from(waiters: list[asyncio.Future[None]], sent: asyncio.Future[Any]) -> None:
    if sent.cancelled():
        _settle(waiters, KafkaError("publish cancelled"))
    else:
        _settle(waiters, sent.exception())


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Consumed(Generic[T]):
    record: ConsumerRecord
    value: T


Batches = dict[TopicPartition, list[ConsumerRecord]]
Decoder = Callable[[ConsumerRecord], T]
Handler = Callable[[list[Consumed[T]]], Awaitable[None]]


class Buffer(Protocol):
    """What a handler keeps in memory between commits, for ``ConsumerLoop(buffer=...)`` (e.g. rows that are
    written to a file in batches). The handler adds every record it handles to it; the loop commits a batch's
    offsets only once a later ``flush()`` returned, so a record is acknowledged only once it is durable."""

    def room(self) -> int:
        """How many more records may be handled before the buffer must be flushed (the fetch limit)."""
        ...

    def due(self) -> bool:
        """Whether what was handled since the last flush should be flushed and committed now (full, old enough,
        or nothing buffered at all: then only offsets, e.g. of dead-lettered records, are committed)."""
        ...

    async def flush(self) -> None:
        """Make durable everything handled so far, then forget it. Raise to keep it (retried with backoff)."""
        ...

    def discard(self) -> None:
        """Forget everything buffered: those records will be delivered again from the committed offsets."""
        ...


class ConsumerLoop(Generic[T]):
    """A consumer-group member that decodes, handles and commits micro-batches.

    - a record that carries another ``rtml-schema`` version than this code's is never decoded (it would be
      misread): it goes to the dead-letter topic, or is skipped with ``foreign_schema="skip"`` (a consumer
      that reads another consumer's topic, whose owner dead-letters it once);
    - a record that fails to decode (any exception) goes to the dead-letter topic;
    - the handler gets the decoded batch; if it raises a retriable error nothing is committed, the
      consumer seeks back to the batch start and retries with backoff (so a Redis outage pauses it);
    - offsets are committed only after the handler returned;
    - ``stop()`` (or SIGTERM handled by the caller) finishes the current batch, commits, and leaves;
    - an unexpected error ends ``run()``; under ``run_in_background`` the loop restarts from the committed
      offsets (``rtml_consumer_restarts_total``).

    With a ``buffer`` (a handler that makes records durable in batches, see ``Buffer``) a handled batch is not
    committed at once: its offsets wait until the buffer is flushed, which the loop does when the buffer is
    ``due()`` or full, before this member's partitions are revoked in a rebalance, and when ``run()`` ends
    (not when it is cancelled: that is a crash, the records are delivered again). The loop never fetches more
    than the buffer has ``room()`` for, so it never grows past its flush size. A failed flush commits nothing
    and is retried with backoff (the loop reports not ready meanwhile); if it still fails when the partitions
    are revoked, or the loop restarts, the buffer is discarded and its records come again from the commit.
    Batches are then handled one at a time (``max_in_flight`` must be 1).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        topics: Sequence[str],
        group_id: str | None,
        decode: Decoder[T],
        handle: Handler[T],
        producer: Producer,
        max_records: int | None = None,
        max_in_flight: int = 1,
        fetch_max_wait_ms: int | None = None,
        buffer: Buffer | None = None,
        foreign_schema: Literal["dead_letter", "skip"] = "dead_letter",
    ) -> None:
        """``fetch_max_wait_ms`` overrides the setting for consumers that need no low latency: Tansu answers
        a fetch only when its wait is over, so a short wait is many requests a second even when idle.

        ``group_id=None``: no consumer group. The loop reads every partition from the earliest record and
        commits nothing; its position lives in the process only (a restart after a failure resumes from it).
        For broadcasts every replica must see (serving's promotions): a group per replica would leave one
        abandoned group on the brokers per restart, listed, alerting on its lag, and kept for
        ``offsets.retention.minutes`` (7 days by default). Handlers must be idempotent: when partitions are
        added to the topic, aiokafka assigns every partition afresh and they are all read again from the start."""
        if buffer is not None and max_in_flight != 1:
            raise ValueError("a buffered consumer loop handles one batch at a time (max_in_flight=1)")
        if buffer is not None and group_id is None:
            raise ValueError("a buffered consumer loop commits what it flushed: it needs a group")
        k = settings.kafka
        self.name = name
        self._settings = settings
        self._decode = decode
        self._dead_letter_foreign = foreign_schema == "dead_letter"
        self._handle = handle
        self._producer = producer
        self._max_records = max_records or k.max_poll_records
        self._max_in_flight = max(1, max_in_flight)
        self._stopping = asyncio.Event()
        self._topics = [settings.topic(t) for t in topics]
        # the lag metric's group label: "" for a loop without a group
        self.group = f"{settings.topic_prefix}{group_id}" if group_id is not None else ""
        self._consumer = AIOKafkaConsumer(
            **client_options(k),
            group_id=self.group or None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=k.fetch_max_wait_ms if fetch_max_wait_ms is None else fetch_max_wait_ms,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_records=self._max_records,
        )
        self.processed = 0
        self.healthy = True
        self._task: asyncio.Task[int] | None = None
        self._buffer = buffer
        # buffered mode: offsets handled but not yet flushed, and how many records they cover
        self._pending: dict[TopicPartition, int] = {}
        self._pending_n = 0
        self._flush_lock = asyncio.Lock()  # one of: handle a batch, flush + commit, revoke
        self._revocations = 0  # a batch fetched before a revocation is stale
        # lag: per owned partition, the group's committed offset and the end offset the broker last listed
        self._committed: dict[TopicPartition, int] = {}
        # without a group: the position handled so far, per partition (what a commit would have stored). Kept
        # apart from ``_committed``, which the lag watcher empties when ``run()`` ends, before a restart seeks.
        self._position: dict[TopicPartition, int] = {}
        self._listed: dict[TopicPartition, int] = {}
        self._lag_wake = asyncio.Event()
        self._consumer.subscribe(self._topics, listener=_OnRebalance(self))
        # every counter series this loop can move exists from the start, at 0: a rate() or increase() needs
        # a sample before the first increment, or it misses it (the first dead letter, the first retry)
        metrics.CONSUMER_RESTARTS.labels(consumer=name)
        metrics.CONSUMER_RETRIES.labels(consumer=name)
        metrics.CONSUMED.labels(consumer=name)
        for topic in self._topics:
            metrics.DEAD_LETTERS.labels(topic=topic)

    async def start(self) -> None:
        try:
            await self._consumer.start()
        except BaseException as exc:
            await self._consumer.stop()  # no half-started client left behind (sockets, background tasks)
            if isinstance(exc, KafkaError):
                raise DependencyUnavailable("kafka", f"consumer cannot connect: {exc}") from exc
            raise

    async def stop(self) -> None:
        self._stopping.set()

    def run_in_background(self) -> asyncio.Task[int]:
        """Start ``run()`` as a supervised task; ``ready()`` then reports whether it is consuming."""
        self._task = asyncio.create_task(self._supervise(), name=f"consumer-{self.name}")
        return self._task

    async def _supervise(self) -> int:
        """``run()``, restarted after an unexpected error (a bug, a client-library surprise) instead of leaving
        a live process that consumes nothing. Before a restart every assigned partition goes back to its
        committed offset, so the batches that were in flight are delivered again, not skipped."""
        backoff = 1.0
        while True:
            try:
                return await self.run()
            except Exception:
                if self._stopping.is_set():
                    raise
                self.healthy = False
                metrics.CONSUMER_RESTARTS.labels(consumer=self.name).inc()
                log.exception("%s: the consumer loop failed; restarting from the committed offsets in %.0f s",
                              self.name, backoff)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            if self._stopping.is_set():
                return self.processed
            backoff = min(backoff * 2, 30.0)
            async with self._flush_lock:
                self._discard()  # run() failed: what it buffered comes again from the committed offsets
            try:
                await self._seek_to_committed()
            except Exception as exc:  # noqa: BLE001 -- the next round tries again
                log.warning("%s: cannot seek to the committed offsets yet: %r", self.name, exc)

    async def _seek_to_committed(self) -> None:
        for tp in self._consumer.assignment():
            offset = await self._committed_offset(tp)
            if offset is None:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, offset)

    async def _committed_offset(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of ``tp`` (None: never committed); without a group, the position this
        process has handled up to."""
        if not self.group:
            return self._position.get(tp)
        offset: int | None = await self._consumer.committed(tp)
        return offset

    async def ready(self) -> None:
        """Readiness check: the loop runs and its last batch did not fail with a retriable error."""
        task = self._task
        if task is None or task.done():
            raise DependencyUnavailable("consumer", f"the {self.name} consumer is not running")
        if not self.healthy:
            raise DependencyUnavailable("consumer", f"the {self.name} consumer is retrying a batch")

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop after the current batch (committed), then leave the group."""
        await self.stop()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout_s)
        await self.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._consumer.stop()

    async def __aenter__(self) -> ConsumerLoop[T]:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run(self, *, timeout: float | None = None, count: int | None = None) -> int:  # noqa: ASYNC109
        """Consume until stopped, or until ``timeout`` seconds passed, or ``count`` records were handled.

        Up to ``max_in_flight`` batches are handled at once (the next batch is decoded and planned while the
        previous one waits on Redis); offsets are still committed strictly in order, each only after its
        batch and every batch before it succeeded.
        """
        lag_task = asyncio.create_task(self._watch_lag(), name=f"lag-{self.name}")
        try:
            return await self._run(timeout, count)
        finally:
            lag_task.cancel()
            with contextlib.suppress(BaseException):
                await lag_task

    async def _run(self, timeout: float | None, count: int | None) -> int:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        backoff = 0.1
        inflight: deque[tuple[asyncio.Task[None], Batches]] = deque()
        while not self._stopping.is_set():
            if deadline is not None and loop.time() >= deadline:
                break
            if count is not None and self.processed >= count:
                break
            limit = self._max_records
            if self._buffer is not None:
                if self._pending and (self._buffer.due() or self._buffer.room() <= 0):
                    async with self._flush_lock:
                        flushed = await self._flush()
                    if not flushed:  # fetch nothing more until the buffer is durable
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stopping.wait(), backoff)
                        backoff = min(backoff * 2, 5.0)
                    else:
                        backoff = 0.1
                    continue  # committed (or not): check the stop conditions before fetching more
                limit = max(1, min(limit, self._buffer.room()))
            batches: Batches = {}
            if len(inflight) < self._max_in_flight:
                revocations = self._revocations
                try:
                    batches = await self._consumer.getmany(timeout_ms=0 if inflight else 100, max_records=limit)
                except KafkaError as exc:
                    log.warning("%s: fetch failed (%s); retrying", self.name, exc)
                    await asyncio.sleep(0.5)
                    continue
                self._report_lag()
                if batches:
                    inflight.append((asyncio.create_task(self._work(batches, revocations)), batches))
            if not inflight or (batches and len(inflight) < self._max_in_flight and not inflight[0][0].done()):
                continue
            task, done = inflight.popleft()
            try:
                await task
            except RtmlError as exc:
                if not exc.retriable:
                    raise
                await self._rewind(done, inflight, exc, backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            await self._commit(done)
            self.healthy = True
            backoff = 0.1
        while inflight:  # stopping: finish what is in flight, commit what succeeded in order
            task, done = inflight.popleft()
            try:
                await task
            except RtmlError:
                break  # not committed: redelivered after the restart
            await self._commit(done)
        for task, _ in inflight:
            with contextlib.suppress(BaseException):
                await task
        if self._buffer is not None and self._pending:
            async with self._flush_lock:
                if not await self._flush():
                    self._discard()  # not committed: the next owner of the partitions gets them again
        return self.processed

    async def _rewind(self, failed: Batches, inflight: deque[tuple[asyncio.Task[None], Batches]],
                      exc: RtmlError, backoff: float) -> None:  # fmt: skip
        """A retriable failure: let the other batches finish, seek back to the oldest uncommitted record, wait."""
        self.healthy = False
        log.warning("%s: %s; retrying from the last commit in %.1f s", self.name, exc.message, backoff)
        metrics.CONSUMER_RETRIES.labels(consumer=self.name).inc()
        first: dict[TopicPartition, int] = {tp: records[0].offset for tp, records in failed.items()}
        while inflight:
            task, later = inflight.popleft()
            with contextlib.suppress(Exception):
                await task
            for tp, records in later.items():
                first[tp] = min(first.get(tp, records[0].offset), records[0].offset)
        assigned = self._consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:  # a partition lost in a rebalance restarts from its commit at its new owner
                self._consumer.seek(tp, offset)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), backoff)

    async def _isolate(self, batch: list[Consumed[T]], cause: BaseException) -> None:
        """The batch failed for a non-retriable reason: retry record by record, dead-letter the culprits."""
        log.warning("%s: batch failed (%r); retrying record by record", self.name, cause)
        for item in batch:
            try:
                await self._handle([item])
            except RtmlError as exc:
                if exc.retriable:
                    raise
                await self._producer.dead_letter(item.record, f"{type(exc).__name__}: {exc}")
            except Exception as exc:
                await self._producer.dead_letter(item.record, f"{type(exc).__name__}: {exc}")

    async def _work(self, batches: Batches, revocations: int) -> None:
        """Decode and handle one batch; no commit. Buffered: also note its offsets as pending, atomically with
        the handling as far as a revocation is concerned, and drop a batch fetched before a revocation."""
        if self._buffer is None:
            await self._apply(batches)
            return
        async with self._flush_lock:
            if revocations != self._revocations:
                # Fetched under the previous assignment. Whatever is still ours restarts from its commit.
                assigned = self._consumer.assignment()
                for tp in batches:
                    if tp in assigned:
                        committed = await self._consumer.committed(tp)
                        if committed is None:
                            await self._consumer.seek_to_beginning(tp)
                        else:
                            self._consumer.seek(tp, committed)
                return
            await self._apply(batches)
            for tp, records in batches.items():
                self._pending[tp] = records[-1].offset + 1
                self._pending_n += len(records)

    async def _apply(self, batches: Batches) -> None:
        """Decode (undecodable records go to the dead-letter topic) and handle one batch."""
        decoded: list[Consumed[T]] = []
        for records in batches.values():
            for rec in records:
                mismatch = schema_mismatch(rec.headers)
                if mismatch is not None:
                    if self._dead_letter_foreign:
                        await self._producer.dead_letter(rec, f"UnprocessableRecord: {mismatch}")
                    continue
                try:
                    decoded.append(Consumed(rec, self._decode(rec)))
                except Exception as exc:  # any record that cannot be decoded is a poison record
                    await self._producer.dead_letter(rec, f"{type(exc).__name__}: {exc}")
        if decoded:
            try:
                await self._handle(decoded)
            except RtmlError as exc:
                if exc.retriable:
                    raise
                await self._isolate(decoded, exc)
            except Exception as exc:  # a poison record must not stop the partition
                await self._isolate(decoded, exc)

    async def _commit(self, batches: Batches) -> None:
        if self._buffer is None:  # buffered: committed by ``_flush``
            offsets = {tp: records[-1].offset + 1 for tp, records in batches.items()}
            await self._commit_offsets(offsets, sum(len(r) for r in batches.values()))

    async def _commit_offsets(self, offsets: dict[TopicPartition, int], n: int) -> None:
        try:
            if self.group:
                await self._consumer.commit(offsets)
            else:  # without a group, only this process keeps its position
                self._position.update(offsets)
        except KafkaError as exc:
            # Rebalanced away or broker gone: the records will be redelivered; handlers are idempotent.
            log.warning("%s: commit failed (%s); records will be redelivered", self.name, exc)
        else:
            assigned = self._consumer.assignment()
            for tp, offset in offsets.items():
                if tp in assigned:  # revoked meanwhile: its new owner reports it
                    self._committed[tp] = offset
                    metrics.CONSUMER_POSITION.labels(self.name, tp.topic, str(tp.partition)).set(offset)
            self._report_lag()
        self.processed += n
        metrics.CONSUMED.labels(consumer=self.name).inc(n)

    async def _flush(self) -> bool:
        """Buffered mode, under ``_flush_lock``: flush the buffer, then commit what it covered. False (nothing
        committed, the buffer kept) when the flush failed."""
        assert self._buffer is not None
        try:
            await self._buffer.flush()
        except Exception as exc:  # noqa: BLE001 -- a disk or bug: retried, visible in readiness and metrics
            self.healthy = False
            metrics.CONSUMER_RETRIES.labels(consumer=self.name).inc()
            log.warning("%s: flush failed (%r); nothing committed, retrying", self.name, exc)
            return False
        offsets, n = self._pending, self._pending_n
        self._pending, self._pending_n = {}, 0
        if offsets:
            await self._commit_offsets(offsets, n)
        self.healthy = True
        return True

    def _discard(self) -> None:
        if self._buffer is not None:
            self._buffer.discard()
        self._pending, self._pending_n = {}, 0

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before a rebalance hands the partitions to others: (buffered) flush and commit, or discard what
        cannot be; stop reporting the lag of partitions another member will own."""
        if not revoked:
            return  # the first join: nothing was assigned
        if self._buffer is not None:
            async with self._flush_lock:
                self._revocations += 1
                if not await self._flush():
                    self._discard()
        self._forget_lag(revoked)

    # -- consumer lag -------------------------------------------------------------------------------------

    def _lag_labels(self, tp: TopicPartition) -> tuple[str, str, str, str]:
        return (self.name, self.group, tp.topic, str(tp.partition))

    def _report_lag(self) -> None:
        """Set the lag gauge of every owned partition whose committed offset and end are known (cheap: local
        state only; called after every fetch and commit and by ``_watch_lag``)."""
        for tp in self._consumer.assignment():
            committed = self._committed.get(tp)
            if committed is None:
                self._lag_wake.set()  # newly assigned: _watch_lag asks the broker for its committed offset
                continue
            end = max(self._consumer.highwater(tp) or -1, self._listed.get(tp, -1))
            if end >= 0:
                metrics.CONSUMER_LAG.labels(*self._lag_labels(tp)).set(max(0, end - committed))

    def _forget_lag(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._committed.pop(tp, None)
            self._listed.pop(tp, None)
            metrics.drop(metrics.CONSUMER_LAG, *self._lag_labels(tp))
            metrics.drop(metrics.CONSUMER_POSITION, self.name, tp.topic, str(tp.partition))

    async def _watch_lag(self) -> None:
        """Every ``kafka.lag_interval_s`` (and at once when partitions were newly assigned): learn the committed
        offset of partitions new to this member and the end offsets of all it owns, then report. Errors are
        logged and the next round tries again; the lag stays as the fetches and commits report it."""
        interval = self._settings.kafka.lag_interval_s
        try:
            while True:
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that meets the event being set
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._lag_wake.wait()
                self._lag_wake.clear()
                try:
                    await self._refresh_lag()
                except Exception as exc:  # noqa: BLE001 -- lag is best effort; the loop itself reports failures
                    log.debug("%s: cannot refresh the consumer lag: %r", self.name, exc)
                    await asyncio.sleep(min(interval, 1.0))  # a broker that is down is not asked in a tight loop
        finally:
            self._forget_lag(set(self._committed) | set(self._listed))

    async def _refresh_lag(self) -> None:
        assigned = set(self._consumer.assignment())
        if not assigned:
            return
        fresh = [tp for tp in assigned if tp not in self._committed]
        if fresh:
            starts = await self._consumer.beginning_offsets(fresh)
            for tp in fresh:
                committed = await self._committed_offset(tp)
                if tp in self._consumer.assignment():  # still ours; setdefault: a commit of ours meanwhile wins
                    # never committed: the group starts at the earliest record (auto_offset_reset="earliest")
                    self._committed.setdefault(tp, starts[tp] if committed is None else committed)
        ends = await self._consumer.end_offsets(list(assigned))
        for tp, end in ends.items():
            if tp in self._consumer.assignment():
                self._listed[tp] = end
        self._report_lag()


class _OnRebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, loop: ConsumerLoop[Any]) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._loop._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        return None


def decode_json(record: ConsumerRecord) -> Any:
    if record.value is None:
        raise UnprocessableRecord("empty record value")
    try:
        return orjson.loads(record.value)
    except orjson.JSONDecodeError as exc:
        raise UnprocessableRecord(f"not JSON: {exc}") from exc
