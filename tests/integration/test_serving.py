"""The serving service on a real broker and redis-server: predict, recommend, registry, hot swap, log."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from rtml.core.config import load_config
from rtml.core.kafka import Consumed, ConsumerLoop, Producer, create_topics, decode_json
from rtml.core.redis import Keys, connect
from rtml.core.schemas import Event
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.features.store import FeatureStore
from rtml.serving.app import create_app
from rtml.serving.inference.session import LoadedModel, build_model
from rtml.serving.registry import ModelRegistry
from rtml.serving.train import DEMO_CONFIG, TrainedModel, train_model
from tests.helpers import error_of, eventually, free_port, running

pytestmark = pytest.mark.integration

FEATURES = ["user_clicks_5m", "item_ctr_1h", "user_items_24h"]


@functools.cache
def trained(seed: int = 0) -> TrainedModel:
    return train_model(load_config(DEMO_CONFIG), "ctr", n_synthetic=3_000, seed=seed)


def local(seed: int = 0) -> LoadedModel:
    t = trained(seed)
    return build_model("ctr", "x", t.onnx_bytes, t.metadata)


def expected_score(row: list[float], seed: int = 0) -> float:
    return float(local(seed).predict(np.array([row], np.float32))[0])


async def register(settings: Settings, seed: int = 0, promote: bool = True) -> str:
    redis = connect(settings)
    try:
        registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
        t = trained(seed)
        version = await registry.register("ctr", t.onnx_bytes, t.metadata)
        if promote:
            await registry.promote("ctr", version)
        return version
    finally:
        await redis.aclose()


async def write_events(settings: Settings, events: list[Event]) -> None:
    redis = connect(settings)
    try:
        store = FeatureStore(redis, Keys(settings.redis.key_prefix), load_config(settings.platform_config_path()))
        await store.apply(events)
    finally:
        await redis.aclose()


def ev(i: int, type_: str, user: str, item: str, ts: int) -> Event:
    return Event(event_id=f"e{i}-{type_}-{user}-{item}", type=type_, user_id=user, item_id=item, ts=ts, received_at=ts)


@pytest.fixture
async def fast(settings: Settings) -> AsyncIterator[Settings]:
    yield settings.model_copy(update={"model_poll_interval_s": 0.2})


async def test_predict_uses_stored_features_and_logs_them(fast: Settings) -> None:
    version = await register(fast)
    now = now_ms()
    events = [ev(i, "click", "u1", f"t{i}", now - 1000) for i in range(4)]  # 4 clicks, 4 distinct items
    events += [ev(i, "view", "u2", "t9", now - 1000) for i in range(4)] + [ev(0, "click", "u2", "t9", now - 1000)]
    await write_events(fast, events)

    app = create_app(fast)
    async with running(app) as client:
        resp = await client.post("/v1/predict", json={"entities": {"user_id": "u1", "item_id": "t9"}})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"prediction_id", "model", "version", "score", "degraded"}
        assert body["model"] == "ctr" and body["version"] == version and body["degraded"] is False
        # u1: 4 clicks in 5 min, 4 distinct items; t9: 1 click / 4 views
        row = [4.0, 0.25, 4.0]
        assert body["score"] == pytest.approx(expected_score(row), abs=1e-6)
        pid = body["prediction_id"]

    got: list[dict[str, Any]] = []

    async def handle(batch: list[Consumed[Any]]) -> None:
        got.extend(c.value for c in batch)

    async with Producer(fast) as producer:
        loop: ConsumerLoop[Any] = ConsumerLoop(
            fast, name="t", topics=["predictions"], group_id="t-serving", decode=decode_json, handle=handle,
            producer=producer,
        )  # fmt: skip
        async with loop:
            await loop.run(timeout=15, count=1)
    [record] = [r for r in got if r["prediction_id"] == pid]
    assert record["features"] == dict(zip(FEATURES, row, strict=True))
    assert record["entities"] == {"user_id": "u1", "item_id": "t9"}
    assert record["version"] == version and record["score"] == pytest.approx(body["score"])
    assert record["item_id"] == "t9" and record["degraded"] is False and record["ts"] > 0


async def test_the_feature_store_is_warm_before_the_first_request(fast: Settings) -> None:
    """Scripts loaded and the read connection open at start-up: the first predict after a start spends its
    50 ms deadline on the read, not on SCRIPT LOAD and connects (which answered degraded on a busy CI box)."""
    await register(fast)
    app = create_app(fast)
    async with running(app) as client:
        assert app.state.predictor.store.scripts.warm
        resp = await client.post("/v1/predict", json={"entities": {"user_id": "u-warm", "item_id": "t1"}})
        assert resp.status_code == 200 and resp.json()["degraded"] is False


async def test_request_features_override_and_defaults(fast: Settings) -> None:
    await register(fast)
    await write_events(fast, [ev(i, "click", "u1", "t1", now_ms() - 1000) for i in range(3)])
    async with running(create_app(fast)) as client:
        resp = await client.post(
            "/v1/predict",
            json={"model": "ctr", "entities": {"user_id": "u1"}, "features": {"user_clicks_5m": 30, "nope": 1}},
        )
        assert resp.status_code == 200, resp.text
        # clicks overridden; item_ctr_1h: no item -> declared default 0.0; user_items_24h stored (1)
        assert resp.json()["score"] == pytest.approx(expected_score([30.0, 0.0, 1.0]), abs=1e-6)
        assert resp.json()["degraded"] is False
        bad = await client.post("/v1/predict", json={"entities": {"user_id": "u1"}, "features": {"x": "high"}})
        assert bad.status_code == 422 and error_of(bad)["code"] == "invalid"


async def test_unknown_model_and_no_live_version_are_404(fast: Settings) -> None:
    async with running(create_app(fast)) as client:
        resp = await client.post("/v1/predict", json={"model": "nope", "entities": {"user_id": "u1"}})
        assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
        resp = await client.post("/v1/predict", json={"entities": {"user_id": "u1"}})
        assert resp.status_code == 404 and "no live version" in error_of(resp)["message"]
        await register(fast, promote=False)
        await asyncio.sleep(0.5)
        resp = await client.post("/v1/predict", json={"entities": {"user_id": "u1"}})
        assert resp.status_code == 404
        resp = await client.post("/v1/recommend", json={"user_id": "u1", "candidates": ["a"], "k": 1})
        assert resp.status_code == 404


async def test_promote_switches_every_replica_without_failed_requests(fast: Settings) -> None:
    v1 = await register(fast, seed=0)
    v2 = await register(fast, seed=1, promote=False)
    payload = {"entities": {"user_id": "u1"}, "features": {"user_clicks_5m": 3, "item_ctr_1h": 0.2}}
    async with running(create_app(fast)) as admin, running(create_app(fast)) as replica:
        assert (await replica.post("/v1/predict", json=payload)).json()["version"] == v1
        failures = 0
        stop = asyncio.Event()

        async def hammer() -> None:
            nonlocal failures
            while not stop.is_set():
                r = await replica.post("/v1/predict", json=payload)
                failures += r.status_code != 200
                await asyncio.sleep(0)

        task = asyncio.create_task(hammer())
        resp = await admin.post("/v1/models/ctr/promote", json={"version": v2})
        assert resp.status_code == 200, resp.text
        promoted_at = asyncio.get_running_loop().time()

        async def serves_v2() -> None:
            r = await replica.post("/v1/predict", json=payload)
            assert r.json()["version"] == v2

        await eventually(serves_v2, timeout=5)
        assert asyncio.get_running_loop().time() - promoted_at < 5
        stop.set()
        await task
        assert failures == 0
        r = await replica.post("/v1/predict", json=payload)
        assert r.json()["score"] == pytest.approx(expected_score([3.0, 0.2, 0.0], seed=1), abs=1e-6)

        missing = await admin.post("/v1/models/ctr/promote", json={"version": "99"})
        assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"


async def test_degraded_when_the_store_cannot_be_read(fast: Settings, make_settings: Any) -> None:
    await register(fast)
    app = create_app(fast)
    async with running(app) as client:
        dead = connect(make_settings(redis={"url": f"redis://127.0.0.1:{free_port()}/0", "socket_timeout_s": 0.5}))
        config = load_config(fast.platform_config_path())
        app.state.predictor.store = FeatureStore(dead, Keys(fast.redis.key_prefix), config)
        try:
            resp = await client.post("/v1/predict", json={"entities": {"user_id": "u1", "item_id": "t1"}})
            assert resp.status_code == 200, resp.text
            assert resp.json()["degraded"] is True
            assert resp.json()["score"] == pytest.approx(expected_score([0.0, 0.0, 0.0]), abs=1e-6)
            # every feature supplied: the store is not needed, so not degraded
            full = {"user_clicks_5m": 1, "item_ctr_1h": 0.1, "user_items_24h": 2}
            resp = await client.post("/v1/predict", json={"entities": {"user_id": "u1"}, "features": full})
            assert resp.status_code == 200 and resp.json()["degraded"] is False
            resp = await client.post("/v1/recommend", json={"user_id": "u1", "candidates": ["a", "b"], "k": 1})
            assert resp.status_code == 200 and resp.json()["degraded"] is True
        finally:
            await dead.aclose()


async def test_recommend_ranks_candidates(fast: Settings) -> None:
    version = await register(fast)
    now = now_ms()
    events = [ev(i, "view", "x", "hot", now - 1000) for i in range(10)]
    events += [ev(i, "click", "x", "hot", now - 1000) for i in range(6)]
    events += [ev(i, "view", "x", "cold", now - 1000) for i in range(10)]
    await write_events(fast, events)
    async with running(create_app(fast)) as client:
        resp = await client.post("/v1/recommend", json={"user_id": "u1", "candidates": ["cold", "hot", "new"], "k": 2})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"] == "ctr" and body["version"] == version and body["prediction_id"]
        items = body["items"]
        assert len(items) == 2 and items[0]["item_id"] == "hot"
        assert items[0]["score"] >= items[1]["score"]
        assert items[0]["score"] == pytest.approx(expected_score([0.0, 0.6, 0.0]), abs=1e-6)
        bad = await client.post("/v1/recommend", json={"user_id": "u1", "candidates": [], "k": 2})
        assert bad.status_code == 422


async def test_model_upload_list_and_invalid_onnx(fast: Settings) -> None:
    t = trained()
    async with running(create_app(fast)) as client:
        bad = await client.post("/v1/models/ctr/versions", content=b"\x80\x04not onnx at all")
        assert bad.status_code == 422 and error_of(bad)["code"] == "invalid"
        wrong = await client.post("/v1/models/ctr/versions", content=t.onnx_bytes,
                                  params={"metadata": '{"features": ["a", "b"]}'})  # fmt: skip
        assert wrong.status_code == 422
        resp = await client.post("/v1/models/ctr/versions", content=t.onnx_bytes, params={"promote": "true"})
        assert resp.status_code == 201, resp.text
        assert resp.json() == {"model": "ctr", "version": "1", "live": True}
        resp = await client.post("/v1/models/ctr/versions", content=t.onnx_bytes)
        assert resp.json()["version"] == "2"
        pred = await client.post("/v1/predict", json={"entities": {"user_id": "u1"}})
        assert pred.status_code == 200 and pred.json()["version"] == "1"
        listing = (await client.get("/v1/models")).json()["models"]
        [ctr] = [m for m in listing if m["name"] == "ctr"]
        assert ctr["live_version"] == "1" and ctr["serving_version"] == "1"
        assert [v["version"] for v in ctr["versions"]] == ["1", "2"]
        assert ctr["versions"][0]["features"] == FEATURES and len(ctr["versions"][0]["sha256"]) == 64
        other = await client.post("/v1/models/other/versions", content=t.onnx_bytes)
        assert other.status_code == 422  # not in the config and no features given


async def test_auth_scopes(make_settings: Any) -> None:
    s = make_settings(api_keys="p:predict,a:admin,r:read")
    await create_topics(s)
    await register(s)
    async with running(create_app(s)) as client:
        body = {"entities": {"user_id": "u1"}}
        assert (await client.post("/v1/predict", json=body)).status_code == 401
        assert (await client.post("/v1/predict", json=body, headers={"Authorization": "Bearer r"})).status_code == 403
        assert (await client.post("/v1/predict", json=body, headers={"Authorization": "Bearer p"})).status_code == 200
        promote = {"version": "1"}
        headers = {"Authorization": "Bearer p"}
        assert (await client.post("/v1/models/ctr/promote", json=promote, headers=headers)).status_code == 403
        headers = {"Authorization": "Bearer a"}
        assert (await client.post("/v1/models/ctr/promote", json=promote, headers=headers)).status_code == 200
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer r"})).status_code == 200


async def test_recommend_reads_pair_features_per_candidate(fast: Settings) -> None:
    """A model on a user x item feature: each candidate's row holds its own pair's stored value."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LinearRegression

    x = np.array([[a, b] for a in range(5) for b in range(5)], dtype=np.float32)
    reg = LinearRegression().fit(x, x[:, 1])  # the score is the pair's click count
    onnx_bytes = to_onnx(reg, x[:1]).SerializeToString()
    redis = connect(fast)
    try:
        registry = ModelRegistry(redis, Keys(fast.redis.key_prefix))
        meta = {"features": ["user_clicks_5m", "user_item_clicks_24h"], "task": "regression"}
        version = await registry.register("pairs", onnx_bytes, meta)
        await registry.promote("pairs", version)
    finally:
        await redis.aclose()
    now = now_ms()
    events = [ev(i, "click", "pu", "hot", now - 1000) for i in range(3)] + [ev(0, "click", "pu", "cold", now - 1000)]
    events += [ev(i, "click", "other", "cold", now - 1000) for i in range(5)]  # another user's pair: not pu's
    await write_events(fast, events)
    async with running(create_app(fast)) as client:
        body = {"model": "pairs", "user_id": "pu", "candidates": ["cold", "new", "hot"], "k": 3}
        resp = await client.post("/v1/recommend", json=body)
        assert resp.status_code == 200, resp.text
        got = {i["item_id"]: i["score"] for i in resp.json()["items"]}
        assert list(got) == ["hot", "cold", "new"]
        assert got == pytest.approx({"hot": 3.0, "cold": 1.0, "new": 0.0}, abs=1e-4)
