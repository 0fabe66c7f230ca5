"""Ingest admission in-process, on the real broker: a full process refuses with 503 before reading the body,
but never instead of the 401/403 a caller without the right key gets. (The same on real processes, with the
admitted requests held by a paused broker: tests/e2e/test_overload.py.)"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from rtml.core.errors import Overloaded
from rtml.core.kafka import create_topics
from rtml.core.settings import Settings
from rtml.ingest.app import create_app
from rtml.ingest.routes import Admission
from tests.helpers import error_of, loop_held_up, metric_value, running, until

pytestmark = pytest.mark.integration

KEYS = "ik:ingest,pk:predict"


def shed(text: str) -> float:
    return metric_value(text, "rtml_ingest_shed_total")


async def test_a_full_process_refuses_authorized_callers_with_503_and_others_with_401_403(make_settings: Any) -> None:
    s: Settings = make_settings(api_keys=KEYS, ingest_max_in_flight=2)
    await create_topics(s)
    app = create_app(s)
    event = {"type": "view", "user_id": "u1"}
    async with running(app) as client:
        ok = await client.post("/v1/events", json=event, headers={"Authorization": "Bearer ik"})
        assert ok.status_code == 202
        before = shed((await client.get("/metrics")).text)
        admission: Admission = app.state.admission
        admission.in_flight = admission.max_in_flight  # as if two requests were waiting for the broker
        try:
            full = await client.post("/v1/events", json=event, headers={"Authorization": "Bearer ik"})
            assert full.status_code == 503 and error_of(full)["code"] == "overloaded"
            assert full.headers["Retry-After"] == "1"
            assert (await client.post("/v1/events", json=event)).status_code == 401
            wrong = await client.post("/v1/events", json=event, headers={"Authorization": "Bearer pk"})
            assert wrong.status_code == 403
            assert (await client.get("/healthz")).status_code == 200  # health and metrics are never refused
            # what rtml serve's HTTP protocol asks first (rtml.core.early): the same decision, counted the same
            early = app.early_refusal(b"POST", b"/v1/events", [(b"authorization", b"Bearer ik")])
            assert isinstance(early, Overloaded) and early.status == 503
            for method, path, headers in [
                (b"POST", b"/v1/events", []),  # no key: the app answers 401
                (b"POST", b"/v1/events", [(b"authorization", b"Bearer pk")]),  # wrong scope: 403
                (b"GET", b"/v1/events", [(b"authorization", b"Bearer ik")]),
                (b"POST", b"/healthz", [(b"authorization", b"Bearer ik")]),
            ]:
                assert app.early_refusal(method, path, headers) is None
            text = (await client.get("/metrics")).text
            assert shed(text) == before + 2
            assert 'rtml_http_requests_total{method="POST",route="/v1/events",service="ingest",status="503"}' in text
        finally:
            admission.in_flight = 0
        assert app.early_refusal(b"POST", b"/v1/events", [(b"authorization", b"Bearer ik")]) is None
        again = await client.post("/v1/events", json=event, headers={"Authorization": "Bearer ik"})
        assert again.status_code == 202  # room again: admitted
        assert admission.in_flight == 0 and admission.pending_events == 0


async def test_while_the_process_is_behind_on_its_own_cpu_work_it_takes_one_request_at_a_time(
    make_settings: Any,
) -> None:
    # CPU-bound overload (rtml.core.looplag): the loop itself behind, so its cap comes down to one request in
    # flight; the CPU share asked for is lowered so a busy machine still counts
    s: Settings = make_settings(api_keys=KEYS, max_loop_lag_ms=5.0)
    await create_topics(s)
    app = create_app(s)
    lag = app.state.loop_lag
    event = {"type": "view", "user_id": "u-cpu"}
    auth = {"Authorization": "Bearer ik"}
    async with running(app) as client:
        assert (await client.post("/v1/events", json=event, headers=auth)).status_code == 202
        before = shed((await client.get("/metrics")).text)
        lag.min_busy = 0.2
        admission = app.state.admission
        admission.in_flight += 1  # one request in flight (a caller's): the cap comes down to one at a time
        async with loop_held_up(lag):
            refused = await client.post("/v1/events", json=event, headers=auth)
            unauthorized = await client.post("/v1/events", json=event)
            admission.in_flight -= 1  # that request answered: the next finds nothing in flight
            alone = await client.post("/v1/events", json=event, headers=auth)
        assert refused.status_code == 503 and error_of(refused)["code"] == "overloaded"
        assert "takes 1 request at a time" in error_of(refused)["message"] and refused.headers["Retry-After"] == "1"
        assert unauthorized.status_code == 401  # a caller without a key gets its 401, overloaded or not
        assert alone.status_code == 202  # a request with nothing else in flight is always taken

        lag.min_busy = math.inf  # from here on no late tick lowers the cap (a loaded machine makes some late)
        await until(lambda: lag.cap >= 3)  # caught up: the cap grows back, one per tick on time
        answers = await asyncio.gather(*(client.post("/v1/events", json=event, headers=auth) for _ in range(3)))
        assert [a.status_code for a in answers] == [202, 202, 202]
        assert shed((await client.get("/metrics")).text) == before + 1
        assert app.state.admission.in_flight == 0
