"""The examples store: every joined example on ``rtml.examples``, as Parquet files that training reads.

Layout (hive-style, so ``pyarrow.dataset`` and other engines read ``model`` and ``date`` as columns)::

    <examples_dir>/model=<model>/date=<YYYY-MM-DD of labelled_at, UTC>/part-<partition>-<first>-<last>.parquet

``<partition>`` is the ``examples`` topic partition and ``<first>``/``<last>`` the offsets of the first and
last record of that file. A file holds every example of its model and day between those two offsets, so a
name always stands for the same rows: replicas on shared storage never collide, and a range delivered again
(at-least-once) rewrites the same name. A redelivery batched differently can still write an overlapping
range under another name, and the join itself may publish an example twice (``rtml.feedback.join``), so the
store is at-least-once and ``read_examples`` deduplicates by prediction_id and item_id.

Writing. ``ExamplesWriter`` is the handler and the ``Buffer`` of a ``ConsumerLoop`` (group
``feedback-examples``): it buffers validated examples across consumer batches and writes them when
``examples_flush_rows`` are buffered or ``examples_flush_s`` passed since the first one; only then does the
loop commit their offsets. Each file is written under a hidden temporary name in its final directory,
fsynced, renamed, and the directory fsynced, so a crash never leaves a partial file under a final name
(readers skip names starting with ``.``; a crash can leave such a temporary file behind).

Columns: prediction_id, model, version, label, score, predicted_at and labelled_at (timestamp[ms, UTC]),
item_id, entities and shadow (JSON strings), and one float64 column ``f_<feature>`` per feature served (null
where the served value was null). A feature added later simply appears in the newer files; the reader
unifies the schemas and reads the missing ones as null.

Reading the topic instead (``read_topic_examples``, for ``rtml train --from-topic``) builds the same
``ExampleTable`` from the records with the same dedup and ordering, so both sources train alike. It reads
every partition from the beginning with a consumer that joins no group and commits nothing, and stops once
no record has arrived for ``TOPIC_IDLE_S`` seconds: the end offsets cannot tell it where the topic ends, as
they are wrong on the embedded Tansu broker (the base offset of the last batch + 1, not the next offset;
they only serve as a lower bound that proves a read incomplete).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from rtml.core import metrics
from rtml.core.errors import DependencyUnavailable, InvalidInput, UnprocessableRecord
from rtml.core.kafka import Consumed, ConsumerLoop, Producer, client_options
from rtml.core.schemas import Example, schema_mismatch
from rtml.core.settings import Settings

log = logging.getLogger(__name__)

GROUP_ID = "feedback-examples"
TOPIC = "examples"
FEATURE_PREFIX = "f_"
TIMESTAMP = pa.timestamp("ms", tz="UTC")
BASE_FIELDS: list[pa.Field[Any]] = [
    pa.field("prediction_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("version", pa.string(), nullable=False),
    pa.field("label", pa.float64(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("predicted_at", TIMESTAMP, nullable=False),
    pa.field("labelled_at", TIMESTAMP, nullable=False),
    pa.field("item_id", pa.string()),
    pa.field("entities", pa.string(), nullable=False),  # JSON object, keys sorted
    pa.field("shadow", pa.string(), nullable=False),  # JSON object: shadow version -> its score
]
_DATE_PARTITIONING = ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive")


@dataclass(frozen=True, slots=True)
class Stored:
    """One buffered example and where it came from (its topic partition and offset)."""

    partition: int
    offset: int
    example: Example


def day_of(epoch_ms: int) -> str:
    """The UTC calendar day of a time, as the ``date=`` partition names it."""
    return dt.datetime.fromtimestamp(epoch_ms / 1000, dt.UTC).strftime("%Y-%m-%d")


def model_dir(root: Path, model: str) -> Path:
    # hive partition values are URI-encoded (pyarrow decodes them), so any model name is one safe segment
    return root / f"model={quote(model, safe='')}"


def part_path(root: Path, model: str, day: str, partition: int, first: int, last: int) -> Path:
    return model_dir(root, model) / f"date={day}" / f"part-{partition}-{first}-{last}.parquet"


def examples_table(examples: Sequence[Example]) -> pa.Table:
    """The rows of one file, in the given order; one ``f_<name>`` column per feature any of them has."""
    names = sorted({name for ex in examples for name in ex.features})
    fields: list[pa.Field[Any]] = BASE_FIELDS + [pa.field(FEATURE_PREFIX + name, pa.float64()) for name in names]
    columns: list[list[Any]] = [
        [ex.prediction_id for ex in examples],
        [ex.model for ex in examples],
        [ex.version for ex in examples],
        [ex.label for ex in examples],
        [ex.score for ex in examples],
        [ex.predicted_at for ex in examples],
        [ex.labelled_at for ex in examples],
        [ex.item_id for ex in examples],
        [orjson.dumps(ex.entities, option=orjson.OPT_SORT_KEYS).decode() for ex in examples],
        [orjson.dumps(ex.shadow, option=orjson.OPT_SORT_KEYS).decode() for ex in examples],
    ]
    columns += [[ex.features.get(name) for ex in examples] for name in names]
    schema = pa.schema(fields)
    return pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, fields, strict=True)], schema=schema
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new directory entries are durable (each new directory's parent is fsynced)."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # another replica made it meanwhile
            pass
        _fsync_dir(d.parent)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` so that ``path`` is either absent, the old file, or the whole new one."""
    _make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_stored(root: Path, rows: Sequence[Stored]) -> list[Path]:
    """Write buffered examples: one file per model, day and topic partition, rows in offset order."""
    groups: dict[tuple[str, str, int], list[Stored]] = {}
    for row in rows:
        groups.setdefault((row.example.model, day_of(row.example.labelled_at), row.partition), []).append(row)
    paths = []
    for (model, day, partition), group in sorted(groups.items()):
        group.sort(key=lambda r: r.offset)
        path = part_path(root, model, day, partition, group[0].offset, group[-1].offset)
        write_atomic(examples_table([r.example for r in group]), path)
        metrics.EXAMPLES_STORED.labels(model=model).inc(len(group))
        metrics.EXAMPLES_FILES.inc()
        paths.append(path)
    return paths


