"""rtml.client against the real services: ingest, features, serving and feedback under uvicorn on free ports,
on the real broker and redis-server. Every test runs with the sync client (in a worker thread) and the async
one through the same body (:class:`tests.unit.test_client_core.Twin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rtml.client import (
    AsyncClient,
    Client,
    Forbidden,
    InvalidRequest,
    NotFound,
    Prediction,
    Unauthorized,
)
from rtml.core.config import load_config
from rtml.core.kafka import create_topics
from rtml.core.redis import Keys, connect
from rtml.core.settings import Settings
from rtml.features.app import create_app as create_features
from rtml.feedback.app import create_app as create_feedback
from rtml.ingest.app import create_app as create_ingest
from rtml.serving.app import create_app as create_serving
from rtml.serving.registry import ModelRegistry
from rtml.serving.train import DEMO_CONFIG, train_model
from tests.conftest import ROOT
from tests.helpers import eventually, free_port, served
from tests.unit.test_client_core import FakeTime, Twin

pytestmark = pytest.mark.integration

MARKERS = itertools.count(1)
CREATE = {"ingest": create_ingest, "features": create_features, "serving": create_serving, "feedback": create_feedback}


@dataclass
class Stack:
    settings: Settings
    urls: dict[str, str]
    version: str  # the live version of the demo model "ctr"


@contextlib.asynccontextmanager
async def stack(kafka_bootstrap: str, redis_url: str, tmp: Path, services: tuple[str, ...] = tuple(CREATE),
                **overrides: Any) -> AsyncIterator[Stack]:  # fmt: skip
    """The services on free ports with a private topic/key prefix and the demo model trained and live."""
    unique = uuid.uuid4().hex[:10]
    settings = Settings(
        kafka={"bootstrap": kafka_bootstrap, "partitions": 2}, redis={"url": redis_url, "key_prefix": f"t{unique}:"},
        topic_prefix=f"t{unique}.", config=ROOT / "services" / "rtml" / "demo" / "rtml.yaml",
        examples_dir=tmp / "examples", model_poll_interval_s=0.2, **overrides,
    )  # fmt: skip
    await create_topics(settings)
    redis = connect(settings)
    try:
        t = train_model(load_config(DEMO_CONFIG), "ctr", n_synthetic=2_000, seed=0)
        registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
        version = await registry.register("ctr", t.onnx_bytes, t.metadata)
        await registry.promote("ctr", version)
    finally:
        await redis.aclose()
    async with contextlib.AsyncExitStack() as running:
        urls = {f"{name}_url": await running.enter_async_context(served(CREATE[name](settings), free_port()))
                for name in services}  # fmt: skip
        yield Stack(settings, urls, version)


@pytest.fixture(scope="module")
async def platform(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    async with stack(kafka_bootstrap, redis_url, tmp_path_factory.mktemp("client")) as s:
        yield s


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class LoseFirstAck:
    """Forwards every request to the real service, but answers the first ``POST /v1/events`` with a 503 (and
    ``Retry-After: 1``) after ingest accepted it: the acknowledgement was lost on the way back, as when a
    load balancer times out. The client's retry then sends the very same events again."""

    def __init__(self) -> None:
        self.events_posts = 0

    def lose(self, request: httpx.Request) -> bool:
        if request.url.path != "/v1/events":
            return False
        self.events_posts += 1
        return self.events_posts == 1

    @staticmethod
    def lost(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "unavailable", "message": "upstream timed out"}}
        return httpx.Response(503, json=body, headers={"Retry-After": "1"}, request=request)


class SyncLoseFirstAck(LoseFirstAck, httpx.BaseTransport):
    def __init__(self) -> None:
        super().__init__()
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        if self.lose(request):
            resp.read()
            resp.close()
            assert resp.status_code == 202, resp.text
            return self.lost(request)
        return resp

    def close(self) -> None:
        self.inner.close()


