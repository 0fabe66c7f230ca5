"""Online model quality per model and version over the model's sliding quality window, in Redis.

Layout (every key under the model's hash tag ``Keys.model(name)`` = ``<prefix>{model:<name>}``, one slot):

- ``...:q:<tile start>``  one hash per quality tile (``models.<name>.quality``: window W, tile G, window/60 by
  default): the ``rtml.feedback.qualitymath.Sums`` of every version that scored an example labelled in that
  tile, fields ``<version>|<sum>``. TTL W + G after its last write, so memory is bounded by one window. A
  read at T sums the tiles ``floor(T/G) - W/G + 1 .. floor(T/G)`` (the features' window semantics), in
  one round trip.
- ``...:qp:<a>|<b>``      (a < b) cumulative Sums of versions a and b over exactly the examples both
  scored (the served version and its shadows): what the rollout controller compares. TTL 7 days, re-armed
  on each write; subtract two snapshots (``Sums`` is additive) for the examples in between.

An example counts for EVERY version that scored it (``Example.version`` with ``score``, and each of
``Example.shadow``), with the same features and label. Drift is counted per bin of the version's training
reference (``metadata["reference"]``), so the recorder reads a version's metadata from the registry the
first time it sees it (cached: versions are immutable); a version without one reports PSI as null.

Writes: the increments of a batch are summed per key and field in Python, then one ``quality.lua`` call
per key (HINCRBYFLOAT each field, then PEXPIRE), all in one pipelined round trip. Exactly once: each key has
a marks hash ``<key>:at`` (same slot, same TTL) holding, per Kafka stream the join reads (topic:partition),
the offset of the last record whose increments the key holds. A write sets the marks with the increments,
atomically; a record that may have been recorded before (the join's redelivery of its claim, after a crash or
a failed write between the join and here) counts only in the keys whose mark is below its offset.

Measured on a batch of 500 examples scored by two versions (2 tiles, ~800 fields): client CPU 3.6 ms
against 15 ms for a pipeline of HINCRBYFLOAT commands, the same Redis CPU (~7 ms). The lean ``Scripts``
client saves 1.7 ms more but holds a connection of its own to close; not worth it off the request path. What
the marks cost: ``benchmarks/quality_record.py``. On a Redis Cluster (redis-py refuses EVALSHA in a cluster
pipeline) the same calls go one per key, all at once. Either way, a call Redis refused with NOSCRIPT (scripts
lost to a restart, a flush or a failover) applied nothing, and only those calls are sent again once the script
is loaded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from rtml.core import metrics
from rtml.core.config import PlatformConfig, QualityDef
from rtml.core.errors import DependencyUnavailable, NotFound, RtmlError
from rtml.core.redis import Keys, Redis, guarded, is_cluster, outage, run_pipeline, script_source
from rtml.core.schemas import Example
from rtml.core.timeutil import now_ms
from rtml.feedback.qualitymath import Reference, Sums, add_example, split_versions, summarize

log = logging.getLogger(__name__)

LEARN_TTL_MS = 30 * 86_400_000  # a model without a label for a month starts its counters afresh
PAIR_TTL_MS = 7 * 86_400_000
REFERENCE_RETRY_MS = 60_000  # a version the registry does not know is asked again after this
_SCRIPT = script_source("rtml.feedback", "quality.lua")
Source = tuple[str, int]  # the Kafka record an example came from: (its stream "topic:partition", its offset)
# a key's TTL, and (version, sums) to add to it; version None: plain field names (the learning counter)
Increments = tuple[int, Sequence[tuple[str | None, Mapping[str, float]]]]
_ONE_LABEL = {"labels": 1.0}  # the learning counter's increment per label


class QualityConflict(RtmlError):
    """Another consumer applied some of a batch's replayed records to a key between the marks read and the
    write (two members owning one partition for a moment, around a rebalance): nothing of that key's call was
    applied. Retriable: the batch comes again, the marks are read again, and each record counts once."""

    code = "quality_conflict"
    retriable = True


def tile_key(keys: Keys, model: str, tile_start: int) -> str:
    return f"{keys.model(model)}:q:{tile_start}"


def marks_key(key: str) -> str:
    """The marks of a quality key (same hash tag): per source stream, the last offset it holds (``record``)."""
    return f"{key}:at"


def learn_key(keys: Keys, model: str) -> str:
    """The model's learning-loop counters: ``labels`` (every first-time joined example, ever; counted here,
    in the same round trip as the quality sums) and the controller's ``trained_*`` marks."""
    return f"{keys.model(model)}:learn"