def decode_example(record: ConsumerRecord) -> Example:
    """An ``Example`` from an ``examples`` record, else ``UnprocessableRecord`` naming what is wrong. The
    ``rtml-schema`` version is checked before, by ``ConsumerLoop`` or by the topic reader below."""
    if record.value is None:
        raise UnprocessableRecord("empty record value")
    try:
        return Example.model_validate_json(bytes(record.value))
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors()[:5])
        raise UnprocessableRecord(f"not an example: {errors}") from None


class ExamplesWriter:
    """Handler (``decode``, ``handle``) and ``rtml.core.kafka.Buffer`` of the examples consumer loop."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.examples_dir
        self.flush_rows = settings.examples_flush_rows
        self.flush_s = settings.examples_flush_s
        self._rows: list[Stored] = []
        self._first_at = 0.0  # monotonic time the oldest buffered row arrived

    def decode(self, record: ConsumerRecord) -> Example:
        """An ``Example``, else ``UnprocessableRecord`` naming what is wrong (the loop dead-letters it)."""
        return decode_example(record)

    async def handle(self, batch: list[Consumed[Example]]) -> None:
        if batch and not self._rows:
            self._first_at = time.monotonic()
        self._rows.extend(Stored(c.record.partition, c.record.offset, c.value) for c in batch)

    @property
    def buffered(self) -> int:
        return len(self._rows)

    def room(self) -> int:
        return self.flush_rows - len(self._rows)

    def due(self) -> bool:
        return not self._rows or len(self._rows) >= self.flush_rows or time.monotonic() - self._first_at >= self.flush_s

    async def flush(self) -> None:
        if not self._rows:
            return
        rows = list(self._rows)
        started = time.perf_counter()
        paths = await asyncio.to_thread(write_stored, self.root, rows)
        metrics.EXAMPLES_WRITE_SECONDS.observe(time.perf_counter() - started)
        log.debug("examples store: %d examples in %d files", len(rows), len(paths))
        del self._rows[: len(rows)]

    def discard(self) -> None:
        self._rows.clear()


def examples_loop(settings: Settings, producer: Producer, writer: ExamplesWriter) -> ConsumerLoop[Example]:
    """The consumer loop that feeds ``writer`` and commits only what it has written."""
    return ConsumerLoop(
        settings,
        name="feedback-examples",
        topics=[TOPIC],
        group_id=GROUP_ID,
        decode=writer.decode,
        handle=writer.handle,
        producer=producer,
        buffer=writer,
        fetch_max_wait_ms=100,  # nothing waits on this store within a second
    )


@dataclass(frozen=True, slots=True)
class ExampleTable:
    """A model's stored examples: one row per (prediction_id, item_id), ordered by ``predicted_at``.

    ``table`` holds the stored columns (see the module docstring); the accessors give what training needs.
    """

    model: str
    table: pa.Table

    def __len__(self) -> int:
        return int(self.table.num_rows)

    @property
    def prediction_ids(self) -> list[str]:
        return [str(v) for v in self.table.column("prediction_id").to_pylist()]

    @property
    def item_ids(self) -> list[str | None]:
        return list(self.table.column("item_id").to_pylist())

    @property
    def labels(self) -> np.ndarray:
        """float64 [n]: the labels as joined (0/1, or a float outcome)."""
        return np.asarray(self.table.column("label").to_numpy(), dtype=np.float64)

    @property
    def scores(self) -> np.ndarray:
        """float64 [n]: the score served for the prediction (by ``versions``)."""
        return np.asarray(self.table.column("score").to_numpy(), dtype=np.float64)

    @property
    def versions(self) -> list[str]:
        return [str(v) for v in self.table.column("version").to_pylist()]

    @property
    def predicted_at(self) -> np.ndarray:
        """int64 [n], epoch milliseconds, non-decreasing."""
        return _epoch_ms(self.table.column("predicted_at"))

    @property
    def labelled_at(self) -> np.ndarray:
        return _epoch_ms(self.table.column("labelled_at"))

    @property
    def feature_names(self) -> list[str]:
        """Every feature any stored example of the selection carries, sorted."""
        return sorted(n[len(FEATURE_PREFIX) :] for n in self.table.column_names if n.startswith(FEATURE_PREFIX))

    def matrix(self, features: Sequence[str], defaults: Mapping[str, float] | None = None) -> np.ndarray:
        """float32 [n, len(features)] in the given order; a null or absent value takes ``defaults[name]``
        (else 0.0), as serving and ``rtml.serving.train`` fill them."""
        defaults = defaults or {}
        out = np.empty((len(self), len(features)), dtype=np.float32)
        for j, name in enumerate(features):
            column = FEATURE_PREFIX + name
            fill = float(defaults.get(name, 0.0))
            if column in self.table.column_names:
                values = np.asarray(self.table.column(column).to_numpy(), dtype=np.float64)  # null -> NaN
                out[:, j] = np.where(np.isnan(values), fill, values)
            else:
                out[:, j] = fill
        return out

    def feature_dicts(self) -> list[dict[str, float | None]]:
        """The features of each row, ``None`` where the served value was null or the row's file had no such
        feature (a column store cannot tell those apart)."""
        names = self.feature_names
        if not names:
            return [{} for _ in range(len(self))]
        cols = [self.table.column(FEATURE_PREFIX + n).to_pylist() for n in names]
        return [dict(zip(names, values, strict=True)) for values in zip(*cols, strict=True)]


def _epoch_ms(column: pa.ChunkedArray[Any]) -> np.ndarray:
    return np.asarray(column.cast(pa.int64()).to_numpy(), dtype=np.int64)


def read_examples(root: Path, model: str, *, since_ms: int | None = None) -> ExampleTable:
    """The stored examples of ``model`` predicted at or after ``since_ms`` (all when None), deduplicated by
    (prediction_id, item_id) keeping the first (earliest labelled), ordered by predicted_at.

    ``InvalidInput`` when there is none. Only the day partitions that can hold such examples are opened
    (a row's day is that of its label, which comes after its prediction).
    """
    base = model_dir(Path(root), model)
    if not base.is_dir():
        raise InvalidInput(f"no stored examples for model {model!r} under {root}")
    dataset = ds.dataset(base, format="parquet", partitioning=_DATE_PARTITIONING)
    day_filter = None if since_ms is None else ds.field("date") >= day_of(since_ms)
    fragments = list(dataset.get_fragments(filter=day_filter))
    if not fragments:
        raise InvalidInput(f"no stored examples for model {model!r} under {root}" + _since(since_ms))
    # files written before a feature was added lack its column: read them all under the union of the schemas
    schema = pa.unify_schemas([f.physical_schema for f in fragments])
    files = ds.dataset([f.path for f in fragments], schema=schema, format="parquet")
    row_filter = None if since_ms is None else ds.field("predicted_at") >= pa.scalar(since_ms, TIMESTAMP)
    table = files.to_table(filter=row_filter)
    if table.num_rows == 0:
        raise InvalidInput(f"no stored examples for model {model!r} under {root}" + _since(since_ms))
    return ExampleTable(model, _dedup_ordered(table))


def _since(since_ms: int | None) -> str:
    return "" if since_ms is None else f" predicted since {since_ms}"


def examples_of(model: str, examples: Sequence[Example]) -> ExampleTable:
    """The ``ExampleTable`` of ``examples`` (all of ``model``), deduplicated and ordered exactly as
    ``read_examples`` does the stored ones. ``InvalidInput`` when there is none."""
    if not examples:
        raise InvalidInput(f"no examples for model {model!r}")
    if any(ex.model != model for ex in examples):
        raise ValueError(f"examples_of({model!r}) got examples of another model")
    return ExampleTable(model, _dedup_ordered(examples_table(examples)))


TOPIC_IDLE_S = 3.0  # the topic is read to its end once no record arrived for this long
_MAX_STALLS = 3  # idle periods in a row with records known to be unread before giving up
_FETCH_WAIT_MS = 200  # Tansu answers a fetch only when the wait is over: a few requests a second, not hundreds


async def _behind(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> str:
    """The partitions whose position is below their known end ("" when none). The end is the larger of the
    listed end offset (exact on Apache Kafka, too low on Tansu) and the high watermark of the last fetch
    response (exact on both, measured, but only as fresh as that fetch): a lower bound of the end, so this can
    prove a read incomplete (a broker that stopped answering fetches for a while), never complete: that is the
    idle wait's job."""
    listed = await consumer.end_offsets(partitions)
    behind = []
    for tp in partitions:
        position = await consumer.position(tp)
        end = max(listed[tp], consumer.highwater(tp) or 0)
        if position < end:
            behind.append(f"partition {tp.partition} at {position} of {end}")
    return ", ".join(behind)


@dataclass(frozen=True, slots=True)
class TopicRead:
    """What reading the ``examples`` topic found: every record read, those that are not an ``Example`` (not
    trained on: the examples store's consumer dead-letters them), and the examples of the model predicted
    since the cut-off (before dedup)."""

    topic: str
    records: int
    malformed: int
    matched: int
    first_malformed: str | None  # "partition/offset: reason" of the first malformed record

    def summary(self) -> str:
        bad = f", {self.malformed} not examples (first: {self.first_malformed})" if self.malformed else ""
        return f"{self.records} records read from {self.topic}{bad}"


async def read_topic_examples(
    settings: Settings,
    model: str,
    *,
    since_ms: int | None = None,
    idle_s: float = TOPIC_IDLE_S,
    progress: Callable[[int], None] | None = None,
) -> tuple[ExampleTable, TopicRead]:
    """The examples of ``model`` on the ``examples`` topic predicted at or after ``since_ms`` (all when None),
    as ``read_examples`` gives the stored ones (same dedup, same order), and what the read found.

    Every partition is read from its beginning by a consumer in no group: it commits nothing and disturbs no
    one. The end of the topic is where no record arrived for ``idle_s`` seconds (see the module docstring:
    end offsets are not trusted) and no partition's position is below its end offset (a lower bound of the
    end on every broker: it catches a broker that stopped serving fetches; ``DependencyUnavailable`` after
    ``_MAX_STALLS`` idle periods of that). So a call takes at least ``idle_s`` seconds, and a producer that
    keeps publishing keeps it reading. Records that are not an ``Example`` are counted in the ``TopicRead``, not
    trained on and not raised. ``progress(records_read)`` is called after each fetch. ``InvalidInput`` when
    no example is left, ``DependencyUnavailable`` when the broker cannot be reached.
    """
    topic = settings.topic(TOPIC)
    consumer = AIOKafkaConsumer(
        **client_options(settings.kafka),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=_FETCH_WAIT_MS,
        max_poll_records=settings.kafka.max_poll_records,
    )
    kept: list[Example] = []
    records = malformed = 0
    first_malformed: str | None = None
    try:
        try:
            await consumer.start()
            topics = await consumer.topics()  # a metadata request for every topic: partitions are known after
        except KafkaError as exc:
            raise DependencyUnavailable("kafka", f"cannot read {topic}: {exc}") from exc
        if topic not in topics:
            raise InvalidInput(f"topic {topic} does not exist (no examples for model {model!r})")
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        loop = asyncio.get_running_loop()
        last_record = loop.time()
        wait_ms = max(1, int(min(idle_s, 1.0) * 1000))
        stalls = 0
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=wait_ms)
                if not batches:
                    if loop.time() - last_record < idle_s:
                        continue
                    behind = await _behind(consumer, partitions)
                    if not behind:
                        break
                    # records we know exist did not come: the broker is not serving them (yet)
                    stalls += 1
                    if stalls >= _MAX_STALLS:
                        raise DependencyUnavailable("kafka", f"reading {topic} stalled before its end ({behind})")
                    last_record = loop.time()
                    continue
            except KafkaError as exc:
                raise DependencyUnavailable("kafka", f"reading {topic} failed: {exc}") from exc
            last_record = loop.time()
            stalls = 0
            for batch in batches.values():
                for record in batch:
                    records += 1
                    try:
                        mismatch = schema_mismatch(record.headers)  # what ConsumerLoop checks before decoding
                        if mismatch is not None:
                            raise UnprocessableRecord(mismatch)
                        ex = decode_example(record)
                    except UnprocessableRecord as exc:
                        malformed += 1
                        if first_malformed is None:
                            first_malformed = f"partition {record.partition} offset {record.offset}: {exc.message}"
                        continue
                    if ex.model == model and (since_ms is None or ex.predicted_at >= since_ms):
                        kept.append(ex)
            if progress is not None:
                progress(records)
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    read = TopicRead(topic, records, malformed, len(kept), first_malformed)
    if not kept:
        raise InvalidInput(f"no examples for model {model!r}{_since(since_ms)}: {read.summary()}")
    table = await asyncio.to_thread(examples_of, model, kept)
    return table, read


def _dedup_ordered(table: pa.Table) -> pa.Table:
    """Keep the first row (earliest labelled) of each (prediction_id, item_id); order by predicted_at."""
    keys: list[tuple[str, Literal["ascending"]]] = [
        ("prediction_id", "ascending"),
        ("item_id", "ascending"),
        ("labelled_at", "ascending"),
    ]
    table = table.take(pc.sort_indices(table, sort_keys=keys))  # nulls last
    n = table.num_rows
    first = np.ones(n, dtype=bool)
    if n > 1:
        pid = table.column("prediction_id").to_numpy()
        item = np.asarray(table.column("item_id").to_pylist(), dtype=object)  # None stays None: null == null
        first[1:] = (pid[1:] != pid[:-1]) | (item[1:] != item[:-1])
    unique = table.filter(pa.array(first))
    order: list[tuple[str, Literal["ascending"]]] = [
        ("predicted_at", "ascending"),
        ("prediction_id", "ascending"),
        ("item_id", "ascending"),
    ]
    return unique.take(pc.sort_indices(unique, sort_keys=order))
