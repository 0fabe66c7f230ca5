"""Windowed online quality on the real Redis: tiles, window reads, version pairs, drift, gauges and the route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY
from redis.asyncio.cluster import RedisCluster
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from rtml.core.config import load_config
from rtml.core.errors import DependencyUnavailable
from rtml.core.redis import Keys, Redis, connect
from rtml.core.schemas import Example
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.feedback import quality as quality_module
from rtml.feedback.app import create_app
from rtml.feedback.quality import GaugePublisher, QualityConflict, QualityStore, learn_key, tile_key, window_tiles
from rtml.feedback.qualitymath import HIST_BINS, Reference, Sums, hist_bin, sums_of
from rtml.serving.inference.session import build_model
from rtml.serving.registry import ModelRegistry
from rtml.serving.train import DEMO_CONFIG, TrainedModel, make_training_set, train_model

pytestmark = pytest.mark.integration

CONFIG = load_config(DEMO_CONFIG)  # ctr: quality window 1h, tiles of 1 min
FEATURES = list(CONFIG.models["ctr"].features)
HOUR = 3_600_000


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = connect(settings)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def trained() -> TrainedModel:
    return train_model(CONFIG, "ctr", n_synthetic=4_000, seed=0)


def store_of(redis: Redis, settings: Settings) -> QualityStore:
    return QualityStore(redis, Keys(settings.redis.key_prefix), CONFIG)


def example(i: int, score: float, label: float, at: int, *, version: str = "1", shadow: dict[str, float] | None = None,
            features: dict[str, float | None] | None = None) -> Example:  # fmt: skip
    return Example(
        prediction_id=f"p{i}", model="ctr", version=version, entities={"user_id": f"u{i}"},
        features=features if features is not None else {f: 1.0 for f in FEATURES}, score=score, label=label,
        predicted_at=at - 1_000, labelled_at=at, shadow=shadow or {},
    )  # fmt: skip


def ece(scores: np.ndarray, labels: np.ndarray) -> float:
    bins = np.minimum((scores * 10).astype(int), 9)
    return float(
        sum(abs(scores[bins == b].mean() - labels[bins == b].mean()) * (bins == b).mean() for b in set(bins.tolist()))
    )


async def test_window_numbers_match_sklearn_through_the_route(settings: Settings, redis: Redis) -> None:
    rng = np.random.default_rng(3)
    n = 600
    labels = (rng.random(n) < 0.35).astype(float)
    scores = np.clip(0.35 + 0.25 * (labels - 0.35) + rng.normal(0, 0.18, n), 0, 1)
    now = now_ms()
    # labelled over the last 50 minutes: many tiles of the window
    times = now - rng.integers(0, 50 * 60_000, n)
    examples = [example(i, float(scores[i]), float(labels[i]), int(times[i])) for i in range(n)]
    store = store_of(redis, settings)
    for start in range(0, n, 100):  # batches, as the consumer records them
        await store.record(examples[start : start + 100], now=now)

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        app.state.quality = store
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://feedback") as client:
            r = await client.get("/v1/models/ctr/quality")
            empty = await client.get("/v1/models/nope/quality")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "ctr" and body["window"] == "1h" and body["window_ms"] == HOUR
    assert now <= body["as_of"] <= now_ms()
    [v] = body["versions"]
    assert v["version"] == "1" and v["count"] == n
    assert v["positive_rate"] == pytest.approx(labels.mean())
    assert v["mean_score"] == pytest.approx(scores.mean())
    assert v["log_loss"] == pytest.approx(sk_log_loss(labels, np.clip(scores, 1e-15, 1 - 1e-15)), rel=1e-9)
    binned = np.array([hist_bin(s) for s in scores])
    assert v["auc"] == pytest.approx(roc_auc_score(labels, binned), abs=1e-12)
    pos = np.bincount(binned[labels == 1], minlength=HIST_BINS)
    neg = np.bincount(binned[labels == 0], minlength=HIST_BINS)
    assert abs(v["auc"] - roc_auc_score(labels, scores)) <= (pos * neg).sum() / (2 * pos.sum() * neg.sum())
    assert v["calibration"] == pytest.approx(ece(scores, labels), abs=1e-9)
    assert v["score_drift"] is None and v["feature_drift"] == {}  # version 1 is not registered: no reference
    assert empty.status_code == 404 and "unknown model" in empty.text  # neither configured nor registered


async def test_tiles_of_a_past_window_stop_counting_and_expire(settings: Settings, redis: Redis) -> None:
    store = store_of(redis, settings)
    keys = Keys(settings.redis.key_prefix)
    now = now_ms()
    q = CONFIG.models["ctr"].quality
    old = [example(i, 0.2, 0.0, now - 59 * 60_000) for i in range(3)]  # still inside the window
    recent = [example(10 + i, 0.8, 1.0, now - 1_000) for i in range(2)]
    gone = [example(20 + i, 0.5, 1.0, now - 2 * HOUR) for i in range(4)]  # its window ended an hour ago
    await store.record(old + recent + gone, now=now)

    assert (await store.window("ctr", now))["1"].n == 5
    assert not await redis.exists(tile_key(keys, "ctr", (now - 2 * HOUR) // q.tile_ms * q.tile_ms))
    # as time passes, the old tile leaves the window while the recent one stays
    later = now + 2 * 60_000
    assert (await store.window("ctr", later))["1"].n == 2
    assert (await store.window("ctr", now + 2 * HOUR)) == {}
    # and every tile expires: memory is bounded by one window (plus a tile)
    for t in window_tiles(q, now):
        ttl = await redis.pttl(tile_key(keys, "ctr", t))
        assert ttl == -2 or 0 < ttl <= q.window_ms + q.tile_ms


async def test_every_version_that_scored_an_example_counts_it_and_pairs_hold_the_shared_examples(
    settings: Settings, redis: Redis
) -> None:
    store = store_of(redis, settings)
    now = now_ms()
    both = [example(i, 0.3 + i / 100, float(i % 2), now - 5_000, shadow={"2": 0.6 - i / 100}) for i in range(20)]
    only1 = [example(100 + i, 0.9, 1.0, now - 5_000) for i in range(5)]
    served_by_2 = [example(200 + i, 0.1, 0.0, now - 5_000, version="2", shadow={"1": 0.4}) for i in range(3)]
    three = [example(300, 0.5, 1.0, now - 5_000, shadow={"2": 0.7, "3": 0.2})]
    await store.record(both + only1, now=now)
    await store.record(served_by_2 + three, now=now)

    window = await store.window("ctr", now)
    assert {v: s.n for v, s in window.items()} == {"1": 29, "2": 24, "3": 1}

    shared = both + served_by_2 + three
    a, b = await store.pair("ctr", "1", "2")
    assert a.close_to(sums_of((score_of(e, "1"), e.label, e.features) for e in shared))
    assert b.close_to(sums_of((score_of(e, "2"), e.label, e.features) for e in shared))
    # the same sums whichever way round it is asked
    b2, a2 = await store.pair("ctr", "2", "1")
    assert (a2, b2) == (a, b)
    x, y = await store.pair("ctr", "2", "3")
    assert (x.n, y.n) == (1, 1) and y.get("s") == pytest.approx(0.2)
    assert await store.pair("ctr", "1", "9") == (Sums(), Sums())
    # cumulative: the rollout controller takes the difference of two snapshots
    await store.record([example(400, 0.5, 1.0, now, shadow={"2": 0.25})], now=now)
    a3, b3 = await store.pair("ctr", "1", "2")
    assert ((a3 - a).n, (b3 - b).n) == (1, 1) and (b3 - b).get("s") == pytest.approx(0.25)


def score_of(e: Example, version: str) -> float:
    return e.score if e.version == version else e.shadow[version]


async def test_drift_is_small_for_data_like_training_and_large_for_shifted_data(
    settings: Settings, redis: Redis, trained: TrainedModel
) -> None:
    keys = Keys(settings.redis.key_prefix)
    registry = ModelRegistry(redis, keys)
    v_same = await registry.register("ctr", trained.onnx_bytes, trained.metadata)
    v_shift = await registry.register("ctr", trained.onnx_bytes, trained.metadata)
    model = build_model("ctr", v_same, trained.onnx_bytes, trained.metadata)
    X = make_training_set(3_000, seed=11).X  # drawn like the training data, other seed
    shifted = X.copy()
    shifted[:, 0] = shifted[:, 0] * 3 + 2  # many more recent clicks
    now = now_ms()

    def examples(rows: np.ndarray, version: str) -> list[Example]:
        scores = model.predict(rows)
        rng = np.random.default_rng(5)
        return [
            example(i, float(s), float(rng.random() < s), now - 1_000, version=version,
                    features=dict(zip(FEATURES, map(float, row), strict=True)))
            for i, (s, row) in enumerate(zip(scores, rows, strict=True))
        ]  # fmt: skip

    store = store_of(redis, settings)
    await store.record(examples(X, v_same) + examples(shifted, v_shift), now=now)
    report = {v.version: v for v in (await store.report("ctr", now)).versions}
    same, moved = report[v_same], report[v_shift]
    assert set(same.feature_drift) == set(FEATURES)
    assert same.score_drift is not None and same.score_drift < 0.05
    assert all(p is not None and p < 0.05 for p in same.feature_drift.values()), same.feature_drift
    assert moved.feature_drift["user_clicks_5m"] is not None and moved.feature_drift["user_clicks_5m"] > 0.5
    assert moved.feature_drift["item_ctr_1h"] is not None and moved.feature_drift["item_ctr_1h"] < 0.05
    assert moved.score_drift is not None and moved.score_drift > 0.2
    ref = Reference.from_metadata(trained.metadata)
    assert ref is not None and ref.score is not None


def gauge(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_gauges_follow_the_window_and_drop_versions_that_left_it(settings: Settings, redis: Redis) -> None:
    store = store_of(redis, settings)
    model = f"ctr-{settings.redis.key_prefix.rstrip(':')}"  # a model name of this test only: gauges are global
    now = now_ms()
    ex = [example(i, 0.25 + 0.5 * (i % 2), float(i % 2), now - 1_000).model_copy(update={"model": model})
          for i in range(10)]  # fmt: skip
    await store.record(ex, now=now)
    publisher = GaugePublisher(store, [model])
    await publisher.publish(now)
    labels: dict[str, Any] = {"model": model, "version": "1"}
    assert gauge("rtml_model_quality", labels | {"metric": "count"}) == 10
    assert gauge("rtml_model_quality", labels | {"metric": "auc"}) == 1.0
    assert gauge("rtml_model_quality", labels | {"metric": "calibration_error"}) == pytest.approx(0.25)
    assert gauge("rtml_model_quality", labels | {"metric": "score_psi"}) is None  # no reference: no child
    await publisher.publish(now + 2 * HOUR)
    assert gauge("rtml_model_quality", labels | {"metric": "count"}) is None


async def test_recording_survives_redis_losing_its_scripts(settings: Settings, redis: Redis) -> None:
    store = store_of(redis, settings)
    now = now_ms()
    await store.record([example(1, 0.5, 1.0, now)], now=now)
    await redis.script_flush()  # what a restart or failover does to the script cache
    await store.record([example(2, 0.5, 0.0, now)], now=now)
    assert (await store.window("ctr", now))["1"].n == 2


async def test_scripts_lost_half_way_through_a_write_resend_only_the_refused_calls(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis forgets its scripts between two calls of one pipeline (a flush, a failover): the calls it already
    applied must not be sent again, only the ones it refused with NOSCRIPT."""
    if isinstance(redis, RedisCluster):
        pytest.skip("one node's pipeline; the cluster's per-call path is tested in test_redis_cluster.py")
    now = now_ms()
    batch = [example(i, 0.1 + i / 40, float(i % 2), now - 5_000 - i * 60_000, shadow={"2": 0.5}) for i in range(8)]
    sources = [("t.outcomes:0", i) for i in range(8)]
    clean = QualityStore(redis, Keys(settings.redis.key_prefix + "clean:"), CONFIG)
    await clean.record(batch, now=now, sources=sources)

    store = store_of(redis, settings)
    await store.record([example(99, 0.5, 1.0, now)], now=now)  # the script is loaded
    real_run = quality_module.run_pipeline
    cut = {"done": False}

    class Recorder:  # what the write puts in its pipeline, to send in two halves
        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []

        def evalsha(self, *args: Any) -> None:
            self.calls.append(args)

    async def flushed_half_way(client: Any, build: Any, what: str, **kw: Any) -> list[Any]:
        if cut["done"] or what != "quality update":
            return await real_run(client, build, what, **kw)
        cut["done"] = True
        recorder = Recorder()
        build(recorder)
        half = len(recorder.calls) // 2

        def part(calls: list[tuple[Any, ...]]) -> Any:
            return lambda pipe: [pipe.evalsha(*c) for c in calls]

        first = await real_run(client, part(recorder.calls[:half]), what, **kw)
        await redis.script_flush()
        return first + await real_run(client, part(recorder.calls[half:]), what, **kw)

    monkeypatch.setattr(quality_module, "run_pipeline", flushed_half_way)
    await store.record(batch, now=now, sources=sources)
    assert cut["done"]
    window, pair, labels = await snapshot(store, now)
    want_window, want_pair, want_labels = await snapshot(clean, now)
    assert labels == want_labels + 1  # the example recorded first, without sources
    assert pair[0].close_to(want_pair[0]) and pair[1].close_to(want_pair[1])
    assert window["2"].close_to(want_window["2"]) and window["1"].n == want_window["1"].n + 1