def pair_key(keys: Keys, model: str, a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"{keys.model(model)}:qp:{lo}|{hi}"


def window_tiles(q: QualityDef, at: int) -> list[int]:
    """The start times of the tiles a read at ``at`` covers, oldest first."""
    g = q.tile_ms
    last = at // g
    return [k * g for k in range(last - q.window_ms // g + 1, last + 1)]


# -- the report ---------------------------------------------------------------------------------------------------
class VersionQuality(BaseModel):
    version: str
    count: int
    positive_rate: float | None  # mean label: the positive rate for 0/1 labels
    mean_score: float | None
    log_loss: float | None
    auc: float | None = None  # None with one class only
    calibration: float | None = None  # expected calibration error over 10 equal-width score bins
    score_drift: float | None = None  # PSI of the scores against the training holdout's; None without reference
    feature_drift: dict[str, float | None] = Field(default_factory=dict)  # PSI of each input against training


class ModelQuality(BaseModel):
    model: str
    window: str  # the model's quality window, e.g. "1h"
    window_ms: int
    as_of: int  # epoch ms of the read: the window is the tiles up to and including this one's
    versions: list[VersionQuality]


def version_order(version: str) -> tuple[int, int, str]:
    """Registry versions are integers: "10" after "9"."""
    return (0, int(version), version) if version.isdigit() else (1, 0, version)


def version_quality(version: str, sums: Sums, reference: Reference | None) -> VersionQuality:
    return VersionQuality(version=version, **summarize(sums, reference))


# -- references -----------------------------------------------------------------------------------------------------
class References:
    """Each version's training reference, read from the registry once per process (versions are immutable).

    A version the registry does not know (or whose bytes fail their checksum) has no reference; it is asked
    again after ``retry_ms``, in case it was registered since."""

    def __init__(self, redis: Redis, keys: Keys, retry_ms: int = REFERENCE_RETRY_MS) -> None:
        from rtml.serving.registry import ModelRegistry  # onnxruntime & co: only once quality is used

        self.registry = ModelRegistry(redis, keys)
        self.retry_ms = retry_ms
        self._known: dict[tuple[str, str], Reference | None] = {}
        self._missing: dict[tuple[str, str], int] = {}  # -> when to ask again

    async def get_many(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Reference | None]:
        wanted = set(pairs)
        now = now_ms()
        todo = [p for p in wanted if p not in self._known and self._missing.get(p, 0) <= now]
        if todo:
            for p, ref in zip(todo, await asyncio.gather(*(self._fetch(*p) for p in todo)), strict=True):
                if ref is None:
                    self._missing[p] = now + self.retry_ms
                else:
                    self._known[p] = ref
                    self._missing.pop(p, None)
        return {p: self._known.get(p) for p in wanted}

    async def get(self, model: str, version: str) -> Reference | None:
        return (await self.get_many([(model, version)]))[(model, version)]

    async def _fetch(self, model: str, version: str) -> Reference | None:
        from rtml.serving.registry import ModelIntegrityError

        try:
            _, metadata = await self.registry.get(model, version)
        except NotFound:
            return None
        except ModelIntegrityError as exc:
            log.warning("quality: no drift reference for %s version %s: %s", model, version, exc)
            return None
        return Reference.from_metadata(metadata)


# -- the store ------------------------------------------------------------------------------------------------------
class QualityStore:
    """Records labelled examples into the quality tiles and pair sums; reads windows, pairs and reports.

    Holds no state that must live in one process: the cache of references is only a cache, and any number
    of feedback replicas record into and read from the same keys."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        config: PlatformConfig | None = None,
        *,
        references: References | None = None,
        pair_ttl_ms: int = PAIR_TTL_MS,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self.references = references or References(redis, keys)
        self.pair_ttl_ms = pair_ttl_ms
        self._sha: str | None = None

    def quality_def(self, model: str) -> QualityDef:
        """The model's quality window; a model not in the config (uploaded by a user) gets the default."""
        m = self.config.models.get(model) if self.config is not None else None
        return m.quality if m is not None else QualityDef()

    # -- writes ---------------------------------------------------------------------------------------------------
    async def record(
        self,
        examples: Sequence[Example],
        now: int | None = None,
        *,
        sources: Sequence[Source] | None = None,
        replayed: Sequence[bool] | None = None,
    ) -> None:
        """Add a batch of joined examples: one pipelined round trip (plus, the first time a version is seen, one
        registry read for its reference). An example whose tile already left its model's window counts in the
        pair sums only.

        ``sources``: the (stream, offset) of the Kafka record each example came from, streams read in offset
        order. ``replayed`` (per example): its record may have been recorded before (a redelivery); it counts
        only in the keys whose mark is below its offset (the marks are read first: one more round trip, only
        for a batch with a replayed example). A first-time record always counts and a mark at or past it is
        reset (logged): the topic was recreated and its offsets started again. Exactly once, across crashes
        and retries between the join and this write; around a rebalance, a member still writing first-time
        records after the next owner wrote later ones can count them twice (the warning says so)."""
        if not examples:
            return
        now = now_ms() if now is None else now
        touched = await self._increments(examples, now)
        if sources is not None:
            if len(sources) != len(examples) or (replayed is not None and len(replayed) != len(examples)):
                raise ValueError("one source and one replayed flag per example")
            again = [i for i in range(len(examples)) if replayed is not None and replayed[i]]
            if again:  # drop what each key already holds of a replayed record
                marks = await self._marks({(key, sources[i][0]) for i in again for key in touched[i]})
                for i in again:
                    stream, offset = sources[i]
                    touched[i] = {k: v for k, v in touched[i].items() if offset > marks.get((k, stream), -1)}
        per_key: dict[str, dict[str, float]] = {}
        ttl: dict[str, int] = {}
        for per in touched:
            for key, (key_ttl, parts) in per.items():
                fields = per_key.setdefault(key, {})
                for version, acc in parts:
                    if version is None:  # the learning counter: plain field names
                        for name, amount in acc.items():
                            fields[name] = fields.get(name, 0.0) + amount
                    else:
                        _merge(fields, version, acc)
                ttl[key] = key_ttl
        spans: dict[str, list[tuple[str, int, int, int]]] = {}
        if sources is not None:
            # per stream, for every key: the first first-time offset (-1: none) and the last offset (valid for a
            # key no record of the stream touched too, since quality.lua only ever raises a mark to it, except on
            # a reset); per key, the first replayed offset it takes (-1: none)
            streams: dict[str, list[int]] = {}
            for i, (stream, offset) in enumerate(sources):
                span = streams.setdefault(stream, [-1, offset])
                span[1] = max(span[1], offset)
                if not (replayed is not None and replayed[i]) and (span[0] < 0 or offset < span[0]):
                    span[0] = offset
            guards: dict[tuple[str, str], int] = {}
            for i in range(len(examples)):
                if replayed is not None and replayed[i]:
                    stream, offset = sources[i]
                    for key in touched[i]:
                        guards[key, stream] = min(offset, guards.get((key, stream), offset))
            for key in per_key:
                spans[key] = [(stream, guards.get((key, stream), -1), first, last)
                              for stream, (first, last) in streams.items()]  # fmt: skip
        await self._write(per_key, ttl, spans)

    async def _increments(self, examples: Sequence[Example], now: int) -> list[dict[str, Increments]]:
        """Per example, what it adds to each key it touches: key -> (TTL, [(version, sums), ...]). The sums of
        a version are shared between its tile and its pairs, never copied: merged once per key, in ``record``."""
        scored = [(ex, _scores(ex)) for ex in examples]
        refs = await self.references.get_many({(ex.model, v) for ex, scores in scored for v in scores})
        out: list[dict[str, Increments]] = []
        names: dict[Any, str] = {}  # the keys' names, made once per batch
        for ex, scores in scored:
            q = self.quality_def(ex.model)
            tile = ex.labelled_at // q.tile_ms * q.tile_ms
            live = tile + q.window_ms > now  # else no read from now on includes it
            own: list[tuple[str, Mapping[str, float]]] = []
            for version, score in sorted(scores.items()):
                acc: dict[str, float] = {}
                add_example(acc, score, ex.label, ex.features, refs.get((ex.model, version)))
                own.append((version, acc))
            per: dict[str, Increments] = {}
            if live:
                key = names.get((ex.model, tile)) or names.setdefault(
                    (ex.model, tile), tile_key(self.keys, ex.model, tile)
                )
                per[key] = (q.window_ms + q.tile_ms, own)
            for i, a in enumerate(own):
                for b in own[i + 1 :]:
                    pair = (ex.model, a[0], b[0])
                    key = names.get(pair) or names.setdefault(pair, pair_key(self.keys, *pair))
                    per[key] = (self.pair_ttl_ms, [a, b])
            key = names.get(ex.model) or names.setdefault(ex.model, learn_key(self.keys, ex.model))
            per[key] = (LEARN_TTL_MS, [(None, _ONE_LABEL)])
            out.append(per)
        return out

    async def _marks(self, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The marks of (key, stream) pairs: the last offset of that stream whose increments the key holds."""
        pairs = sorted(wanted)

        def build(pipe: Pipeline) -> None:
            for key, stream in pairs:
                pipe.hget(marks_key(key), stream)

        values = await run_pipeline(self.redis, build, "quality marks read")
        return {p: int(v) for p, v in zip(pairs, values, strict=True) if v is not None}

    async def _write(
        self,
        per_key: Mapping[str, Mapping[str, float]],
        ttl: Mapping[str, int],
        spans: Mapping[str, Sequence[tuple[str, int, int, int]]],
    ) -> None:
        """``spans``: per key, (stream, first replayed offset this key takes or -1, first first-time offset or -1,
        last offset) of each stream of the batch (see quality.lua)."""
        if not per_key:
            return

        calls: list[tuple[str, list[str | int | float]]] = []
        for key, fields in per_key.items():
            streams = spans.get(key, ())
            args: list[str | int | float] = [ttl[key], len(streams)]
            for span in streams:
                args += span
            for field, amount in fields.items():
                args += (field, repr(amount))
            calls.append((key, args))
        results = await self._send(calls)
        reset = [key for (key, _), r in zip(calls, results, strict=True) if r == 2]
        if reset:
            log.warning("quality: the marks of %d keys (e.g. %s) were at or past records counted for the first "
                        "time; reset. Expected once after the topics were recreated (offsets start again); "
                        "otherwise two consumers overlapped in a rebalance and those records may count twice",
                        len(reset), reset[0])  # fmt: skip
        refused = [key for (key, _), r in zip(calls, results, strict=True) if r == 0]
        if refused:
            raise QualityConflict(
                f"quality: {len(refused)} keys already hold some of this batch's records (another consumer "
                f"applied them meanwhile), e.g. {refused[0]}; the batch is retried and counts each record once"
            )

    async def _send(self, calls: Sequence[tuple[str, Sequence[str | int | float]]]) -> list[Any]:
        """One ``quality.lua`` call per key, all at once: one pipeline on a single node, concurrent calls on a
        Redis Cluster (redis-py refuses EVALSHA in a cluster pipeline; a batch touches few keys: its models'
        tiles, pairs and learning counters). A node that lost the script (restarted, flushed, failed over)
        answers NOSCRIPT to a call and applied nothing of it: only the calls it refused are sent again once the
        script is loaded, so no increment counts twice. The replies, in the order of ``calls``."""
        replies: dict[int, Any] = {}
        todo = list(range(len(calls)))
        for attempt in (1, 2):
            if self._sha is None:
                self._sha = str(await guarded(self.redis.script_load(_SCRIPT), "SCRIPT LOAD"))
            sha = self._sha
            if is_cluster(self.redis):
                results = await asyncio.gather(
                    *(guarded(self.redis.evalsha(sha, 2, calls[i][0], marks_key(calls[i][0]), *calls[i][1]),
                              "quality update") for i in todo),
                    return_exceptions=True,
                )  # fmt: skip
            else:
                build = functools.partial(_evalsha_each, sha, [calls[i] for i in todo])
                results = await run_pipeline(self.redis, build, "quality update", raise_on_error=False)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, NoScriptError):
                    raise outage(r, "quality update") or r  # transient server states: a retry, not a dead letter
            for i, r in zip(todo, results, strict=True):
                replies[i] = r
            todo = [i for i, r in zip(todo, results, strict=True) if isinstance(r, NoScriptError)]
            if not todo:
                return [replies[i] for i in range(len(calls))]
            self._sha = None
            if attempt == 2:
                raise NoScriptError(f"quality.lua is still missing on a node after SCRIPT LOAD ({len(todo)} calls)")
        raise AssertionError("unreachable")

    # -- reads ----------------------------------------------------------------------------------------------------
    async def window(self, model: str, now: int | None = None) -> dict[str, Sums]:
        """The Sums of each version over the model's window as read at ``now``: every tile, one round trip."""
        tiles = window_tiles(self.quality_def(model), now_ms() if now is None else now)

        def build(pipe: Pipeline) -> None:
            for t in tiles:
                pipe.hgetall(tile_key(self.keys, model, t))

        # summed field by field first (the same few hundred fields in every tile), split by version once
        total: dict[bytes | str, float] = {}
        for raw in await run_pipeline(self.redis, build, "quality read"):
            for field, value in raw.items():
                total[field] = total.get(field, 0.0) + float(value)
        return split_versions(total)

    async def pair(self, model: str, a: str, b: str) -> tuple[Sums, Sums]:
        """The cumulative Sums of versions ``a`` and ``b`` over exactly the examples both scored."""
        if a == b:
            raise ValueError("a pair needs two different versions")
        raw = await guarded(self.redis.hgetall(pair_key(self.keys, model, a, b)), "quality pair read")
        per = split_versions(raw)
        return per.get(a, Sums()), per.get(b, Sums())

    async def report(self, model: str, now: int | None = None) -> ModelQuality:
        """The quality of every version with a label in the window, oldest version first."""
        now = now_ms() if now is None else now
        q = self.quality_def(model)
        per = await self.window(model, now)
        refs = await self.references.get_many((model, v) for v in per)
        versions = [version_quality(v, per[v], refs.get((model, v))) for v in sorted(per, key=version_order)]
        return ModelQuality(model=model, window=q.window, window_ms=q.window_ms, as_of=now, versions=versions)


def _scores(ex: Example) -> dict[str, float]:
    """Every version that scored the example and its score (finite scores only: a NaN has no bin)."""
    scores = {**ex.shadow, ex.version: ex.score}
    bad = [v for v, s in scores.items() if not math.isfinite(s)]
    for v in bad:
        log.warning("quality: %s version %s logged a non-finite score for %s; not counted", ex.model, v,
                    ex.prediction_id)  # fmt: skip
        del scores[v]
    return scores


def _evalsha_each(sha: str, calls: Sequence[tuple[str, Sequence[str | int | float]]], pipe: Pipeline) -> None:
    for key, args in calls:
        pipe.evalsha(sha, 2, key, marks_key(key), *args)


def _merge(fields: dict[str, float], version: str, acc: Mapping[str, float]) -> None:
    prefix = f"{version}|"
    for name, amount in acc.items():
        k = prefix + name
        fields[k] = fields.get(k, 0.0) + amount


# -- Prometheus gauges ----------------------------------------------------------------------------------------------
GAUGE_METRICS = {
    "count": "count",
    "positive_rate": "positive_rate",
    "mean_score": "mean_score",
    "log_loss": "log_loss",
    "auc": "auc",
    "calibration": "calibration_error",
    "score_drift": "score_psi",
}


class GaugePublisher:
    """Sets ``rtml_model_quality`` and ``rtml_model_feature_psi`` from the windows of the given models, and
    removes the children of versions (or metrics) that have no value any more. Every replica publishes the
    same numbers: they are read from Redis, not from what this replica recorded."""

    def __init__(self, store: QualityStore, models: Iterable[str]) -> None:
        self.store = store
        self.models = list(models)
        self._quality: set[tuple[str, str, str]] = set()
        self._psi: set[tuple[str, str, str]] = set()

    async def publish(self, now: int | None = None) -> None:
        quality: dict[tuple[str, str, str], float] = {}
        psi: dict[tuple[str, str, str], float] = {}
        for model in self.models:
            for v in (await self.store.report(model, now)).versions:
                values: dict[str, Any] = v.model_dump()
                for field, metric in GAUGE_METRICS.items():
                    if values[field] is not None:
                        quality[(model, v.version, metric)] = float(values[field])
                for feature, value in v.feature_drift.items():
                    if value is not None:
                        psi[(model, v.version, feature)] = value
        for labels, value in quality.items():
            metrics.MODEL_QUALITY.labels(*labels).set(value)
        for labels, value in psi.items():
            metrics.FEATURE_PSI.labels(*labels).set(value)
        for labels in self._quality - quality.keys():
            metrics.drop(metrics.MODEL_QUALITY, *labels, absent=math.nan)
        for labels in self._psi - psi.keys():
            metrics.drop(metrics.FEATURE_PSI, *labels, absent=math.nan)
        self._quality, self._psi = set(quality), set(psi)


async def publish_gauges_forever(store: QualityStore, interval_s: float, models: Iterable[str] | None = None) -> None:
    """Every ``interval_s`` (``settings.learning_interval_s``), publish the gauges of ``models`` (default: the
    models of the store's platform config). A failed round (Redis down) is logged and skipped; cancel the
    task to stop."""
    if models is None:
        models = list(store.config.models) if store.config is not None else []
    publisher = GaugePublisher(store, models)
    while True:
        try:
            await publisher.publish()
        except DependencyUnavailable as exc:
            log.warning("quality gauges not updated: %s", exc)
        except Exception:
            log.exception("quality gauges not updated")
        await asyncio.sleep(interval_s)
