"""Bad input on every service's write and read routes: a 4xx in the contract's shape, never a 500, never a hang,
and nothing published or stored for what was refused.

Per route, a table of cases (oversized bodies by Content-Length and chunked, JSON nested 100,000 deep, 200,000
keys, multi-MiB strings, invalid UTF-8, not JSON, empty, wrong Content-Type, NaN/Infinity literals, numbers past
float or int64 range, wrong types, timestamps in the future / far past / with odd offsets, unknown models and
entities, bad model uploads), each with its exact status, error code and a fragment of its message. Then the
topic the route writes to is read back: it holds exactly the accepted records. Services run in-process against
the real broker and redis-server. Cases that show a defect in a file another helper owns are xfail(strict=True)
tests naming the finding in /work/notes/findings-badinput.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import pickle
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from rtml.core.config import load_config
from rtml.core.redis import Keys, connect
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.features.app import create_app as create_features
from rtml.feedback.app import create_app as create_feedback
from rtml.ingest.app import create_app as create_ingest
from rtml.serving.app import create_app as create_serving
from rtml.serving.registry import MAX_MODEL_BYTES, ModelRegistry
from rtml.serving.train import DEMO_CONFIG, train_model
from tests.helpers import error_of, free_port, running, served
from tests.integration.test_deadletter_topics import read_all

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
JSON = {"content-type": "application/json"}
TEXT = {"content-type": "text/plain"}
HANG_S = 120  # a whole table of cases answers in well under a second per case; this only catches a hang

DEEP_ARRAY = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
MANY_KEYS = orjson.dumps({f"k{i}": i for i in range(20_000)})  # 250 KB of keys no route knows
BAD_UTF8 = b'{"type": "view", "user_id": "\xff\xfe\xfd"}'
HUGE_INT = b"1" + b"0" * 400  # past float64 range: JSON parsers make it infinity or refuse it


@functools.cache
def trained(model: str, seed: int) -> Any:
    """A small demo model, trained once per test session (training is the slow part of a serving test)."""
    return train_model(load_config(DEMO_CONFIG), model, n_synthetic=500, seed=seed)


@pytest.fixture
async def ctr_live(settings: Settings) -> Settings:
    """Version 1 of ctr registered and live in this test's Redis (the app is started by each test)."""
    redis = connect(settings)
    try:
        registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
        t = trained("ctr", 0)
        await registry.promote("ctr", await registry.register("ctr", t.onnx_bytes, t.metadata))
    finally:
        await redis.aclose()
    return settings


async def chunked(total: int, size: int = MiB) -> AsyncIterator[bytes]:
    """A body without Content-Length (Transfer-Encoding: chunked), ``total`` bytes in ``size`` pieces."""
    block = b"x" * size
    sent = 0
    while sent < total:
        yield block[: total - sent]
        sent += size


def epoch_ms(iso: str) -> int:
    return int(dt.datetime.fromisoformat(iso).timestamp() * 1000)


# (name, body, headers, status, error code, fragment of the JSON answer)
Case = tuple[str, Any, dict[str, str], int, str, str]


def oversized(limit: int) -> list[Case]:
    return [
        ("over the limit by Content-Length", b"x" * (limit + 1), JSON, 413, "payload_too_large", "over"),
        ("over the limit, chunked", "chunked", JSON, 413, "payload_too_large", "over"),
    ]


async def check(client: httpx.AsyncClient, path: str, cases: list[Case], limit: int = 0) -> None:
    """POST each case to ``path``; its exact status, error code and message fragment; never a hang."""
    async with asyncio.timeout(HANG_S):
        for name, body, headers, status, code, fragment in cases:
            content = chunked(limit + 1) if body == "chunked" else body
            r = await client.post(path, content=content, headers=headers)
            assert r.status_code == status, (path, name, r.status_code, r.text[:300])
            assert error_of(r)["code"] == code, (path, name, r.text[:300])
            assert fragment in r.text, (path, name, fragment, r.text[:300])
        assert (await client.get("/healthz")).status_code == 200  # still answering