async def test_publish_gauges_forever_defaults_to_the_configured_models(settings: Settings, redis: Redis) -> None:
    import asyncio
    import contextlib

    from rtml.feedback.quality import publish_gauges_forever

    store = store_of(redis, settings)
    await store.record([example(1, 0.9, 1.0, now_ms(), version="77")])
    task = asyncio.create_task(publish_gauges_forever(store, 0.05))
    try:
        for _ in range(100):
            if gauge("rtml_model_quality", {"model": "ctr", "version": "77", "metric": "count"}) == 1:
                break
            await asyncio.sleep(0.05)
        assert gauge("rtml_model_quality", {"model": "ctr", "version": "77", "metric": "mean_score"}) == 0.9
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def snapshot(store: QualityStore, now: int) -> tuple[dict[str, Sums], tuple[Sums, Sums], float]:
    labels = await store.redis.hget(learn_key(store.keys, "ctr"), "labels")
    return await store.window("ctr", now), await store.pair("ctr", "1", "2"), float(labels or 0)


def assert_same(got: tuple[dict[str, Sums], tuple[Sums, Sums], float], want: Any) -> None:
    assert set(got[0]) == set(want[0])
    assert all(got[0][v].close_to(want[0][v]) for v in want[0]), (got[0], want[0])
    assert got[1][0].close_to(want[1][0]) and got[1][1].close_to(want[1][1])
    assert got[2] == want[2]


