"""The model registry on a real broker and redis-server: entry points used by the CLI (train_and_register,
ensure_models), the size cap, checksums, metadata validation, who/when, promotion history and rollback."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from rtml.core.config import load_config
from rtml.core.errors import NotFound, PayloadTooLarge
from rtml.core.kafka import Consumed, ConsumerLoop, Producer, create_topics, decode_json
from rtml.core.redis import Keys, connect
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.serving import registry as registry_module
from rtml.serving.app import create_app
from rtml.serving.registry import (
    ModelIntegrityError,
    ModelRegistry,
    configured_live_versions,
    ensure_models,
    train_and_register,
)
from rtml.serving.train import DEMO_CONFIG, TrainedModel, train_model
from tests.helpers import error_of, running

pytestmark = pytest.mark.integration

FEATURES = ["user_clicks_5m", "item_ctr_1h", "user_items_24h"]


async def test_ensure_models_trains_once_and_train_adds_versions(settings: Settings) -> None:
    assert await ensure_models(settings) == {"ctr": "1", "fraud": "1"}  # the demo config's models
    assert await ensure_models(settings) == {}  # already live: nothing to do
    assert await train_and_register(settings, promote=False) == "2"
    redis = connect(settings)
    try:
        registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
        assert await registry.live_version("ctr") == "1"
        onnx_bytes, metadata = await registry.get("ctr", "2")
        assert onnx_bytes and metadata["features"] == ["user_clicks_5m", "item_ctr_1h", "user_items_24h"]
        await registry.promote("ctr", "2")
        assert await registry.live_version("ctr") == "2"
        with pytest.raises(NotFound):
            await registry.promote("ctr", "7")
        [ctr] = [m for m in await registry.describe() if m["name"] == "ctr"]
        assert ctr["live_version"] == "2" and [v["live"] for v in ctr["versions"]] == [False, True]
    finally:
        await redis.aclose()
    with pytest.raises(NotFound):
        await train_and_register(settings, model_name="nope")


# -- size cap, checksum, metadata, rollback, who/when (issue 4) -------------------------------------------


@functools.cache
def trained() -> TrainedModel:
    return train_model(load_config(DEMO_CONFIG), "ctr", n_synthetic=2_000)


@asynccontextmanager
async def registry_of(settings: Settings) -> AsyncIterator[ModelRegistry]:
    redis = connect(settings)
    try:
        yield ModelRegistry(redis, Keys(settings.redis.key_prefix))
    finally:
        await redis.aclose()


async def consume(settings: Settings, topic: str, count: int, timeout: float = 30) -> list[Any]:
    """Read ``topic`` from the start with a fresh consumer group, until ``count`` records or ``timeout``."""
    got: list[Any] = []

    async def handle(batch: list[Consumed[Any]]) -> None:
        got.extend(c.value for c in batch)

    async with Producer(settings) as producer:
        loop: ConsumerLoop[Any] = ConsumerLoop(
            settings, name=f"test-{topic}", topics=[topic], group_id=f"test-{topic}", decode=decode_json,
            handle=handle, producer=producer,
        )  # fmt: skip
        async with loop:
            await loop.run(timeout=timeout, count=count)
    return got


async def test_upload_over_the_size_cap_is_413(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    t = trained()
    monkeypatch.setattr(registry_module, "MAX_MODEL_BYTES", len(t.onnx_bytes) - 1)
    async with running(create_app(settings)) as client:
        resp = await client.post("/v1/models/ctr/versions", content=t.onnx_bytes)
        assert resp.status_code == 413, resp.text
        assert error_of(resp)["code"] == "payload_too_large"
        assert str(len(t.onnx_bytes) - 1) in error_of(resp)["message"]
    async with registry_of(settings) as registry:  # and the registry checks it too, whoever calls it
        with pytest.raises(PayloadTooLarge, match=f"the limit is {len(t.onnx_bytes) - 1}"):
            await registry.register("ctr", t.onnx_bytes, t.metadata)
    monkeypatch.setattr(registry_module, "MAX_MODEL_BYTES", len(t.onnx_bytes))
    async with running(create_app(settings)) as client:
        resp = await client.post("/v1/models/ctr/versions", content=t.onnx_bytes)
        assert resp.status_code == 201, resp.text  # exactly at the cap is fine
    async with registry_of(settings) as registry:
        assert [v["version"] for v in (await registry.describe())[0]["versions"]] == ["1"]  # nothing half-stored


async def test_checksum_mismatch_is_detected_on_read(settings: Settings) -> None:
    t = trained()
    async with registry_of(settings) as registry:
        version = await registry.register("ctr", t.onnx_bytes, t.metadata)
        raw, _ = await registry.get("ctr", version)
        assert raw == t.onnx_bytes
        [info] = (await registry.describe())[0]["versions"]
        assert info["sha256"] == hashlib.sha256(t.onnx_bytes).hexdigest() and info["size"] == len(t.onnx_bytes)
        corrupt = bytearray(t.onnx_bytes)
        corrupt[len(corrupt) // 2] ^= 0xFF
        await registry.redis.hset(f"{registry.keys.model('ctr')}:v:{version}", "onnx", bytes(corrupt))
        with pytest.raises(ModelIntegrityError, match="sha256"):
            await registry.get("ctr", version)
        # a truncated blob too
        await registry.redis.hset(f"{registry.keys.model('ctr')}:v:{version}", "onnx", t.onnx_bytes[:-1])
        with pytest.raises(ModelIntegrityError):
            await registry.get("ctr", version)


BAD_METADATA = [
    ({"features": []}, "metadata.features"),
    ({"features": "user_clicks_5m"}, "metadata.features"),
    ({"features": ["a", "b", "a"]}, "repeated: a"),
    ({"features": ["a", 3, "c"]}, "metadata.features[1]"),
    ({"features": ["a", "b", "c"], "defaults": [1, 2]}, "metadata.defaults"),
    ({"features": ["a", "b", "c"], "defaults": {"zz": 1.0}}, "metadata.defaults.zz"),
    ({"features": ["a", "b", "c"], "defaults": {"b": "high"}}, "metadata.defaults.b"),
    ({"features": ["a", "b", "c"], "defaults": {"b": True}}, "metadata.defaults.b"),
    ({"features": ["a", "b", "c"], "defaults": {"b": None}}, "metadata.defaults.b"),
    ({"features": ["a", "b", "c"], "task": ""}, "metadata.task"),
    ({"features": ["a", "b", "c"], "task": 7}, "metadata.task"),
    ({"features": ["a", "b", "c"], "metrics": {"auc": "good"}}, "metadata.metrics.auc"),
    ({"features": ["a", "b", "c"], "metrics": {"q": [0.1, "x"]}}, "metadata.metrics.q"),
    ({"features": ["a", "b", "c"], "metrics": 0.9}, "metadata.metrics"),
]


@pytest.mark.parametrize(("metadata", "named"), BAD_METADATA)
async def test_bad_metadata_is_422_naming_the_field(settings: Settings, metadata: Any, named: str) -> None:
    async with running(create_app(settings)) as client:
        resp = await client.post("/v1/models/other/versions", content=trained().onnx_bytes,
                                 params={"metadata": orjson.dumps(metadata).decode()})  # fmt: skip
        assert resp.status_code == 422, resp.text
        assert error_of(resp)["code"] == "invalid" and named in error_of(resp)["message"]
    async with registry_of(settings) as registry:
        assert await registry.names() == []  # nothing registered


async def test_bad_default_of_a_configured_model_is_422_not_500(settings: Settings) -> None:
    async with running(create_app(settings)) as client:
        resp = await client.post("/v1/models/ctr/versions", content=trained().onnx_bytes,
                                 params={"metadata": '{"defaults": {"item_ctr_1h": "x"}}'})  # fmt: skip
        assert resp.status_code == 422 and "metadata.defaults.item_ctr_1h" in error_of(resp)["message"]
        resp = await client.post("/v1/models/ctr/versions", content=b"x", params={"metadata": "[1]"})
        assert resp.status_code == 422 and "JSON object" in error_of(resp)["message"]


async def test_upload_records_who_and_when(make_settings: Any) -> None:
    s = make_settings(api_keys="sekret:admin")
    await create_topics(s)
    meta = {"features": FEATURES, "defaults": {"item_ctr_1h": 0.5}, "metrics": {"auc": 0.7}, "created_by": "me"}
    before = now_ms()
    async with running(create_app(s)) as client:
        headers = {"Authorization": "Bearer sekret"}
        resp = await client.post("/v1/models/other/versions", content=trained().onnx_bytes, headers=headers,
                                 params={"metadata": orjson.dumps({**meta, "created_at": 1}).decode()})  # fmt: skip
        assert resp.status_code == 201, resp.text
        [other] = [
            m for m in (await client.get("/v1/models", headers=headers)).json()["models"] if m["name"] == "other"
        ]
    [v] = other["versions"]
    assert v["created_by"].startswith("api-key:") and "sekret" not in v["created_by"]  # the key, never in clear
    assert before <= v["created_at"] <= now_ms()  # the server's clock, not the caller's claim
    assert v["task"] == "binary_classification" and v["metrics"] == {"auc": 0.7}
    assert v["defaults"] == {"item_ctr_1h": 0.5}
    async with registry_of(settings=s) as registry:
        _, md = await registry.get("other", "1")
        assert md["created_at"] == v["created_at"] and md["created_by"] == v["created_by"]
    # without API keys, the uploader's own claim, else "unknown"; train.py's metadata keeps working
    async with registry_of(s) as registry:
        await registry.register("other", trained().onnx_bytes, {"features": FEATURES})
        await registry.register("ctr", trained().onnx_bytes, trained().metadata)
        [ctr, other] = await registry.describe()
    assert other["versions"][1]["created_by"] == "unknown"
    assert ctr["versions"][0]["created_by"] == trained().metadata["created_by"]
    assert ctr["versions"][0]["metrics"]["auc"] == trained().metadata["metrics"]["auc"]


async def test_rollback_round_trip_is_announced(settings: Settings) -> None:
    t = trained()
    async with registry_of(settings) as registry, Producer(settings) as producer:
        for _ in range(3):
            await registry.register("ctr", t.onnx_bytes, t.metadata)
        with pytest.raises(NotFound, match="no earlier live version"):
            await registry.rollback("ctr", producer)  # nothing live yet
        await registry.promote("ctr", "1", producer)
        with pytest.raises(NotFound, match="no earlier live version"):
            await registry.rollback("ctr", producer)  # live, but nothing before it
        await registry.promote("ctr", "2", producer)
        await registry.promote("ctr", "2", producer)  # promoting the live one again is not a step back
        await registry.promote("ctr", "3", producer, by="alice")
        assert await registry.history("ctr") == ["2", "1"]
        assert await registry.rollback("ctr", producer, by="bob") == "2"
        assert await registry.live_version("ctr") == "2"
        assert await registry.rollback("ctr", producer) == "1"
        assert await registry.live_version("ctr") == "1"
        with pytest.raises(NotFound):
            await registry.rollback("ctr", producer)
        assert await registry.live_version("ctr") == "1"  # a failed rollback changes nothing
        await registry.promote("ctr", "3", producer)
        [ctr] = await registry.describe()
        assert ctr["live_version"] == "3" and ctr["history"] == ["1"]
    got = await consume(settings, "models", count=7)
    records = [(r["event"], r["version"]) for r in got]
    assert records == [("promoted", "1"), ("promoted", "2"), ("promoted", "2"), ("promoted", "3"),
                       ("rolled_back", "2"), ("rolled_back", "1"), ("promoted", "3")]  # fmt: skip
    assert got[3]["by"] == "alice" and got[4]["by"] == "bob" and all(r["model"] == "ctr" for r in got)


async def test_history_is_bounded(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "HISTORY_MAX", 2)
    t = trained()
    async with registry_of(settings) as registry:
        for _ in range(4):
            await registry.promote("ctr", await registry.register("ctr", t.onnx_bytes, t.metadata))
        assert await registry.history("ctr") == ["3", "2"]


async def test_rollback_route(settings: Settings) -> None:
    t = trained()
    async with running(create_app(settings)) as client:
        for promote in ("true", "true"):
            assert (await client.post("/v1/models/ctr/versions", content=t.onnx_bytes,
                                      params={"promote": promote})).status_code == 201  # fmt: skip
        pred = await client.post("/v1/predict", json={"entities": {"user_id": "u1"}})
        assert pred.json()["version"] == "2"
        resp = await client.post("/v1/models/ctr/rollback")
        assert resp.status_code == 200 and resp.json() == {"model": "ctr", "version": "1", "live": True}
        pred = await client.post("/v1/predict", json={"entities": {"user_id": "u1"}})
        assert pred.json()["version"] == "1"  # this replica serves it at once
        resp = await client.post("/v1/models/ctr/rollback")
        assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"


async def test_ensure_models_covers_every_configured_model(make_settings: Any, tmp_path: Path) -> None:
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["models"]["second"] = {"features": ["user_clicks_5m", "user_views_total"]}
    path = tmp_path / "rtml.yaml"
    path.write_text(yaml.safe_dump(config))
    s = make_settings(config=path)
    assert await ensure_models(s) == {name: "1" for name in config["models"]}
    assert await ensure_models(s) == {}
    async with registry_of(s) as registry:
        await registry.redis.delete(f"{registry.keys.model('second')}:live")
        lock = f"{registry.keys.model('ctr')}:training"
        assert await registry.redis.get(lock) is None  # locks released
    assert await ensure_models(s) == {"second": "2"}  # only the one without a live version
    assert await configured_live_versions(s) == {"ctr": "1", "fraud": "1", "second": "2"}