def event(event_id: str, **fields: Any) -> dict[str, Any]:
    return {"event_id": event_id, "type": "view", "user_id": "bad-input", **fields}


def raw_event(event_id: str, props: bytes) -> bytes:
    return b'{"event_id": "%s", "type": "purchase", "user_id": "bad-input", "properties": %s}' % (
        event_id.encode(),
        props,
    )


async def test_ingest_refuses_bad_events_with_4xx_and_publishes_none_of_them(settings: Settings) -> None:
    limit = settings.max_body_bytes
    future = now_ms() + 10 * 60_000
    cases: list[Case] = [
        *oversized(limit),
        ("100,000 nested arrays", DEEP_ARRAY, JSON, 400, "bad_request", "not valid JSON"),
        ("100,000 nested objects", DEEP_OBJECT, JSON, 400, "bad_request", "not valid JSON"),
        ("20,000 unknown keys", MANY_KEYS, JSON, 422, "invalid", "the first 100 listed"),
        ("a 5 MiB type", orjson.dumps(event("e", type="v" * 5 * MiB)), JSON, 422, "invalid", "at most 128"),
        ("invalid UTF-8", BAD_UTF8, JSON, 400, "bad_request", "not valid JSON"),
        ("not JSON", b"hello", JSON, 400, "bad_request", "not valid JSON"),
        ("empty body", b"", JSON, 400, "bad_request", "empty"),
        ("not JSON, text/plain", b"type=view", TEXT, 400, "bad_request", "not valid JSON"),
        ("NaN property", raw_event("e", b'{"amount": NaN}'), JSON, 400, "bad_request", "not valid JSON"),
        ("Infinity property", raw_event("e", b'{"amount": Infinity}'), JSON, 400, "bad_request", "not valid JSON"),
        ("-Infinity property", raw_event("e", b'{"amount": -Infinity}'), JSON, 400, "bad_request", "not valid JSON"),
        ("1e400 property", raw_event("e", b'{"amount": 1e400}'), JSON, 400, "bad_request", "not valid JSON"),
        ("10^400 property", raw_event("e", b'{"amount": %s}' % HUGE_INT), JSON, 400, "bad_request", "not valid JSON"),
        ("2^63 property", raw_event("e", b'{"amount": 9223372036854775808}'), JSON, 422, "invalid",
         "does not fit in 64 bits"),
        ("type is a number", orjson.dumps(event("e", type=5)), JSON, 422, "invalid", '"field":"type"'),
        ("properties is an array", orjson.dumps(event("e", properties=[1])), JSON, 422, "invalid",
         '"field":"properties"'),
        ("a property is an object", orjson.dumps(event("e", properties={"a": {"b": 1}})), JSON, 422, "invalid",
         '"field":"properties.a'),
        ("user_id is a number", orjson.dumps(event("e", user_id=5)), JSON, 422, "invalid", '"field":"user_id"'),
        ("ts is a boolean", orjson.dumps(event("e", ts=True)), JSON, 422, "invalid", '"field":"ts"'),
        ("ts is a number as a string", orjson.dumps(event("e", ts=str(now_ms()))), JSON, 422, "invalid",
         "RFC 3339"),
        ("ts past int64", b'{"type": "view", "ts": 1%s}' % (b"0" * 30), JSON, 422, "invalid", "in range"),
        ("ts without offset", orjson.dumps(event("e", ts="2026-01-01T00:00:00")), JSON, 422, "invalid",
         "UTC offset"),
        ("ts offset +25:00", orjson.dumps(event("e", ts="2026-01-01T00:00:00+25:00")), JSON, 422, "invalid",
         "RFC 3339"),
        ("ts 10 minutes ahead", orjson.dumps(event("e", ts=future)), JSON, 422, "invalid",
         '"index":0,"field":"ts","message":"ts is more than 300 s in the future"'),
        ("ts 10 minutes ahead at index 1 of a batch",
         orjson.dumps({"events": [event("refused-batch-0"), event("refused-batch-1", ts=future)]}), JSON, 422,
         "invalid", '"details":[{"index":1,"field":"ts","message":"ts is more than 300 s in the future"}]'),
        ("an array", b"[1, 2]", JSON, 422, "invalid", "event object"),
        ("events is an object", b'{"events": {}}', JSON, 422, "invalid", "must be a list"),
        ("a batch with another key", b'{"events": [], "x": 1}', JSON, 422, "invalid", "only the key"),
        ("10,001 events", orjson.dumps({"events": [event("n")] * 10_001}), JSON, 413, "payload_too_large",
         "at most 10000"),
    ]  # fmt: skip
    # accepted, and published with ts normalised to epoch ms: far past, negative epoch, odd but valid offsets
    accepted: dict[str, tuple[Any, int | None]] = {
        "acc-negative-epoch": (-5, -5),
        "acc-year-1": ("0001-01-01T00:00:00Z", epoch_ms("0001-01-01T00:00:00+00:00")),
        "acc-plus-14": ("2026-01-01T00:00:00+14:00", epoch_ms("2025-12-31T10:00:00+00:00")),
        "acc-minus-0030": ("2026-01-01T00:00:00-00:30", epoch_ms("2026-01-01T00:30:00+00:00")),
        "acc-space": ("2026-01-01 00:00:00Z", epoch_ms("2026-01-01T00:00:00+00:00")),
        "acc-4-min-ahead": (future - 6 * 60_000, future - 6 * 60_000),
        "acc-text-plain": (None, None),  # a JSON body is read as JSON whatever its Content-Type
    }
    # ingest under uvicorn on a real socket: the oversized and chunked bodies go through real HTTP framing
    port = free_port()
    async with served(create_ingest(settings), port) as url, httpx.AsyncClient(base_url=url, timeout=HANG_S) as ingest:
        await check(ingest, "/v1/events", cases, limit)
        for event_id, (ts, _) in accepted.items():
            body = orjson.dumps(event(event_id) if ts is None else event(event_id, ts=ts))
            r = await ingest.post("/v1/events", content=body, headers=TEXT if ts is None else JSON)
            assert r.status_code == 202 and r.json() == {"accepted": 1}, (event_id, r.text)
    published = {(v := orjson.loads(r.value))["event_id"]: v["ts"] for r in await read_all(settings, "events", 7)}
    assert set(published) == set(accepted)  # nothing of any refused body, batch or event
    for event_id, (_, ts) in accepted.items():
        if ts is not None:
            assert published[event_id] == ts, event_id