async def test_with_sources_each_record_counts_once_in_every_key_whatever_was_written_before(
    settings: Settings, redis: Redis
) -> None:
    """A write that reached some keys and not others (a pipeline cut half way, a Cluster node down), then the
    batch again as replays, and again: every key holds each record exactly once, as one clean write does."""
    now = now_ms()
    # two tiles, the pair 1|2 and the learning counter; two streams, offsets in order within each
    batch = [example(i, 0.2 + i / 50, float(i % 2), now - (5_000 if i < 10 else 65_000), shadow={"2": 0.5})
             for i in range(20)]  # fmt: skip
    sources = [("t.predictions:0" if i % 2 else "t.outcomes:3", 40 + i) for i in range(20)]
    clean = QualityStore(redis, Keys(settings.redis.key_prefix + "clean:"), CONFIG)
    await clean.record(batch, now=now, sources=sources)
    want = await snapshot(clean, now)
    assert want[0]["1"].n == 20 and want[2] == 20

    store = store_of(redis, settings)
    await store.record(batch[:6], now=now, sources=sources[:6])  # an earlier, shorter delivery got through
    real_write = store._write

    async def half_write(per_key: Any, ttl: Any, spans: Any) -> None:  # only the first half of the keys
        keys = sorted(per_key)[: len(per_key) // 2]
        await real_write({k: per_key[k] for k in keys}, ttl, spans)
        raise DependencyUnavailable("redis", "cut half way")

    store._write = half_write  # type: ignore[method-assign]
    with pytest.raises(DependencyUnavailable):
        await store.record(batch, now=now, sources=sources, replayed=[i < 6 for i in range(20)])
    store._write = real_write  # type: ignore[method-assign]
    partial = await snapshot(store, now)
    assert partial[2] != 20 or partial[0] != want[0], "the cut write should have left some key short"

    for _ in range(2):  # the retry, then a redelivery: replays of every record
        await store.record(batch, now=now, sources=sources, replayed=[True] * 20)
        assert_same(await snapshot(store, now), want)

    # a replay that another consumer applied between this one's marks read and its write: nothing applied
    real_marks = store._marks

    async def stale_marks(wanted: Any) -> dict[tuple[str, str], int]:
        return {}  # as read before the other consumer's write

    store._marks = stale_marks  # type: ignore[method-assign]
    with pytest.raises(QualityConflict):
        await store.record(batch[:3], now=now, sources=sources[:3], replayed=[True] * 3)
    store._marks = real_marks  # type: ignore[method-assign]
    assert_same(await snapshot(store, now), want)

    # the topics were recreated, their offsets start again below the marks: first-time records still count,
    # the marks follow the new offsets, and a replay of those records then counts nothing
    fresh = [example(500 + i, 0.5, 1.0, now - 5_000, shadow={"2": 0.5}) for i in range(3)]
    fresh_sources = [("t.outcomes:3", i) for i in range(3)]
    await clean.record(fresh, now=now, sources=fresh_sources)
    want = await snapshot(clean, now)
    await store.record(fresh, now=now, sources=fresh_sources)
    assert_same(await snapshot(store, now), want)
    await store.record(fresh, now=now, sources=fresh_sources, replayed=[True] * 3)
    assert_same(await snapshot(store, now), want)
    # ... and the next records, whose first write failed, count when they come again (the marks were reset)
    more = [example(600 + i, 0.25, 0.0, now - 5_000, shadow={"2": 0.5}) for i in range(2)]
    more_sources = [("t.outcomes:3", 3 + i) for i in range(2)]
    await clean.record(more, now=now, sources=more_sources)
    await store.record(more, now=now, sources=more_sources, replayed=[True] * 2)
    assert_same(await snapshot(store, now), await snapshot(clean, now))


async def test_a_shorter_redelivery_never_lowers_a_mark(settings: Settings, redis: Redis) -> None:
    """A redelivery can end before the earlier delivery did (a crash before the commit, a retry) while another
    stream of the batch brings a first-time label for the same model, so the model's keys get a call: the
    marks of the short stream must not move back, or the next batch's replays count again (found in review)."""
    now = now_ms()
    s, s2 = "t.outcomes:0", "t.predictions:1"

    def labelled(stream: str, offsets: range) -> tuple[list[Example], list[tuple[str, int]]]:
        base = 0 if stream == s else 1000
        return ([example(base + o, 0.1 + (o % 9) / 10, float(o % 2), now - 5_000, shadow={"2": 0.5}) for o in offsets],
                [(stream, o) for o in offsets])  # fmt: skip

    def deliver(*parts: tuple[str, range, bool]) -> tuple[list[Example], list[tuple[str, int]], list[bool]]:
        exs: list[Example] = []
        srcs: list[tuple[str, int]] = []
        again: list[bool] = []
        for stream, offsets, replayed in parts:
            e, src = labelled(stream, offsets)
            exs, srcs, again = exs + e, srcs + src, again + [replayed] * len(e)
        return exs, srcs, again

    store = store_of(redis, settings)
    deliveries = [
        deliver((s, range(10, 15), False), (s2, range(100, 105), False)),  # committed? no: it comes again
        deliver((s, range(10, 13), True), (s2, range(100, 105), True), (s2, range(105, 106), False)),  # shorter
        deliver((s, range(13, 15), True), (s, range(15, 16), False)),
    ]
    for exs, srcs, again in deliveries:
        await store.record(exs, now=now, sources=srcs, replayed=again)

    clean = QualityStore(redis, Keys(settings.redis.key_prefix + "clean:"), CONFIG)
    exs, srcs, _ = deliver((s, range(10, 16), False), (s2, range(100, 106), False))  # the 12 distinct labels
    await clean.record(exs, now=now, sources=srcs)
    want = await snapshot(clean, now)
    assert want[2] == 12
    assert_same(await snapshot(store, now), want)
