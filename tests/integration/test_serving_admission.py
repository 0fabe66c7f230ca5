"""Serving under a slow store and under overload, on the real redis-server and broker.

Redis is made slow for real: a Lua script that spins for a while blocks the (single-threaded) server, so
every read queued behind it waits. The tests assert what the answers were and WHEN they came relative to
that stall (before it ended, or not), never absolute speeds.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from rtml.core.errors import Overloaded
from rtml.core.redis import connect
from rtml.core.settings import Settings
from rtml.serving.app import create_app
from tests.helpers import error_of, eventually, loop_held_up, metric_value, running, until
from tests.integration.test_serving import expected_score, register

pytestmark = pytest.mark.integration

SPIN = """
local t = redis.call('TIME')
local start = t[1] * 1000 + math.floor(t[2] / 1000)
while true do
  t = redis.call('TIME')
  if t[1] * 1000 + math.floor(t[2] / 1000) - start >= tonumber(ARGV[1]) then break end
end
return 1
"""


ROUTES = ("/v1/predict", "/v1/recommend")


def shed(text: str, route: str) -> float:
    return metric_value(text, "rtml_serving_shed_total", route=route)


async def stall_redis(settings: Settings, ms: int) -> float:
    """Block redis-server for ``ms``; returns the loop time at which it is free again."""
    redis = connect(settings)
    try:
        await redis.eval(SPIN, 0, ms)  # type: ignore[misc]
    finally:
        await redis.aclose()
    return asyncio.get_running_loop().time()


async def test_a_read_slower_than_the_deadline_answers_degraded_before_redis_is_back(settings: Settings) -> None:
    s = settings.model_copy(update={"predict_timeout_ms": 40, "model_poll_interval_s": 3600.0})
    await register(s)
    payload = {"entities": {"user_id": "slow", "item_id": "t1"}}
    async with running(create_app(s)) as client:
        # a generous budget here: on a loaded machine this first request alone may take longer than 40 ms
        ok = await client.post("/v1/predict", json=payload, headers={"X-Request-Timeout-Ms": "5000"})
        assert ok.status_code == 200 and ok.json()["degraded"] is False

        stall = asyncio.create_task(stall_redis(s, 1500))  # long: the two answers must come before its end
        await asyncio.sleep(0.05)  # the script is running: Redis answers nobody until it ends
        r = await client.post("/v1/predict", json=payload)  # default budget: 40 ms
        answered = asyncio.get_running_loop().time()
        r2 = await client.post("/v1/predict", json=payload, headers={"X-Request-Timeout-Ms": "20"})
        answered2 = asyncio.get_running_loop().time()
        free_at = await stall
        assert r.status_code == 200 and r.json()["degraded"] is True
        assert r.json()["score"] == pytest.approx(expected_score([0.0, 0.0, 0.0]), abs=1e-6)  # the defaults
        assert r2.status_code == 200 and r2.json()["degraded"] is True
        assert answered < free_at and answered2 < free_at  # neither waited for Redis

        # a budget long enough to outlast the stall: the read completes, not degraded
        stall = asyncio.create_task(stall_redis(s, 300))
        await asyncio.sleep(0.05)
        r3 = await client.post("/v1/predict", json=payload, headers={"X-Request-Timeout-Ms": "5000"})
        await stall
        assert r3.status_code == 200 and r3.json()["degraded"] is False

        metrics = (await client.get("/metrics")).text
        assert 'rtml_serving_deadline_exceeded_total{model="ctr"} 2.0' in metrics

        for bad in ("0", "abc", "60001"):
            resp = await client.post("/v1/predict", json=payload, headers={"X-Request-Timeout-Ms": bad})
            assert resp.status_code == 400 and "X-Request-Timeout-Ms" in error_of(resp)["message"]


async def test_past_the_in_flight_limit_requests_are_refused_at_once(settings: Settings) -> None:
    s = settings.model_copy(update={"predict_max_in_flight": 2, "model_poll_interval_s": 3600.0})
    await register(s)
    payload = {"entities": {"user_id": "busy", "item_id": "t1"}}
    slow = {"X-Request-Timeout-Ms": "10000"}  # these two wait for Redis, holding both slots
    async with running(create_app(s)) as client:
        before = shed((await client.get("/metrics")).text, "/v1/predict")  # other tests of this process count too
        stall = asyncio.create_task(stall_redis(s, 700))
        await asyncio.sleep(0.05)
        held = [asyncio.create_task(client.post("/v1/predict", json=payload, headers=slow)) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await client.post("/v1/predict", json=payload)
        refused_at = asyncio.get_running_loop().time()
        rec = await client.post("/v1/recommend", json={"user_id": "busy", "candidates": ["a"], "k": 1})
        free_at = await stall
        answers = await asyncio.gather(*held)

        assert refused.status_code == 503 and error_of(refused)["code"] == "overloaded"
        assert refused.headers["Retry-After"] == "1"
        assert rec.status_code == 503
        assert refused_at < free_at  # refused while the others were still waiting, not after
        assert [a.status_code for a in answers] == [200, 200]
        assert all(a.json()["degraded"] is False for a in answers)
        # capacity is back once they finished
        assert (await client.post("/v1/predict", json=payload)).status_code == 200
        assert shed((await client.get("/metrics")).text, "/v1/predict") == before + 1
        # health and metrics are never shed
        assert (await client.get("/healthz")).status_code == 200


async def test_the_early_refusal_is_the_fast_paths_decision_counted_the_same_way(make_settings: Any) -> None:
    """What rtml serve's HTTP protocol asks before a request becomes a task (rtml.core.early): a 503 only for
    a full process and a caller with the right key (else the fast path answers, 401/403 included)."""
    s: Settings = make_settings(api_keys="pk:predict,ik:ingest", predict_max_in_flight=2)
    app = create_app(s)
    good = [(b"authorization", b"Bearer pk")]
    async with running(app) as client:
        text = (await client.get("/metrics")).text
        before = {r: shed(text, r) for r in ROUTES}
        answered_503 = metric_value(text, "rtml_http_requests_total", service="serving", route="/v1/recommend",
                                    method="POST", status="503")  # fmt: skip
        assert app.fast is not None
        assert app.early_refusal(b"POST", b"/v1/predict", good) is None  # room: admitted
        app.fast.in_flight = 2  # as if two requests were waiting for Redis
        try:
            for route in ROUTES:
                refusal = app.early_refusal(b"POST", route.encode(), good)
                assert isinstance(refusal, Overloaded) and refusal.headers() == {"Retry-After": "1"}
            for method, path, headers in [
                (b"POST", b"/v1/predict", []),
                (b"POST", b"/v1/predict", [(b"authorization", b"Bearer ik")]),
                (b"GET", b"/v1/predict", good),
                (b"POST", b"/v1/models/ctr/promote", good),
            ]:
                assert app.early_refusal(method, path, headers) is None
            assert (
                await client.post("/v1/predict", json={}, headers={"Authorization": "Bearer ik"})
            ).status_code == 403
            # two keys: both paths read the first (here the good one), so both refuse for load alike
            two = [(b"authorization", b"Bearer pk"), (b"authorization", b"Bearer ik")]
            assert isinstance(app.early_refusal(b"POST", b"/v1/predict", two), Overloaded)
            both = [("Authorization", "Bearer pk"), ("Authorization", "Bearer ik")]
            assert (await client.post("/v1/predict", json={}, headers=both)).status_code == 503
        finally:
            app.fast.in_flight = 0
        text = (await client.get("/metrics")).text
        assert {r: shed(text, r) for r in ROUTES} == {"/v1/predict": before["/v1/predict"] + 3,
                                                      "/v1/recommend": before["/v1/recommend"] + 1}  # fmt: skip
        assert metric_value(text, "rtml_http_requests_total", service="serving", route="/v1/recommend",
                            method="POST", status="503") == answered_503 + 1  # fmt: skip


async def test_a_promotion_is_picked_up_from_the_models_topic_without_polling(settings: Settings) -> None:
    """Polling is off (1 h): only the announcement on the models topic can move the replica."""
    s = settings.model_copy(update={"model_poll_interval_s": 3600.0})
    v1 = await register(s, seed=0)
    v2 = await register(s, seed=1, promote=False)
    payload: dict[str, Any] = {"entities": {"user_id": "u1"}, "features": {"user_clicks_5m": 3}}
    async with running(create_app(s)) as admin, running(create_app(s)) as replica:
        assert (await replica.post("/v1/predict", json=payload)).json()["version"] == v1
        resp = await admin.post("/v1/models/ctr/promote", json={"version": v2})
        assert resp.status_code == 200, resp.text

        async def serves_v2() -> None:
            assert (await replica.post("/v1/predict", json=payload)).json()["version"] == v2

        await eventually(serves_v2, timeout=15)  # (the group join on a fresh consumer takes a few seconds)


LONG_DEADLINE = {"X-Request-Timeout-Ms": "5000"}  # the feature read is not what these tests time


async def test_while_the_process_is_behind_on_its_own_cpu_work_it_takes_one_request_at_a_time(
    settings: Settings,
) -> None:
    # CPU-bound overload: the loop itself is behind (rtml.core.looplag), so its cap comes down to one request
    # in flight. The test spins the CPU in the app's own loop; the CPU share asked for is lowered so a busy
    # machine still counts.
    s = settings.model_copy(update={"max_loop_lag_ms": 5.0, "model_poll_interval_s": 3600.0})
    await register(s)
    payload = {"entities": {"user_id": "cpu", "item_id": "t1"}}
    recommend = {"user_id": "cpu", "candidates": ["a"], "k": 1}
    app = create_app(s)
    lag = app.state.loop_lag
    async with running(app) as client:
        assert (await client.post("/v1/predict", json=payload)).status_code == 200
        text = (await client.get("/metrics")).text
        before = [shed(text, r) for r in ROUTES]
        ticks_before = metric_value(text, "rtml_event_loop_lag_seconds_count")
        lag.min_busy = 0.2
        app.fast.in_flight += 1  # one request in flight (a caller's): the cap comes down to one at a time
        async with loop_held_up(lag):
            answers = [
                await client.post("/v1/predict", json=payload),
                await client.post("/v1/recommend", json=recommend),
            ]
            app.fast.in_flight -= 1  # that request answered: the next finds nothing in flight
            alone = await client.post("/v1/predict", json=payload, headers=LONG_DEADLINE)
        for refused in answers:
            assert refused.status_code == 503 and error_of(refused)["code"] == "overloaded"
            assert refused.headers["Retry-After"] == "1"
            assert "takes 1 request at a time" in error_of(refused)["message"]
        assert alone.status_code == 200  # a request with nothing else in flight is always taken

        lag.min_busy = math.inf  # from here on no late tick lowers the cap (a loaded machine makes some late)
        await until(lambda: lag.cap >= 3)  # caught up: the cap grows back, one per tick on time
        # started together: the first is in flight (awaiting Redis) when the others are admitted
        answers = await asyncio.gather(
            *(client.post("/v1/predict", json=payload, headers=LONG_DEADLINE) for _ in range(3))
        )
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert all(a.json()["degraded"] is False for a in answers)
        metrics = (await client.get("/metrics")).text
        assert [shed(metrics, r) for r in ROUTES] == [b + 1 for b in before]  # each refusal counted, once
        # every tick is observed, the late ones in the upper buckets (the app's detector ran in this loop)
        assert metric_value(metrics, "rtml_event_loop_lag_seconds_count") > ticks_before
        assert metric_value(metrics, "rtml_event_loop_lag_seconds_bucket", le="0.005") < metric_value(
            metrics, "rtml_event_loop_lag_seconds_count"
        )
