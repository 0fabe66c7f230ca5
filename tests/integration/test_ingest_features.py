"""HTTP events -> Kafka -> windowed features in Redis -> read API, on a real broker and redis-server."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from rtml.core import embedded
from rtml.core.settings import Settings
from rtml.features.app import create_app as create_features
from rtml.ingest.app import create_app as create_ingest
from tests.helpers import error_of, eventually, free_port, running

pytestmark = pytest.mark.integration


async def test_events_become_features_exactly_once(settings: Settings) -> None:
    now = int(time.time() * 1000)
    events: list[dict[str, Any]] = [
        {"event_id": "a1", "type": "click", "user_id": "u1", "item_id": "t9", "ts": now - 1000},
        {"event_id": "a2", "type": "view", "user_id": "u1", "item_id": "t9"},
        {"event_id": "a3", "type": "view", "user_id": "u2", "item_id": "t9", "ts": "2020-01-01T00:00:00Z"},
        {"event_id": "a4", "type": "click", "user_id": "u1", "item_id": "t8", "ts": now},
        {"type": "view", "user_id": "u1", "item_id": "t9"},  # event_id generated
    ]
    async with running(create_ingest(settings)) as ingest, running(create_features(settings)) as features:
        r = await ingest.post("/v1/events", json={"events": events})
        assert r.status_code == 202, r.text
        assert r.json() == {"accepted": 5}
        r = await ingest.post("/v1/events", json=events[0])  # duplicate event_id: counts once
        assert r.status_code == 202

        async def user_seen() -> dict[str, Any]:
            resp = await features.get("/v1/features/user/u1")
            assert resp.status_code == 200
            body: dict[str, Any] = resp.json()
            assert body["features"]["user_views_total"] == 2
            return body

        body = await eventually(user_seen)
        f = body["features"]
        assert body["entity"] == "user" and body["id"] == "u1" and abs(body["as_of"] - now) < 60_000
        assert body["updated_at"] is not None and 0 <= body["age_ms"] < 60_000
        assert f["user_clicks_5m"] == 2  # a1 + a4, the duplicate of a1 not counted
        assert f["user_items_24h"] == 2  # t9, t8
        assert f["user_events_1m"] == 4

        async def item_seen() -> None:
            resp = await features.get("/v1/features/item/t9")
            # a3 is years late: outside every finite window, so only a1 (click) and a2 + generated (views)
            assert resp.json()["features"]["item_ctr_1h"] == pytest.approx(0.5)

        await eventually(item_seen)

        r = await features.get("/v1/features/user_item/u1%7Ct9", params={"features": "user_item_clicks_24h"})
        assert r.json()["features"] == {"user_item_clicks_24h": 1}
        r = await features.post("/v1/features:batch", json={"entity": "user", "ids": ["u1", "u2", "nobody"],
                                                            "features": ["user_views_total"]})  # fmt: skip
        # u2's only view is from 2020: too late for every window, but a lifetime feature counts it
        assert [row["features"]["user_views_total"] for row in r.json()] == [2, 1, 0]
        r = await features.get("/v1/features/planet/p1")
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"
        r = await features.get("/v1/features/user/u1", params={"features": "nope"})
        assert r.status_code == 422


async def test_bad_batch_is_rejected_whole_with_each_bad_index_named(settings: Settings) -> None:
    future = int(time.time() * 1000) + 3_600_000
    batch = {
        "events": [
            {"type": "view", "user_id": "ok"},
            {"user_id": "u1"},  # no type
            {"type": "click", "ts": future},  # too far in the future
            {"type": "buy", "properties": {"amount": [1, 2]}},  # not a scalar
            {"type": "view", "ts": "yesterday"},
        ]
    }
    async with running(create_ingest(settings)) as ingest, running(create_features(settings)) as features:
        r = await ingest.post("/v1/events", json=batch)
        assert r.status_code == 422
        details = error_of(r)["details"]
        assert {(d["index"], d["field"].split(".")[0]) for d in details} == {
            (1, "type"),
            (2, "ts"),
            (3, "properties"),
            (4, "ts"),
        }
        r = await ingest.post("/v1/events", content=b'{"type": "view", ')
        assert r.status_code == 400 and error_of(r)["code"] == "bad_request"
        r = await ingest.post("/v1/events", json={"events": [{"type": "v"}] * 10_001})
        assert r.status_code == 413
        r = await ingest.post("/v1/events", json=[1, 2])
        assert r.status_code == 422
        # the valid event of the rejected batch was not published: a marker event sent after it is
        # applied while "ok" never shows up
        r = await ingest.post("/v1/events", json={"type": "view", "user_id": "marker"})
        assert r.status_code == 202

        async def marker_seen() -> None:
            resp = await features.get("/v1/features/user/marker", params={"features": "user_views_total"})
            assert resp.json()["features"]["user_views_total"] == 1

        await eventually(marker_seen)
        r = await features.get("/v1/features/user/ok", params={"features": "user_views_total"})
        assert r.json()["features"]["user_views_total"] == 0


async def test_ingest_answers_503_with_retry_after_when_the_broker_stops(make_settings: Any) -> None:
    broker = embedded.start_broker(free_port())
    try:
        settings: Settings = make_settings(
            kafka={"bootstrap": f"127.0.0.1:{broker.port}", "publish_timeout_s": 1.0, "request_timeout_ms": 2000}
        )
        async with running(create_ingest(settings)) as ingest:
            r = await ingest.post("/v1/events", json={"type": "view", "user_id": "u1"})
            assert r.status_code == 202
            os.kill(broker.proc.pid, signal.SIGSTOP)
            try:
                r = await ingest.post("/v1/events", json={"type": "view", "user_id": "u1"})
                assert r.status_code == 503
                assert r.headers["retry-after"] == "1"
                assert error_of(r)["code"] == "unavailable"
                r = await ingest.get("/readyz")
                assert r.status_code == 503 and "kafka" in r.json()["failed"]
            finally:
                os.kill(broker.proc.pid, signal.SIGCONT)
            assert (await ingest.get("/healthz")).status_code == 200
    finally:
        broker.stop()