def predict(**fields: Any) -> bytes:
    return orjson.dumps({"entities": {"user_id": "u1", "item_id": "t1"}, **fields})


def raw_features(value: bytes) -> bytes:
    return b'{"entities": {"user_id": "u1"}, "features": {"user_clicks_5m": %s}}' % value


async def test_serving_refuses_bad_requests_with_4xx_and_logs_no_prediction_for_them(ctr_live: Settings) -> None:
    settings = ctr_live
    limit = settings.max_body_bytes
    predict_cases: list[Case] = [
        *oversized(limit),
        ("100,000 nested arrays", DEEP_ARRAY, JSON, 422, "invalid", "recursion limit"),
        ("100,000 nested objects", DEEP_OBJECT, JSON, 422, "invalid", "recursion limit"),
        ("20,000 unknown keys", MANY_KEYS, JSON, 422, "invalid", "Extra inputs are not permitted"),
        ("invalid UTF-8", BAD_UTF8, JSON, 422, "invalid", "Invalid JSON"),
        ("not JSON", b"hello", JSON, 422, "invalid", "Invalid JSON"),
        ("empty body", b"", JSON, 422, "invalid", "Invalid JSON"),
        ("not JSON, text/plain", b"model=ctr", TEXT, 422, "invalid", "Invalid JSON"),
        ("NaN feature", raw_features(b"NaN"), JSON, 422, "invalid", "must be a finite number or null"),
        ("Infinity feature", raw_features(b"Infinity"), JSON, 422, "invalid", "must be a finite number or null"),
        ("-Infinity feature", raw_features(b"-Infinity"), JSON, 422, "invalid", "must be a finite number or null"),
        ("1e400 feature", raw_features(b"1e400"), JSON, 422, "invalid", "must be a finite number or null"),
        ("a feature as a string", raw_features(b'"3"'), JSON, 422, "invalid", "features.user_clicks_5m"),
        ("a feature as a boolean", raw_features(b"true"), JSON, 422, "invalid", "features.user_clicks_5m"),
        ("features is an array", predict(features=[1.0]), JSON, 422, "invalid", '"field":"features"'),
        ("entities is an array", predict(entities=["u1"]), JSON, 422, "invalid", '"field":"entities"'),
        ("an entity as a boolean", predict(entities={"user_id": True}), JSON, 422, "invalid", "entities.user_id"),
        ("a 257-character entity id", predict(entities={"user_id": "u" * 257}), JSON, 422, "invalid",
         "at most 256 characters"),
        ("a 65-character entity name", predict(entities={"e" * 65: "u1"}), JSON, 422, "invalid",
         "at most 64 characters"),
        ("an entity id past int64", b'{"entities": {"user_id": 1%s}}' % (b"0" * 5000), JSON, 422, "invalid",
         "Invalid JSON"),
        ("model is a number", predict(model=5), JSON, 422, "invalid", '"field":"model"'),
        ("a 5 MiB model name", predict(model="m" * 5 * MiB), JSON, 422, "invalid", "at most 64 characters"),
        ("an unknown key", predict(explain=True), JSON, 422, "invalid", "Extra inputs are not permitted"),
        ("an unknown model", predict(model="nope"), JSON, 404, "not_found", "unknown model 'nope'"),
    ]  # fmt: skip
    recommend_cases: list[Case] = [
        ("an unknown model", b'{"model": "nope", "user_id": "u1", "candidates": ["t1"]}', JSON, 404, "not_found",
         "unknown model 'nope'"),
        ("no candidates", b'{"user_id": "u1", "candidates": []}', JSON, 422, "invalid", '"field":"candidates"'),
        ("k = 0", b'{"user_id": "u1", "candidates": ["t1"], "k": 0}', JSON, 422, "invalid", '"field":"k"'),
        ("a candidate as a number", b'{"user_id": "u1", "candidates": [1]}', JSON, 422, "invalid", "candidates.0"),
        ("candidates is a string", b'{"user_id": "u1", "candidates": "t1"}', JSON, 422, "invalid",
         '"field":"candidates"'),
        ("100,000 nested arrays", DEEP_ARRAY, JSON, 422, "invalid", "recursion limit"),
    ]  # fmt: skip
    promote_cases: list[Case] = [
        ("an unknown model", b'{"version": "1"}', JSON, 404, "not_found", "unknown model 'nope'"),
    ]
    ctr_promote_cases: list[Case] = [
        ("an unknown version", b'{"version": "999"}', JSON, 404, "not_found", "model 'ctr' has no version '999'"),
        ("version is a boolean", b'{"version": true}', JSON, 422, "invalid", '"field":"version'),
        ("empty body", b"", JSON, 422, "invalid", "Field required"),
        ("not JSON", b"v2", JSON, 422, "invalid", "JSON decode error"),
        ("100,000 nested arrays", DEEP_ARRAY, JSON, 400, "http_error", "error parsing the body"),
        ("over the limit by Content-Length", b"x" * (limit + 1), JSON, 413, "payload_too_large", "over"),
    ]
    port = free_port()  # under uvicorn on a real socket, as for ingest
    async with served(create_serving(settings), port) as url, httpx.AsyncClient(base_url=url, timeout=HANG_S) as client:
        await check(client, "/v1/predict", predict_cases, limit)
        await check(client, "/v1/recommend", recommend_cases, limit)
        await check(client, "/v1/models/nope/promote", promote_cases)
        await check(client, "/v1/models/nope/rollout", [(*promote_cases[0][:5], "unknown model 'nope'")])
        await check(client, "/v1/models/nope/rollback", [("unknown model", b"", {}, 404, "not_found", "unknown model")])
        await check(client, "/v1/models/ctr/promote", ctr_promote_cases)
        r = await client.get("/v1/models/nope/rollout")
        assert r.status_code == 404 and "unknown model 'nope'" in error_of(r)["message"]
        # accepted: a JSON body whatever its Content-Type; a feature past float32 range never reaches the
        # model as an infinity (it is ignored until finding F3 makes it a 422: never a 500, never a NaN score)
        r = await client.post("/v1/predict", content=predict(), headers=TEXT)
        assert r.status_code == 200 and r.json()["version"] == "1", r.text
        baseline = r.json()["score"]
        r = await client.post("/v1/predict", content=raw_features(b"1e39"), headers=JSON)
        assert r.status_code in (200, 422), r.text
        logged = 1 + (r.status_code == 200)
    records = [orjson.loads(r.value) for r in await read_all(settings, "predictions", logged)]
    assert len(records) == logged  # nothing logged for a refused request
    assert records[0]["score"] == baseline
    for rec in records:
        assert all(v is None or abs(v) < 3.5e38 for v in rec["features"].values()), rec
        assert 0.0 <= rec["score"] <= 1.0, rec