class AsyncLoseFirstAck(LoseFirstAck, httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        super().__init__()
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self.inner.handle_async_request(request)
        if self.lose(request):
            await resp.aread()
            await resp.aclose()
            assert resp.status_code == 202, resp.text
            return self.lost(request)
        return resp

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.asynccontextmanager
async def client(kind: str, s: Stack, *, transport: Any = None, time: FakeTime | None = None,
                 **kw: Any) -> AsyncIterator[Twin]:  # fmt: skip
    fake = time or FakeTime()
    options: dict[str, Any] = {**s.urls, "transport": transport, "clock": fake.clock, **kw}
    if kind == "sync":
        c: Client | AsyncClient = Client(sleep=fake.sleep, **options)
    else:
        c = AsyncClient(sleep=fake.asleep, **options)
    try:
        yield Twin(c)
    finally:
        if isinstance(c, AsyncClient):
            await c.aclose()
        else:
            c.close()


def user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


async def features_of(c: Twin, entity: str, id: str, check: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    async def seen() -> dict[str, Any]:
        f = (await c.features(entity, id)).features
        check(f)
        return f

    return await eventually(seen, timeout=30)


async def after_marker(c: Twin, u: str) -> dict[str, Any]:
    """The user's features once everything sent for them so far is applied: a purchase marker is sent last
    (same user, same partition, applied in order), and read back when visible."""
    amount = next(MARKERS)  # greater than every earlier marker's: the max changes only once this one is applied
    await c.send_event("purchase", user_id=u, properties={"amount": amount})
    return await features_of(c, "user", u, lambda f: _eq(f["user_amount_max_24h"], amount))


async def test_events_count_exactly_once_although_the_first_ack_was_lost(kind: str, platform: Stack) -> None:
    u = user()
    transport = SyncLoseFirstAck() if kind == "sync" else AsyncLoseFirstAck()
    fake = FakeTime()
    events = [{"type": "click", "user_id": u, "item_id": f"t{i}"} for i in range(3)] + [
        {"type": "view", "user_id": u, "item_id": "t0"}
    ]
    async with client(kind, platform, transport=transport, time=fake) as c:
        got = await c.send_events(events)
        assert got.accepted == 4 and got.requests == 1 and len(set(got.event_ids)) == 4
        assert transport.events_posts == 2  # the lost answer, then the retry with the same event_ids
        assert len(fake.sleeps) == 1 and 1.0 <= fake.sleeps[0] <= 1.1  # Retry-After honoured

        eid = await c.send_event("view", user_id=u, item_id="t1", event_id=got.event_ids[3])  # a resend: no-op
        assert eid == got.event_ids[3]
        f = await after_marker(c, u)
        assert (f["user_views_total"], f["user_clicks_5m"], f["user_items_24h"]) == (1, 3, 3), f
        await c.send_event("view", user_id=u, item_id="t1")  # a new event: counts
        f = await after_marker(c, u)
        assert (f["user_views_total"], f["user_clicks_5m"]) == (2, 3), f


def _eq(a: Any, b: Any) -> None:
    assert a == b, (a, b)


async def test_more_than_10000_events_go_in_several_requests_and_a_bad_one_is_named(kind: str, platform: Stack) -> None:
    u = user()
    async with client(kind, platform) as c:
        got = await c.send_events([{"type": "view", "user_id": u} for _ in range(10_001)])
        assert got.accepted == 10_001 and got.requests == 2
        assert (await after_marker(c, u))["user_views_total"] == 10_001

    v = user()
    batch: list[dict[str, Any]] = [{"type": "view", "user_id": v} for _ in range(4)]
    batch.append({"user_id": v, "properties": {"amount": [1]}})  # no type, a list property
    async with client(kind, platform, max_batch_events=3) as c:
        with pytest.raises(InvalidRequest) as info:
            await c.send_events(batch)
        err = info.value
        assert err.status == 422 and err.code == "invalid" and err.accepted == 3
        assert {(e.index, e.field.split(".")[0]) for e in err.errors} == {(4, "type"), (4, "properties")}
        # the first request's three were published; the refused request's valid event (index 3) was not
        assert (await after_marker(c, v))["user_views_total"] == 3


async def test_predict_recommend_outcome_quality_and_models(kind: str, platform: Stack) -> None:
    u = user()
    async with client(kind, platform) as c:
        p = await c.predict({"user_id": u, "item_id": "t9"}, deadline_ms=500)
        assert isinstance(p, Prediction) and p.model == "ctr" and p.version == platform.version
        assert 0.0 <= p.score <= 1.0 and p.degraded is False and p.prediction_id
        over = await c.predict({"user_id": u, "item_id": "t9"}, features={"user_clicks_5m": 40})
        assert over.score != p.score  # the request's feature reached the model

        r = await c.recommend(u, ["a", "b", "c", "d"], k=2)
        assert len(r.items) == 2 and r.items[0].score >= r.items[1].score and r.version == platform.version
        assert {i.item_id for i in r.items} <= {"a", "b", "c", "d"}

        await c.send_outcome(p.prediction_id, 1, item_id="t9")

        async def labelled() -> None:
            q = await c.quality("ctr")
            mine = q.of(platform.version)
            assert q.model == "ctr" and mine is not None and mine.count >= 1 and mine.positive_rate is not None

        await eventually(labelled, timeout=30)

        models = await c.models()
        assert "ctr" in {m.name for m in models}
        ctr = await c.model("ctr")
        assert ctr.live_version == platform.version and ctr.version(platform.version).live  # type: ignore[union-attr]
        assert ctr.version(platform.version).features == ["user_clicks_5m", "item_ctr_1h", "user_items_24h"]  # type: ignore[union-attr]
        promoted = await c.promote("ctr", platform.version)  # already live: a no-op that says so
        assert (promoted.model, promoted.version, promoted.live) == ("ctr", platform.version, True)
        state = await c.rollout("ctr")
        assert state.model == "ctr" and state.rollout is None
        assert isinstance(await c.decisions("ctr", limit=5), list)


async def test_unknown_things_are_not_found(kind: str, platform: Stack) -> None:
    async with client(kind, platform) as c:
        with pytest.raises(NotFound) as info:
            await c.predict({"user_id": "u1"}, model="nope")
        assert info.value.status == 404 and info.value.code == "not_found" and "nope" in info.value.message
        with pytest.raises(NotFound):
            await c.model("nope")
        with pytest.raises(NotFound):
            await c.promote("ctr", "999")
        with pytest.raises(NotFound):
            await c.rollout("nope")
        with pytest.raises(InvalidRequest) as bad:
            await c.recommend("u1", [], k=1)  # no candidates
        assert bad.value.status == 422 and bad.value.errors[0].field == "candidates"


async def test_api_keys_unauthorized_and_forbidden(
    kind: str, kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    keys = "app:ingest+predict,dash:read"
    async with stack(kafka_bootstrap, redis_url, tmp_path, ("ingest", "serving"), api_keys=keys) as s:
        async with client(kind, s) as c:
            with pytest.raises(Unauthorized) as no_key:
                await c.predict({"user_id": "u1"})
            assert no_key.value.status == 401 and no_key.value.code == "unauthorized"
        async with client(kind, s, api_key="dash") as c:
            with pytest.raises(Forbidden) as wrong:
                await c.send_event("view", user_id="u1")
            assert wrong.value.status == 403 and "ingest" in wrong.value.message
            assert (await c.model("ctr")).live_version == s.version
        async with client(kind, s, api_key="app") as c:
            assert (await c.predict({"user_id": "u1"})).version == s.version
            await c.send_event("view", user_id="u1")
            with pytest.raises(Forbidden):
                await c.promote("ctr", s.version)  # admin only


async def test_background_batcher_delivers_every_event(kind: str, platform: Stack) -> None:
    u = user()
    events = [{"type": "click", "user_id": u, "item_id": f"t{i % 7}"} for i in range(250)]
    if kind == "sync":

        def run() -> list[str]:
            with Client(**platform.urls) as c, c.batcher(batch_size=100, max_queue=50, linger=0.05) as b:
                return [b.add(e) for e in events]

        ids = await asyncio.to_thread(run)
    else:
        async with AsyncClient(**platform.urls) as ac, ac.batcher(batch_size=100, max_queue=50, linger=0.05) as ab:
            ids = [await ab.add(e) for e in events]
    assert len(set(ids)) == 250
    async with client(kind, platform) as c:
        f = await after_marker(c, u)
        assert (f["user_clicks_5m"], f["user_items_24h"]) == (250, 7), f
