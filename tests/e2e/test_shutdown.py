"""Graceful shutdown, on real processes (``rtml serve``) with the real broker and redis-server.

SIGTERM: a request in flight completes with its normal answer, what the service acknowledged is on its topic
(ingest's events, serving's prediction log), consumers commit what they applied (a restart neither applies a
record twice nor skips one), and a rolling restart of every service under load loses nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from rtml.core import embedded
from rtml.core.config import load_config
from rtml.core.kafka import create_topics
from rtml.core.schemas import Event
from rtml.core.settings import Settings
from tests.e2e.procs import Service, env_of, read_topic
from tests.helpers import eventually
from tests.integration.test_features_processes import CONFIG_YAML, assert_converges, make_events, publish
from tests.integration.test_serving import register

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

# the held request may wait for the paused dependency this long; the drain after SIGTERM lasts as long, so a
# slow CI box cannot cut it before the test resumes the dependency (the default grace is 4 s)
HOLD = {"RTML_KAFKA_PUBLISH_TIMEOUT_S": "60", "RTML_KAFKA_REQUEST_TIMEOUT_MS": "60000", "RTML_SHUTDOWN_GRACE_S": "60"}


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in started:
        s.kill()


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def stop_listening(service: Service) -> None:
    """Wait until the service stopped accepting connections: it is shutting down (SIGTERM handled)."""

    async def closed() -> None:
        assert not listening(service.port)

    await eventually(closed, timeout=30)


async def test_sigterm_lets_an_ingest_request_in_flight_finish_with_its_events_on_the_topic(
    make_settings: Any, own_broker: embedded.Managed, log_dir: Path, services: list[Service]
) -> None:
    s: Settings = make_settings(kafka={"bootstrap": f"127.0.0.1:{own_broker.port}"})
    await create_topics(s)
    ingest = Service("ingest", env_of(s, **HOLD), log_dir)
    services.append(ingest)
    ingest.wait_ready()
    url = f"{ingest.url}/v1/events"
    batch = {"events": [{"event_id": f"held-{i}", "type": "view", "user_id": f"u{i % 7}"} for i in range(100)]}
    async with httpx.AsyncClient(timeout=60) as http:
        first = await http.post(url, json={"event_id": "first", "type": "view", "user_id": "u0"})
        assert first.status_code == 202
        os.kill(own_broker.proc.pid, signal.SIGSTOP)
        try:
            held = asyncio.create_task(http.post(url, json=batch))

            async def admitted() -> None:
                assert ingest.metric("rtml_ingest_pending_events") == 100

            await eventually(admitted, timeout=30)
            assert ingest.proc is not None
            ingest.proc.send_signal(signal.SIGTERM)
            await stop_listening(ingest)  # shutting down, the request still waiting for the broker
            assert not held.done()
        finally:
            os.kill(own_broker.proc.pid, signal.SIGCONT)
        answer = await held
    assert answer.status_code == 202 and answer.json() == {"accepted": 100}
    assert await asyncio.to_thread(ingest.proc.wait, 30) == 0
    on_topic = [orjson.loads(r.value)["event_id"] for r in await read_topic(s, "events")]
    assert sorted(on_topic) == sorted(["first", *(e["event_id"] for e in batch["events"])])


async def test_sigterm_lets_a_prediction_in_flight_finish_and_flushes_the_prediction_log(
    make_settings: Any, own_redis: embedded.Managed, log_dir: Path, services: list[Service]
) -> None:
    s: Settings = make_settings(redis={"url": f"redis://127.0.0.1:{own_redis.port}/0"})
    await create_topics(s)
    version = await register(s)
    # one request in flight at most: a probe refused with 503 proves the held request is in flight
    env = env_of(s, RTML_REDIS_SOCKET_TIMEOUT_S="60", RTML_MODEL_POLL_INTERVAL_S="3600", RTML_SHUTDOWN_GRACE_S="60",
                 RTML_PREDICT_MAX_IN_FLIGHT="1")  # fmt: skip
    serving = Service("serving", env, log_dir)
    services.append(serving)
    serving.wait_ready()
    url = f"{serving.url}/v1/predict"
    hold = {"X-Request-Timeout-Ms": "60000"}
    async with httpx.AsyncClient(timeout=60) as http:
        answered = [await http.post(url, json={"entities": {"user_id": f"u{i}", "item_id": "t1"}}) for i in range(50)]
        assert {r.status_code for r in answered} == {200}
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:

            async def held_predict() -> httpx.Response:
                # a probe may hold the one slot for its 1 ms when this arrives: refused, it comes again
                while True:
                    r = await http.post(url, json={"entities": {"user_id": "held"}}, headers=hold)
                    if r.status_code != 503:
                        return r

            held = asyncio.create_task(held_predict())

            async def in_flight() -> None:
                # admitted before the held one arrived, a probe answers degraded within its 1 ms budget (and is
                # logged); once the held request is in flight, the probe is refused: SIGTERM then finds it there
                probe = await http.post(
                    url, json={"entities": {"user_id": "probe"}}, headers={"X-Request-Timeout-Ms": "1"}
                )
                if probe.status_code == 200:
                    answered.append(probe)
                assert probe.status_code == 503, probe.text

            await eventually(in_flight, timeout=30)
            assert serving.proc is not None
            serving.proc.send_signal(signal.SIGTERM)
            await stop_listening(serving)
            assert not held.done()
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        last = await held
    assert last.status_code == 200, last.text
    body = last.json()
    assert (body["model"], body["version"], body["degraded"]) == ("ctr", version, False)
    assert await asyncio.to_thread(serving.proc.wait, 30) == 0
    logged = [orjson.loads(r.value)["prediction_id"] for r in await read_topic(s, "predictions")]
    assert sorted(logged) == sorted([r.json()["prediction_id"] for r in [*answered, last]])


def unique_events(n: int, seed: int) -> list[Event]:
    """``make_events`` without its deliberate duplicates: a record applied twice then shows as a duplicate."""
    seen: dict[str, Event] = {}
    for e in make_events(n, seed):
        seen.setdefault(e.event_id, e)
    return list(seen.values())


@pytest.mark.slow
async def test_sigterm_commits_the_features_offsets_nothing_applied_twice_or_skipped(
    make_settings: Any, log_dir: Path, services: list[Service], tmp_path: Path
) -> None:
    config_path = tmp_path / "rtml.yaml"
    config_path.write_text(CONFIG_YAML)
    s: Settings = make_settings(config=config_path)
    await create_topics(s)
    config = load_config(config_path)
    features = Service("features", env_of(s), log_dir)
    services.append(features)
    features.wait_ready()
    events = unique_events(6_000, seed=5)
    half = len(events) // 2
    terminated = asyncio.Event()

    async def terminate_mid_load(n: int) -> None:
        if n == 10 and features.metric("rtml_consumer_records_total", consumer="features") > 0:
            assert features.proc is not None
            features.proc.send_signal(signal.SIGTERM)
            terminated.set()

    # the first half while it consumes, SIGTERM mid-way; the second half while it is down
    await publish(s, events[:half], batch=200, pause=0.05,
                  on_batch=lambda n: asyncio.ensure_future(terminate_mid_load(n)))  # fmt: skip
    if not terminated.is_set():
        await terminate_mid_load(10)
    assert terminated.is_set()
    assert await asyncio.to_thread(features.proc.wait, 30) == 0  # type: ignore[union-attr]
    await publish(s, events[half:], batch=500, pause=0)
    features.start()
    await asyncio.to_thread(features.wait_ready)
    await assert_converges(s, config, events, timeout=120)
    # nothing the first process applied came again: it committed its offsets when it stopped
    assert features.metric("rtml_features_events_duplicate_total") == 0


PATIENT = {"X-Request-Timeout-Ms": "5000"}


class Load:
    """Steady load on the four services while they restart one by one, recording only what was acknowledged:
    events (202, retried with the same event_ids until then), predictions (200) and outcomes (202)."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = urls
        self.stopping = False
        self.events: list[Event] = []
        self.predictions: list[dict[str, Any]] = []
        self.outcomes: list[str] = []
        self.statuses: dict[str, dict[int, int]] = {"events": {}, "predict": {}, "outcomes": {}}

    def _count(self, route: str, status: int) -> None:
        self.statuses[route][status] = self.statuses[route].get(status, 0) + 1

    async def _until_accepted(self, http: httpx.AsyncClient, route: str, url: str, body: Any) -> httpx.Response:
        """POST until the service answers 2xx: a refused connection (restarting) or a 503 is retried."""
        while True:
            try:
                r = await http.post(url, json=body)
            except httpx.TransportError:
                await asyncio.sleep(0.05)
                continue
            self._count(route, r.status_code)
            if r.status_code < 300:
                return r
            assert r.status_code == 503, (route, r.status_code, r.text)
            await asyncio.sleep(0.05)

    async def events_loop(self, http: httpx.AsyncClient) -> None:
        k = 0
        while not self.stopping:
            now = int(time.time() * 1000)
            batch = [
                Event(event_id=f"rr-{k}-{j}", type=("view", "view", "click", "purchase")[(k + j) % 4],
                      user_id=f"ru{(k * 7 + j) % 30}", item_id=f"rt{(k + j) % 20}", ts=now - j, received_at=now,
                      properties={"amount": float(1 + (k + j) % 50)} if (k + j) % 4 == 3 else {})
                for j in range(20)
            ]  # fmt: skip
            body = {"events": [e.model_dump(exclude={"received_at", "source"}) for e in batch]}
            r = await self._until_accepted(http, "events", f"{self.urls['ingest']}/v1/events", body)
            assert r.json() == {"accepted": len(batch)}
            self.events += batch
            k += 1
            await asyncio.sleep(0.05)

    async def predict_loop(self, http: httpx.AsyncClient) -> None:
        k = 0
        while not self.stopping:
            body = {"entities": {"user_id": f"ru{k % 30}", "item_id": f"rt{k % 20}"}}
            try:
                # a budget that a busy box's Redis read fits in: degraded would mean the store failed
                r = await http.post(f"{self.urls['serving']}/v1/predict", json=body, headers=PATIENT)
            except httpx.TransportError:  # restarting: not an answer
                await asyncio.sleep(0.05)
                continue
            self._count("predict", r.status_code)
            if r.status_code == 200:
                self.predictions.append(r.json())
                if k % 2 == 0:  # half of them get an outcome
                    outcome = {"prediction_id": r.json()["prediction_id"], "label": k % 4 // 2}
                    await self._until_accepted(http, "outcomes", f"{self.urls['feedback']}/v1/outcomes", outcome)
                    self.outcomes.append(outcome["prediction_id"])
            k += 1
            await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_a_rolling_restart_of_every_service_under_load_loses_nothing(
    make_settings: Any, log_dir: Path, services: list[Service]
) -> None:
    s: Settings = make_settings()
    await create_topics(s)
    version = await register(s)
    env = env_of(s, RTML_MODEL_POLL_INTERVAL_S="1")
    order = ("ingest", "features", "serving", "feedback")
    services += [Service(name, env, log_dir) for name in order]
    await asyncio.gather(*(asyncio.to_thread(svc.wait_ready) for svc in services))
    load = Load({svc.name: svc.url for svc in services})
    async with httpx.AsyncClient(timeout=60) as http:
        tasks = [asyncio.create_task(load.events_loop(http)), asyncio.create_task(load.predict_loop(http))]

        async def progressed(since: tuple[int, int]) -> None:
            for t in tasks:
                if t.done():
                    t.result()  # a failed load loop fails the test now
            assert len(load.events) >= since[0] + 100 and len(load.predictions) >= since[1] + 10

        try:
            await eventually(lambda: progressed((0, 0)), timeout=60)
            for svc in services:  # one at a time: SIGTERM, wait for the exit, start again, wait until ready
                assert await asyncio.to_thread(svc.terminate) == 0, svc.tail()
                svc.start()
                await asyncio.to_thread(svc.wait_ready)
                mark = (len(load.events), len(load.predictions))
                await eventually(lambda mark=mark: progressed(mark), timeout=60)  # type: ignore[misc]
        finally:
            load.stopping = True
            await asyncio.gather(*tasks)

    # every acknowledged event is in the features exactly once: each value equals the reference
    assert len(load.events) >= 500
    await assert_converges(s, load_config(s.platform_config_path()), load.events, timeout=120)
    # every answered prediction is valid, and is on the predictions topic (the log survived serving's restart)
    for p in load.predictions:
        assert (p["model"], p["version"], p["degraded"]) == ("ctr", version, False), p
        assert 0.0 <= p["score"] <= 1.0
    logged = {orjson.loads(r.value)["prediction_id"] for r in await read_topic(s, "predictions")}
    assert {p["prediction_id"] for p in load.predictions} <= logged
    # every acknowledged outcome is joined into an example (feedback's consumers lost nothing)
    wanted = set(load.outcomes)
    assert wanted

    async def all_joined() -> None:
        joined = {orjson.loads(r.value)["prediction_id"] for r in await read_topic(s, "examples")}
        missing = wanted - joined
        assert not missing, f"{len(missing)} of {len(wanted)} outcomes not joined, e.g. {sorted(missing)[:3]}"

    await eventually(all_joined, timeout=90, every=1)
    assert set(load.statuses["predict"]) <= {200, 503}, load.statuses
