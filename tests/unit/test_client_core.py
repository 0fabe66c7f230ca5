"""rtml.client without services: batching, event ids, retries and their waits, error mapping, batchers.

The HTTP side is an ``httpx.MockTransport`` (pure logic); the clients are the real ones. Test bodies are shared
by the sync and async clients through :class:`Twin`; waits use an injected fake clock and sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from rtml.client import (
    NO_RETRY,
    AsyncClient,
    BatcherError,
    Client,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    Retry,
    RtmlError,
    TransportError,
    Unauthorized,
    Unavailable,
)
from rtml.client._core import parse_retry_after, resolve_urls


class Twin:
    """One awaitable API over either client: the async one as it is, the sync one in a worker thread (so it
    may talk to servers running on the test's event loop)."""

    def __init__(self, client: Client | AsyncClient) -> None:
        self.client = client

    @property
    def is_async(self) -> bool:
        return isinstance(self.client, AsyncClient)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if self.is_async or not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(attr, *args, **kwargs)

        return call


@dataclass
class FakeTime:
    """A clock that only moves when the client sleeps: waits are measured, never spent."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


@contextlib.asynccontextmanager
async def twin(kind: str, transport: Any = None, time: FakeTime | None = None, **kw: Any) -> AsyncIterator[Twin]:
    """A sync or async client on ``transport`` (sync: an ``httpx.BaseTransport``; async: async)."""
    fake = time or FakeTime()
    if kind == "sync":
        client: Client | AsyncClient = Client(transport=transport, sleep=fake.sleep, clock=fake.clock, **kw)
    else:
        client = AsyncClient(transport=transport, sleep=fake.asleep, clock=fake.clock, **kw)
    try:
        yield Twin(client)
    finally:
        if isinstance(client, AsyncClient):
            await client.aclose()
        else:
            client.close()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


Handler = Callable[[httpx.Request], httpx.Response]


def error(status: int, code: str, message: str = "m", details: Any = None, **headers: str) -> httpx.Response:
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return httpx.Response(status, json={"error": err}, headers=headers)


def accept_all(seen: list[httpx.Request]) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={"accepted": len(orjson.loads(request.content)["events"])})

    return handle


PREDICTION = {"prediction_id": "p1", "model": "ctr", "version": "3", "score": 0.25, "degraded": False}


# -- URLs, headers -------------------------------------------------------------------------------------------------
def test_urls_default_ports_gateway_and_overrides() -> None:
    none: dict[Any, str | None] = {}
    assert resolve_urls("http://10.0.0.5", none) == {
        "ingest": "http://10.0.0.5:8001", "features": "http://10.0.0.5:8002",
        "serving": "http://10.0.0.5:8003", "feedback": "http://10.0.0.5:8004",
    }  # fmt: skip
    assert set(resolve_urls("https://api.example.com/rtml/", none).values()) == {"https://api.example.com/rtml"}
    assert set(resolve_urls("http://gw:9000", none).values()) == {"http://gw:9000"}
    assert resolve_urls("localhost", {"serving": "http://s:1/"})["serving"] == "http://s:1"
    assert resolve_urls("localhost", none)["ingest"] == "http://localhost:8001"


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait


async def test_each_call_goes_to_its_service_with_the_api_key(kind: str) -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path == "/v1/predict":
            return httpx.Response(200, json=PREDICTION)
        if path == "/v1/recommend":
            return httpx.Response(200, json={**PREDICTION, "items": [{"item_id": "b", "score": 0.5}]})
        if path == "/v1/outcomes":
            return httpx.Response(202, json={"accepted": 1})
        if request.url.raw_path == b"/v1/models/a%2Fb/quality":
            versions = [{"version": "1", "count": 2, "auc": None, "new": 1}]
            return httpx.Response(200, json={"model": "a/b", "window": "1h", "window_ms": 1, "as_of": 1,
                                             "versions": versions})  # fmt: skip
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    async with twin(kind, httpx.MockTransport(handle), api_key="k1", base_url="http://h") as c:
        p = await c.predict({"user_id": "u1"}, features={"x": 1.0}, deadline_ms=50)
        assert p.score == 0.25 and p.version == "3" and p.degraded is False
        r = await c.recommend("u1", ["a", "b"], k=1, model="ctr")
        assert [(i.item_id, i.score) for i in r.items] == [("b", 0.5)]
        assert await c.send_outcome("p1", 1, item_id="b") is None
        q = await c.quality("a/b")
        assert q.of("1") is not None and q.of("1").count == 2 and q.of("1").model_extra == {"new": 1}  # type: ignore[union-attr]
    assert [(r.url.port, r.url.raw_path) for r in seen] == [
        (8003, b"/v1/predict"), (8003, b"/v1/recommend"), (8004, b"/v1/outcomes"), (8004, b"/v1/models/a%2Fb/quality")
    ]  # fmt: skip
    assert all(r.headers["authorization"] == "Bearer k1" for r in seen)
    assert seen[0].headers["x-request-timeout-ms"] == "50"
    assert orjson.loads(seen[0].content) == {"entities": {"user_id": "u1"}, "features": {"x": 1.0}}  # no model: default
    assert orjson.loads(seen[1].content)["model"] == "ctr"


# -- events: ids and batching --------------------------------------------------------------------------------------
async def test_events_get_an_id_once_and_the_callers_dicts_stay_as_they_were(kind: str) -> None:
    seen: list[httpx.Request] = []
    events = [{"type": "view", "user_id": "u1"}, {"type": "click", "event_id": "mine"}]
    async with twin(kind, httpx.MockTransport(accept_all(seen))) as c:
        got = await c.send_events(events)
        one = await c.send_event("view", user_id="u2", properties={"amount": 2})
    assert events == [{"type": "view", "user_id": "u1"}, {"type": "click", "event_id": "mine"}]
    sent = orjson.loads(seen[0].content)["events"]
    assert [e["event_id"] for e in sent] == got.event_ids and got.event_ids[1] == "mine"
    assert len(got.event_ids[0]) == 32 and got.accepted == 2 and got.requests == 1
    assert orjson.loads(seen[1].content)["events"] == [{"event_id": one, "type": "view", "user_id": "u2",
                                                        "properties": {"amount": 2}}]  # fmt: skip


async def test_more_than_10000_events_are_split_and_each_body_stays_under_the_cap(kind: str) -> None:
    seen: list[httpx.Request] = []
    events = [{"type": "view", "user_id": f"u{i}"} for i in range(25_001)]
    async with twin(kind, httpx.MockTransport(accept_all(seen))) as c:
        got = await c.send_events(events)
    sizes = [len(orjson.loads(r.content)["events"]) for r in seen]
    assert sizes == [10_000, 10_000, 5_001] and got.accepted == 25_001 and got.requests == 3
    sent_ids = [e["event_id"] for r in seen for e in orjson.loads(r.content)["events"]]
    assert sent_ids == got.event_ids and len(set(sent_ids)) == 25_001

    seen.clear()
    big = [{"type": "view", "properties": {"blob": "x" * 1000}} for _ in range(50)]
    async with twin(kind, httpx.MockTransport(accept_all(seen)), max_batch_bytes=10_000) as c:
        got = await c.send_events(big)
    assert all(len(r.content) <= 10_000 for r in seen) and len(seen) == 6  # 9 events of ~1.07 kB per body
    assert sum(len(orjson.loads(r.content)["events"]) for r in seen) == 50 == got.accepted


async def test_an_event_alone_over_the_cap_fails_before_anything_is_sent(kind: str) -> None:
    seen: list[httpx.Request] = []
    events = [{"type": "view"}, {"type": "view", "properties": {"blob": "x" * 20_000}}]
    async with twin(kind, httpx.MockTransport(accept_all(seen)), max_batch_bytes=10_000) as c:
        with pytest.raises(PayloadTooLarge) as info:
            await c.send_events(events)
    assert seen == [] and info.value.details[0]["index"] == 1


async def test_422_in_a_later_request_names_indices_of_the_whole_list(kind: str) -> None:
    calls = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(202, json={"accepted": 3})
        return error(422, "invalid", "1 event(s) are invalid", [{"index": 1, "field": "type", "message": "missing"}])

    async with twin(kind, httpx.MockTransport(handle), max_batch_events=3) as c:
        with pytest.raises(InvalidRequest) as info:
            await c.send_events([{"type": "v"}] * 5)
    err = info.value
    assert calls == 2  # a 422 is never retried
    assert err.status == 422 and err.code == "invalid" and err.accepted == 3 and len(err.event_ids or []) == 5
    assert [(e.index, e.field, e.message) for e in err.errors] == [(4, "type", "missing")]


# -- retries -------------------------------------------------------------------------------------------------------
async def test_retry_after_is_honoured_and_the_retry_resends_the_same_event_ids(kind: str) -> None:
    bodies: list[bytes] = []

    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) == 1:
            return error(503, "unavailable", "kafka down", **{"Retry-After": "2"})
        if len(bodies) == 2:
            return error(429, "rate_limited", **{"Retry-After": "1"})
        return httpx.Response(202, json={"accepted": 1})

    fake = FakeTime()
    async with twin(kind, httpx.MockTransport(handle), time=fake) as c:
        got = await c.send_events([{"type": "view"}])
    assert got.accepted == 1 and len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]
    assert 2.0 <= fake.sleeps[0] <= 2.2 and 1.0 <= fake.sleeps[1] <= 1.1


async def test_attempts_and_total_time_are_bounded(kind: str) -> None:
    calls = 0

    def always_503(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return error(503, "overloaded", "busy", **{"Retry-After": "1"})

    fake = FakeTime()
    async with twin(kind, httpx.MockTransport(always_503), time=fake, retry=Retry(attempts=4)) as c:
        with pytest.raises(Unavailable) as info:
            await c.predict({"user_id": "u"})
    assert calls == 4 and len(fake.sleeps) == 3 and info.value.retry_after == 1.0 and info.value.code == "overloaded"

    calls, fake = 0, FakeTime()
    async with twin(kind, httpx.MockTransport(always_503), time=fake, retry=Retry(attempts=100, max_elapsed=5)) as c:
        with pytest.raises(Unavailable):
            await c.models()
    assert fake.now - 1000.0 <= 5 and 4 <= calls <= 5  # waits of >= 1 s each, none ending after 5 s

    calls, fake = 0, FakeTime()
    async with twin(kind, httpx.MockTransport(always_503), time=fake) as c:
        with pytest.raises(Unavailable):
            await c.models(retry=NO_RETRY)
    assert calls == 1 and fake.sleeps == []


async def test_exponential_backoff_with_jitter_without_retry_after(kind: str) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)  # not even JSON: a proxy's answer

    fake = FakeTime()
    retry = Retry(attempts=5, backoff=0.1, max_backoff=0.5)
    async with twin(kind, httpx.MockTransport(down), time=fake, retry=retry) as c:
        with pytest.raises(Unavailable) as info:
            await c.models()
    caps = [0.1, 0.2, 0.4, 0.5]
    assert len(fake.sleeps) == 4
    assert all(cap / 2 <= s <= cap for s, cap in zip(fake.sleeps, caps, strict=True))
    assert info.value.status == 503 and info.value.code == "http_503"


async def test_connection_failures_retry_but_a_predict_that_may_have_run_does_not(kind: str) -> None:
    calls: list[str] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 2:
            raise httpx.ReadError("reset", request=request)
        return httpx.Response(200, json=PREDICTION)

    async with twin(kind, httpx.MockTransport(flaky)) as c:
        with pytest.raises(TransportError) as info:
            await c.predict({"user_id": "u"})  # refused: retried; reset after sending: not
        assert isinstance(info.value.__cause__, httpx.ReadError) and info.value.status is None
        assert len(calls) == 2
        calls.clear()
        seen: list[httpx.Request] = []
        ok = accept_all(seen)

        def events_flaky(request: httpx.Request) -> httpx.Response:
            calls.append("x")
            if len(calls) == 1:
                raise httpx.ReadTimeout("slow", request=request)
            return ok(request)

        c.client._http._transport = httpx.MockTransport(events_flaky)
        assert (await c.send_events([{"type": "v"}])).accepted == 1  # events are idempotent: retried


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [(401, "unauthorized", Unauthorized), (403, "forbidden", Forbidden), (404, "not_found", NotFound),
     (409, "conflict", Conflict), (400, "bad_request", InvalidRequest), (500, "internal", RtmlError)],
)  # fmt: skip
async def test_error_answers_become_typed_errors(kind: str, status: int, code: str, cls: type[RtmlError]) -> None:
    calls = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return error(status, code, "what went wrong")

    async with twin(kind, httpx.MockTransport(handle)) as c:
        with pytest.raises(cls) as info:
            await c.promote("ctr", "7")
    assert type(info.value) is cls and calls == 1
    assert (info.value.status, info.value.code, info.value.message) == (status, code, "what went wrong")
    assert str(info.value) == f"HTTP {status} {code}: what went wrong"


async def test_model_by_name_and_unknown_model(kind: str) -> None:
    body = {"models": [{"name": "ctr", "live_version": "2", "history": ["1", "2"], "rollout": None,
                        "versions": [{"version": "1", "live": False}, {"version": "2", "live": True,
                                                                       "features": ["a"]}]}]}  # fmt: skip
    async with twin(kind, httpx.MockTransport(lambda r: httpx.Response(200, json=body))) as c:
        m = await c.model("ctr")
        assert m.live_version == "2" and m.version("2").features == ["a"]  # type: ignore[union-attr]
        with pytest.raises(NotFound):
            await c.model("nope")


# -- background batchers -------------------------------------------------------------------------------------------
class Gate:
    """A transport that holds every request until opened, counting events (sync and async)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def answer(self, request: httpx.Request) -> httpx.Response:
        batch = orjson.loads(request.content)["events"]
        with self.lock:
            self.events.extend(batch)
        return httpx.Response(202, json={"accepted": len(batch)})

    def sync(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            self.open.wait(10)
            return self.answer(request)

        return httpx.MockTransport(handle)

    def asynchronous(self) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            while not self.open.is_set():
                await asyncio.sleep(0.005)
            return self.answer(request)

        return httpx.MockTransport(handle)


def test_sync_batcher_blocks_when_full_raises_after_its_timeout_and_loses_nothing() -> None:
    gate = Gate()
    with Client(transport=gate.sync()) as client:
        batcher = client.batcher(batch_size=2, max_queue=3, linger=0.0)
        ids = [batcher.add({"type": "v", "user_id": "u"})]  # taken by the worker, held by the gate
        for _ in range(500):
            if not batcher._queue:
                break
            threading.Event().wait(0.01)
        assert not batcher._queue
        ids += [batcher.add({"type": "v"}) for _ in range(3)]  # fills the queue
        with pytest.raises(QueueFull):
            batcher.add({"type": "v"}, timeout=0.05)
        blocked_done = threading.Event()

        def producer() -> None:
            ids.append(batcher.add({"type": "v"}))  # blocks until the worker makes room
            blocked_done.set()

        t = threading.Thread(target=producer)
        t.start()
        assert not blocked_done.wait(0.2)  # still waiting: back-pressure, not an unbounded queue
        gate.open.set()
        t.join(5)
        assert blocked_done.is_set()
        batcher.close()
    assert sorted(e["event_id"] for e in gate.events) == sorted(ids) and len(ids) == 5


async def test_async_batcher_blocks_when_full_raises_after_its_timeout_and_loses_nothing() -> None:
    gate = Gate()
    async with AsyncClient(transport=gate.asynchronous()) as client:
        batcher = client.batcher(batch_size=2, max_queue=3, linger=0.0)
        ids = [await batcher.add({"type": "v"})]
        for _ in range(500):
            if not batcher._queue:
                break
            await asyncio.sleep(0.01)
        assert not batcher._queue
        ids += [await batcher.add({"type": "v"}) for _ in range(3)]
        with pytest.raises(QueueFull):
            await batcher.add({"type": "v"}, timeout=0.05)
        blocked = asyncio.create_task(batcher.add({"type": "v"}))
        await asyncio.sleep(0.2)
        assert not blocked.done()
        gate.open.set()
        ids.append(await asyncio.wait_for(blocked, 5))
        await batcher.flush()
        assert batcher.pending == 0
        await batcher.close()
    assert sorted(e["event_id"] for e in gate.events) == sorted(ids) and len(ids) == 5


async def test_batcher_hands_back_events_it_could_not_send(kind: str) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return error(422, "invalid", "bad", [{"index": 0, "field": "type", "message": "missing"}])

    events = [{"type": "v", "user_id": "u1"}, {"type": "v", "user_id": "u2"}]
    if kind == "sync":
        with Client(transport=httpx.MockTransport(refuse)) as client:
            batcher = client.batcher(batch_size=10, linger=5)
            ids = [batcher.add(e) for e in events]
            with pytest.raises(BatcherError) as info:
                batcher.flush()  # does not wait out the 5 s linger
            batcher.close()  # the failure was reported once
    else:
        async with AsyncClient(transport=httpx.MockTransport(refuse)) as aclient:
            abatcher = aclient.batcher(batch_size=10, linger=5)
            ids = [await abatcher.add(e) for e in events]
            with pytest.raises(BatcherError) as info:
                await abatcher.flush()
            await abatcher.close()
    [(err, failed)] = info.value.failures
    assert isinstance(err, InvalidRequest) and [e["event_id"] for e in failed] == ids
    assert [e["user_id"] for e in failed] == ["u1", "u2"]


def test_batcher_on_error_receives_the_events_instead_of_flush() -> None:
    got: list[tuple[RtmlError, list[dict[str, Any]]]] = []
    down = httpx.MockTransport(lambda r: error(401, "unauthorized", "unknown API key"))
    with Client(transport=down) as client:
        with client.batcher(on_error=lambda e, evs: got.append((e, evs)), linger=0) as batcher:
            eid = batcher.add({"type": "v"})
            batcher.flush()  # handed to on_error: nothing to raise
    [(err, events)] = got
    assert isinstance(err, Unauthorized) and [e["event_id"] for e in events] == [eid]