async def test_model_uploads_that_are_not_models_are_refused_and_the_live_version_keeps_serving(
    ctr_live: Settings,
) -> None:
    ctr, fraud = trained("ctr", 0), trained("fraud", 0)  # fraud: 4 inputs, not ctr's 3
    path = "/v1/models/ctr/versions"
    meta2 = {"metadata": orjson.dumps({"features": ["user_clicks_5m", "item_ctr_1h"]}).decode()}
    bad: list[tuple[str, str, bytes, dict[str, str], int, str, str]] = [
        ("over the registry cap", path, b"\0" * (MAX_MODEL_BYTES + 1), {}, 413, "payload_too_large", "over"),
        ("an empty file", path, b"", {}, 422, "invalid", "empty model"),
        ("random bytes", path, bytes(range(256)) * 64, {}, 422, "invalid", "not a loadable ONNX model"),
        ("a truncated model", path, ctr.onnx_bytes[: len(ctr.onnx_bytes) // 2], {}, 422, "invalid",
         "not a loadable ONNX model"),
        ("a pickle", path, pickle.dumps({"model": [1, 2, 3]}), {}, 422, "invalid", "not a loadable ONNX model"),
        ("4 inputs for 3 features", path, fraud.onnx_bytes, {}, 422, "invalid", "does not match 3 features"),
        ("3 inputs for 2 features", path, ctr.onnx_bytes, meta2, 422, "invalid", "does not match 2 features"),
        ("NaN in the metadata", path, ctr.onnx_bytes, {"metadata": '{"defaults": {"item_ctr_1h": NaN}}'}, 422,
         "invalid", "metadata must be a JSON object"),
        ("a default of no feature", path, ctr.onnx_bytes, {"metadata": '{"defaults": {"nope": 1}}'}, 422,
         "invalid", "metadata.defaults.nope"),
        ("an invalid model name", "/v1/models/bad%20name/versions", ctr.onnx_bytes, {}, 422, "invalid",
         "path.name"),
    ]  # fmt: skip
    body = {"entities": {"user_id": "u1", "item_id": "t1"}}
    async with running(create_serving(ctr_live)) as client:
        async with asyncio.timeout(HANG_S):
            for name, url, content, params, status, code, fragment in bad:
                r = await client.post(url, content=content, params=params)
                assert r.status_code == status, (name, r.text[:300])
                assert error_of(r)["code"] == code and fragment in r.text, (name, r.text[:300])
                predicted = await client.post("/v1/predict", json=body)
                assert predicted.status_code == 200 and predicted.json()["version"] == "1", (name, predicted.text)
        [model] = [m for m in (await client.get("/v1/models")).json()["models"] if m["name"] == "ctr"]
        assert model["live_version"] == "1" and [v["version"] for v in model["versions"]] == ["1"]
        # a refused upload used no version number: the next good one is 2, and 1 stays live until promoted
        r = await client.post(path, content=ctr.onnx_bytes)
        assert r.status_code == 201 and r.json() == {"model": "ctr", "version": "2", "live": False}, r.text
        assert (await client.post("/v1/predict", json=body)).json()["version"] == "1"


async def test_features_reads_refuse_bad_requests_with_4xx(settings: Settings) -> None:
    limit = settings.max_body_bytes
    cases: list[Case] = [
        *oversized(limit),
        ("100,000 nested arrays", DEEP_ARRAY, JSON, 400, "http_error", "error parsing the body"),
        ("20,000 unknown keys", MANY_KEYS, JSON, 422, "invalid", '"field":"entity"'),
        ("invalid UTF-8", BAD_UTF8, JSON, 400, "http_error", "error parsing the body"),
        ("not JSON", b"hello", JSON, 422, "invalid", "JSON decode error"),
        ("empty body", b"", JSON, 422, "invalid", "Field required"),
        ("JSON, text/plain", b'{"entity": "user", "ids": ["u1"]}', TEXT, 422, "invalid", "valid dictionary"),
        ("an unknown entity", b'{"entity": "planet", "ids": ["p1"]}', JSON, 404, "not_found",
         "unknown entity 'planet'"),
        ("an unknown feature", b'{"entity": "user", "ids": ["u1"], "features": ["nope"]}', JSON, 422, "invalid",
         "unknown feature(s) of entity 'user': nope"),
        ("ids is a string", b'{"entity": "user", "ids": "u1"}', JSON, 422, "invalid", '"field":"ids"'),
        ("an id as a number", b'{"entity": "user", "ids": [1]}', JSON, 422, "invalid", '"field":"ids.0"'),
        ("no ids", b'{"entity": "user", "ids": []}', JSON, 422, "invalid", '"field":"ids"'),
        ("a 5 MiB id", orjson.dumps({"entity": "user", "ids": ["u" * 5 * MiB]}), JSON, 422, "invalid",
         "at most 1024 characters"),
        ("as_of NaN", b'{"entity": "user", "ids": ["u1"], "as_of": NaN}', JSON, 422, "invalid", '"field":"as_of"'),
        ("as_of 1e400", b'{"entity": "user", "ids": ["u1"], "as_of": 1e400}', JSON, 422, "invalid",
         '"field":"as_of"'),
    ]  # fmt: skip
    async with running(create_features(settings)) as client:
        await check(client, "/v1/features:batch", cases, limit)
        r = await client.get("/v1/features/planet/p1")
        assert r.status_code == 404 and error_of(r) == {"code": "not_found", "message": "unknown entity 'planet'"}
        r = await client.get("/v1/features/user/u1", params={"features": "nope"})
        assert r.status_code == 422 and "unknown feature(s) of entity 'user': nope" in error_of(r)["message"]


def outcome(**fields: Any) -> bytes:
    return orjson.dumps({"prediction_id": "p-bad", "label": 1, **fields})


def raw_label(value: bytes) -> bytes:
    return b'{"prediction_id": "p-bad", "label": %s}' % value


async def test_feedback_refuses_bad_outcomes_with_4xx_and_publishes_none_of_them(settings: Settings) -> None:
    limit = settings.max_body_bytes
    finite = "label must be a finite number"
    cases: list[Case] = [
        *oversized(limit),
        ("100,000 nested arrays", DEEP_ARRAY, JSON, 400, "http_error", "error parsing the body"),
        ("20,000 unknown keys", MANY_KEYS, JSON, 422, "invalid", '"field":"prediction_id"'),
        ("invalid UTF-8", BAD_UTF8, JSON, 400, "http_error", "error parsing the body"),
        ("not JSON", b"hello", JSON, 422, "invalid", "JSON decode error"),
        ("empty body", b"", JSON, 422, "invalid", "Field required"),
        ("JSON, text/plain", outcome(), TEXT, 422, "invalid", "valid dictionary"),
        ("label NaN", raw_label(b"NaN"), JSON, 422, "invalid", finite),
        ("label Infinity", raw_label(b"Infinity"), JSON, 422, "invalid", finite),
        ("label -Infinity", raw_label(b"-Infinity"), JSON, 422, "invalid", finite),
        ("label 1e400", raw_label(b"1e400"), JSON, 422, "invalid", finite),
        ("label 10^400", raw_label(HUGE_INT), JSON, 422, "invalid", finite),
        ("label as a string", outcome(label="1"), JSON, 422, "invalid", '"field":"label'),
        ("label as an array", outcome(label=[1]), JSON, 422, "invalid", '"field":"label'),
        ("prediction_id as a number", outcome(prediction_id=5), JSON, 422, "invalid", '"field":"prediction_id"'),
        ("a 5 MiB prediction_id", outcome(prediction_id="p" * 5 * MiB), JSON, 422, "invalid", "at most 256"),
        ("ts 10 minutes ahead", outcome(ts=now_ms() + 600_000), JSON, 422, "invalid",
         '{"field":"ts","message":"ts is more than 300 s in the future"}'),
        ("ts offset +25:00", outcome(ts="2026-01-01T00:00:00+25:00"), JSON, 422, "invalid", '"field":"ts"'),
        ("an unknown key", outcome(score=0.5), JSON, 422, "invalid", '"field":"score"'),
    ]  # fmt: skip
    async with running(create_feedback(settings)) as client:
        await check(client, "/v1/outcomes", cases, limit)
        for pid, ts in (("acc-negative-epoch", -1), ("acc-plus-14", "2026-01-01T00:00:00+14:00")):
            r = await client.post("/v1/outcomes", content=outcome(prediction_id=pid, ts=ts), headers=JSON)
            assert r.status_code == 202, r.text
    published = {
        (v := orjson.loads(r.value))["prediction_id"]: v["ts"] for r in await read_all(settings, "outcomes", 2)
    }
    assert published == {"acc-negative-epoch": -1, "acc-plus-14": epoch_ms("2025-12-31T10:00:00+00:00")}


# -- numbers predict/recommend cannot use, bounded 422s, unknown models on the quality routes ---------------------
async def test_predict_and_recommend_refuse_numbers_they_cannot_use_in_bounded_answers(ctr_live: Settings) -> None:
    async with running(create_serving(ctr_live)) as client:
        # 20,000 unknown keys (250 KB): the 422 lists the first 100 problems and says how many there are (listing
        # each of them made a 1.4 MB answer; a 10 MiB body of short keys would have got ~50 MB back)
        r = await client.post("/v1/predict", content=MANY_KEYS, headers=JSON)
        assert r.status_code == 422 and len(error_of(r)["details"]) <= 100, len(r.content)
        # k from a string, a boolean or a fraction is refused, like every other number of the API (1.0 is an
        # integer to JSON Schema, so the published schema accepts it, and so does recommend)
        for k in (b'"3"', b"true", b"1.5"):
            r = await client.post("/v1/recommend", content=b'{"user_id": "u", "candidates": ["a"], "k": %s}' % k)
            assert r.status_code == 422 and '"field":"k"' in r.text, (k, r.text)
        # a feature past float32 range (the models' input) is the caller's mistake, not silently replaced
        for value in (b"1e39", b"-1e39", HUGE_INT):
            r = await client.post("/v1/predict", content=raw_features(value), headers=JSON)
            assert r.status_code == 422 and "features" in r.text, (value, r.text)


async def test_quality_of_an_unknown_model_is_404(settings: Settings) -> None:
    async with running(create_feedback(settings)) as client:
        for route in ("quality", "decisions"):
            r = await client.get(f"/v1/models/nope/{route}")
            assert r.status_code == 404 and "unknown model 'nope'" in error_of(r)["message"], (route, r.text)
            # a configured model with no label and no decision yet is not unknown: an empty answer
            r = await client.get(f"/v1/models/ctr/{route}")
            assert r.status_code == 200, (route, r.text)
