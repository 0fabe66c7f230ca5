"""``rtml up --replicas 2`` as real processes: two of every service against one broker and one Redis.

Events alternate between the ingest replicas (duplicates of one event_id sent to both), features are read
from either features replica and equal the reference; predictions alternate between the serving replicas and
outcomes between the feedback replicas: each prediction is joined exactly once and the quality counts every
outcome once; a version promoted through one serving replica is served by both; each replica's metrics count
what that replica did, and the features replicas split the partitions of one consumer group.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rtml.cli.common import CliError
from rtml.cli.up import plan_replicas
from rtml.core.config import PlatformConfig, load_config
from rtml.core.kafka import Consumed, ConsumerLoop, Producer, decode_json
from rtml.core.schemas import Event
from rtml.core.settings import SERVICES, Settings
from rtml.features.plan import entity_id_of
from rtml.features.windows import reference_value
from tests.e2e.conftest import Platform, running_platform
from tests.e2e.test_walkthrough import alive, descendants
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

REPLICAS = 2
PORT_STEP = 10
PARTITIONS = 4
N_EVENTS = 3_000
N_PREDICTIONS = 120

# The demo's features minus `last` (its ties are arrival order, which two ingest replicas make arbitrary) and
# its models minus fraud and minus label rules, so every example comes from one POSTed outcome.
CONFIG_YAML = """
entities:
  user: {key: user_id}
  item: {key: item_id}
  user_item: {keys: [user_id, item_id]}
features:
  user_events_1m:   {entity: user, agg: count, window: 1m}
  user_clicks_5m:   {entity: user, agg: count, events: [click], window: 5m}
  user_views_total: {entity: user, agg: count, events: [view]}
  user_spend_1h:    {entity: user, agg: sum, field: properties.amount, events: [purchase], window: 1h, tile: 1m}
  user_amount_max_24h: {entity: user, agg: max, field: properties.amount, window: 24h}
  user_amount_mean_1h: {entity: user, agg: mean, field: properties.amount, window: 1h}
  item_ctr_1h:      {entity: item, agg: ratio, numerator: {events: [click]}, denominator: {events: [view]}, window: 1h}
  user_items_24h:   {entity: user, agg: distinct_count, field: item_id, window: 24h}
  user_item_clicks_24h: {entity: user_item, agg: count, events: [click], window: 24h}
models:
  ctr:
    features: [user_clicks_5m, item_ctr_1h, user_items_24h]
    defaults: {item_ctr_1h: 0.0}
    quality: {window: 1h}
"""


def free_base_ports() -> dict[str, str]:
    """A base port per service whose replica ports (base + i * step) are all free now (the conftest's single
    free ports say nothing about base + step)."""
    assert REPLICAS == 2, "free_port checks one more port: base + step"
    chosen: set[int] = set()
    out: dict[str, str] = {}
    for service in SERVICES:
        while True:
            base = free_port(bus_offset=PORT_STEP)
            ports = {base, base + PORT_STEP}
            if not chosen & ports:
                chosen |= ports
                out[f"RTML_{service.upper()}_PORT"] = str(base)
                break
    return out


def replica_urls(platform: Platform) -> dict[str, list[str]]:
    """Every replica's URL from what ``up`` printed: replica 0 of each service first (the conftest read
    those four lines), then replica 1 of each; the i-th line naming a service is its replica i."""
    urls = {name: [platform.urls[name]] for name in SERVICES}
    assert platform.proc.stdout is not None
    while True:
        line = platform.proc.stdout.readline().decode()
        assert line, "rtml up ended its output early"
        name, _, value = line.strip().partition(" ")
        if name not in SERVICES:
            assert name == "kafka", line  # the replicas' lines come before the infra lines
            break
        urls[name].append(value.strip())
    return urls


def make_events(seed: int) -> tuple[list[dict[str, Any]], list[Event]]:
    """What is sent (N_EVENTS bodies, ~4% of them a second copy of an earlier event_id) and the reference's
    view of it (the same events as the engine sees them)."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    sent: list[dict[str, Any]] = []
    tag = uuid.uuid4().hex[:6]
    for i in range(N_EVENTS):
        if sent and rng.random() < 0.04:
            sent.append(rng.choice(sent))  # a retry of an earlier event, likely through the other replica
            continue
        body: dict[str, Any] = {
            "event_id": f"{tag}-{i}",
            "type": rng.choice(["view", "view", "view", "click", "purchase"]),
            "user_id": f"u{rng.randrange(50)}",
            "item_id": f"t{rng.randrange(20)}",
            "ts": now - rng.randint(0, 300_000),  # out of order over the last 5 minutes
        }
        if body["type"] == "purchase" or rng.random() < 0.1:
            body["properties"] = {"amount": round(rng.uniform(1, 500), 2)}
        sent.append(body)
    unique = {b["event_id"]: Event(**b, received_at=now) for b in sent}
    return sent, list(unique.values())


def expected(events: list[Event], config: PlatformConfig, entity: str, entity_id: str, as_of: int) -> dict[str, Any]:
    mine = [e for e in events if entity_id_of(config, entity, e) == entity_id]
    return {n: reference_value(mine, f, as_of) for n, f in config.features_of(entity).items()}


def same(got: Any, want: Any) -> bool:
    return bool(got == pytest.approx(want)) if isinstance(want, float) else got == want


async def features_differences(
    http: httpx.AsyncClient, url: str, config: PlatformConfig, events: list[Event]
) -> list[tuple[str, str, str, Any, Any]]:
    """Every (entity, id, feature, got, want) where ``url``'s reads differ from the reference at their as_of."""
    diff: list[tuple[str, str, str, Any, Any]] = []
    for entity in config.entities:
        ids = sorted({i for e in events if (i := entity_id_of(config, entity, e)) is not None})
        for start in range(0, len(ids), 1000):
            r = await http.post(f"{url}/v1/features:batch", json={"entity": entity, "ids": ids[start : start + 1000]})
            assert r.status_code == 200, r.text
            for row in r.json():
                want = expected(events, config, entity, row["id"], row["as_of"])
                diff += [
                    (entity, row["id"], n, row["features"].get(n), v)
                    for n, v in want.items()
                    if not same(row["features"].get(n), v)
                ]
    return diff


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


async def metric(http: httpx.AsyncClient, url: str, name: str, **labels: str) -> float:
    text = (await http.get(f"{url}/metrics")).text
    return sum(v for _, v in samples(text, name, **labels))


async def collect_examples(settings: Settings, wanted: set[str], timeout: float = 30) -> list[dict[str, Any]]:
    """Every record on rtml.examples (this test's prefix) until each wanted prediction was seen, plus 2 s for
    any duplicate still in flight."""
    found: list[dict[str, Any]] = []

    async def handle(batch: list[Consumed[Any]]) -> None:
        found.extend(c.value for c in batch)

    async with Producer(settings) as producer:
        loop: ConsumerLoop[Any] = ConsumerLoop(
            settings, name="e2e-examples", topics=["examples"], group_id=f"e2e-{uuid.uuid4().hex[:6]}",
            decode=decode_json, handle=handle, producer=producer,
        )  # fmt: skip
        async with loop:
            task = asyncio.create_task(loop.run(timeout=timeout + 5))
            deadline = time.monotonic() + timeout
            while not wanted <= {e["prediction_id"] for e in found} and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(2)
            await loop.stop()
            await task
    return found


async def test_two_replicas_of_every_service(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> None:
    config_path = tmp_path / "rtml.yaml"
    config_path.write_text(CONFIG_YAML)
    config = load_config(config_path)
    env = {
        **free_base_ports(),
        "RTML_CONFIG": str(config_path),
        "RTML_KAFKA_PARTITIONS": str(PARTITIONS),
        "RTML_KAFKA_LAG_INTERVAL_S": "1",
        "RTML_LOG_LEVEL": "WARNING",
        "RTML_EXAMPLES_DIR": str(tmp_path / "examples"),
    }
    args = ("--replicas", str(REPLICAS), "--port-step", str(PORT_STEP))
    with running_platform(kafka_bootstrap, redis_url, tmp_path, *args, env=env) as platform:
        urls = replica_urls(platform)
        assert all(len(u) == REPLICAS and len(set(u)) == REPLICAS for u in urls.values()), urls
        for name in SERVICES:  # the documented scheme: replica i on base + i * step
            base = int(env[f"RTML_{name.upper()}_PORT"])
            assert urls[name] == [f"http://127.0.0.1:{base + i * PORT_STEP}" for i in range(REPLICAS)]
        endpoints = dict(
            line.split("=", 1) for line in (tmp_path / "endpoints.env").read_text().splitlines() if "=" in line
        )
        assert all(endpoints[f"RTML_{n.upper()}_URLS"] == ",".join(urls[n]) for n in SERVICES), endpoints
        settings = platform.settings()

        async with httpx.AsyncClient(timeout=20) as http:
            # -- events, alternating between the ingest replicas; retries of one event_id go to both ----------
            sent, events = make_events(seed=8)
            accepted = [0] * REPLICAS
            through: list[set[str]] = [set() for _ in range(REPLICAS)]
            for n, start in enumerate(range(0, len(sent), 150)):
                chunk = sent[start : start + 150]
                r = await http.post(f"{urls['ingest'][n % REPLICAS]}/v1/events", json={"events": chunk})
                assert r.status_code == 202 and r.json() == {"accepted": len(chunk)}, r.text
                accepted[n % REPLICAS] += len(chunk)
                through[n % REPLICAS] |= {b["event_id"] for b in chunk}
            assert len(through[0] & through[1]) > 10, "the load must send some event_ids through both replicas"

            # -- every feature read from either features replica equals the reference ---------------------
            deadline = time.monotonic() + 30
            for url in urls["features"]:
                while diff := await features_differences(http, url, config, events):
                    assert time.monotonic() < deadline, f"{url}: {len(diff)} differ (got, want): {diff[:8]}"
                    await asyncio.sleep(0.3)

            # -- predictions alternate between the serving replicas, outcomes between the feedback ones ------
            users = sorted({e.user_id for e in events if e.user_id})
            predicted = [0] * REPLICAS
            predictions: list[dict[str, Any]] = []
            for i in range(N_PREDICTIONS):
                entities = {"user_id": users[i % len(users)], "item_id": f"t{i % 20}"}
                # a generous deadline: on a loaded CI box a 50 ms feature read can miss the default and come back
                # degraded (failed CI once); what is tested here is which replica answers, not how fast
                r = await http.post(f"{urls['serving'][i % REPLICAS]}/v1/predict", json={"entities": entities},
                                    headers={"X-Request-Timeout-Ms": "5000"})  # fmt: skip
                assert r.status_code == 200, r.text
                assert r.json()["version"] == "1" and r.json()["degraded"] is False
                predicted[i % REPLICAS] += 1
                predictions.append(r.json())
            for i, p in enumerate(predictions):
                outcome = {"prediction_id": p["prediction_id"], "label": i % 2}
                r = await http.post(f"{urls['feedback'][(i // 3) % REPLICAS]}/v1/outcomes", json=outcome)
                assert r.status_code == 202, r.text

            wanted = {p["prediction_id"] for p in predictions}
            examples = [e for e in await collect_examples(settings, wanted) if e["prediction_id"] in wanted]
            keys = [(e["prediction_id"], e.get("item_id")) for e in examples]
            assert len(keys) == len(set(keys)) == N_PREDICTIONS, (len(keys), len(set(keys)))
            labels = {e["prediction_id"]: e["label"] for e in examples}
            assert all(labels[p["prediction_id"]] == i % 2 for i, p in enumerate(predictions))

            deadline = time.monotonic() + 15
            for url in urls["feedback"]:  # the quality both replicas report counts each outcome once
                while True:
                    r = await http.get(f"{url}/v1/models/ctr/quality")
                    assert r.status_code == 200, r.text
                    counts = {v["version"]: v["count"] for v in r.json()["versions"]}
                    if sum(counts.values()) >= N_PREDICTIONS or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.3)
                assert counts == {"1": N_PREDICTIONS}, (url, counts)

            # -- a version promoted through one serving replica is served by both within 5 s ---------------
            from rtml.core.redis import Keys, connect
            from rtml.serving.registry import ModelRegistry

            redis = connect(settings)
            try:
                onnx_bytes, _ = await ModelRegistry(redis, Keys(settings.redis.key_prefix)).get("ctr", "1")
            finally:
                await redis.aclose()
            admin = urls["serving"][1]
            r = await http.post(f"{admin}/v1/models/ctr/versions", content=onnx_bytes)
            assert r.status_code == 201, r.text
            version = r.json()["version"]
            assert version == "2"
            r = await http.post(f"{admin}/v1/models/ctr/promote", json={"version": version})
            assert r.status_code == 200, r.text
            promoted_at = time.monotonic()
            pending = set(urls["serving"])
            while pending:
                for url in sorted(pending):
                    # what this replica serves (GET /v1/models reads the registry's pointer, the same for all
                    # replicas at once: waiting on it let a replica still on v1 answer the predict below)
                    if await metric(http, url, "rtml_model_live_info", model="ctr", version=version) == 1:
                        pending.discard(url)
                assert not pending or time.monotonic() - promoted_at < 5, f"not live within 5 s on {pending}"
                await asyncio.sleep(0.1)
            for i, url in enumerate(urls["serving"]):
                r = await http.post(f"{url}/v1/predict", json={"entities": {"user_id": users[0], "item_id": "t1"}})
                assert r.status_code == 200 and r.json()["version"] == version, (url, r.text)
                predicted[i] += 1
            assert time.monotonic() - promoted_at < 5

            # -- metrics count what each replica did ---------------------------------------------------------
            for i, url in enumerate(urls["serving"]):
                answered = await metric(http, url, "rtml_http_requests_total", service="serving",
                                        route="/v1/predict", status="200")  # fmt: skip
                assert answered == predicted[i], (url, answered, predicted)
            for i, url in enumerate(urls["ingest"]):
                assert await metric(http, url, "rtml_ingest_events_total") == accepted[i], (url, accepted)
            deadline = time.monotonic() + 15
            while True:  # the counters follow commits: equal once every record is committed
                consumed = [await metric(http, u, "rtml_consumer_records_total", consumer="features")
                            for u in urls["features"]]  # fmt: skip
                if sum(consumed) >= len(sent) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            assert sum(consumed) == len(sent), (consumed, len(sent))  # every record published, once
            assert all(c > 0 for c in consumed), consumed  # both members of the group consumed
            events_topic = settings.topic("events")
            deadline = time.monotonic() + 10  # a partition is reported once its committed offset was listed
            while True:
                owned: list[set[str]] = []
                for url in urls["features"]:
                    text = (await http.get(f"{url}/metrics")).text
                    lags = samples(text, "rtml_consumer_lag_records", consumer="features", topic=events_topic)
                    owned.append({labels["partition"] for labels, _ in lags})
                if len(set().union(*owned)) == PARTITIONS or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            assert all(owned) and not owned[0] & owned[1], owned  # each reports only its own partitions
            assert owned[0] | owned[1] == {str(p) for p in range(PARTITIONS)}, owned

        # -- a clean shutdown of all eight within 10 s ---------------------------------------------------------
        children = descendants(platform.proc.pid)
        if sys.platform == "linux":
            assert len(children) >= 4 * REPLICAS, children
        started = time.monotonic()
        platform.proc.send_signal(signal.SIGTERM)
        assert platform.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
        assert not alive(children), f"left running after rtml up exited: {alive(children)}"


def test_the_port_plan_puts_replica_i_at_base_plus_i_steps() -> None:
    s = Settings(ingest_port=9001, features_port=9002, serving_port=9003, feedback_port=9004)
    assert [(r.name, r.port) for r in plan_replicas(s, 1)] == [
        ("ingest", 9001), ("features", 9002), ("serving", 9003), ("feedback", 9004)
    ]  # fmt: skip
    plan = plan_replicas(s, 3, port_step=100)
    assert [r.name for r in plan[:5]] == ["ingest.0", "features.0", "serving.0", "feedback.0", "ingest.1"]
    assert [r.port for r in plan if r.service == "serving"] == [9003, 9103, 9203]
    with pytest.raises(CliError, match=r"ingest\.1 and features\.0 would both listen on port 9002"):
        plan_replicas(s, 2, port_step=1)
    with pytest.raises(CliError, match="out of range"):
        plan_replicas(s.model_copy(update={"feedback_port": 65530}), 2)


def test_a_taken_replica_port_is_one_clear_error_before_anything_starts(tmp_path: Path) -> None:
    ports = {k: int(v) for k, v in free_base_ports().items()}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["RTML_SERVING_PORT"] + PORT_STEP))
        taken.listen()
        env = {**os.environ, **{k: str(v) for k, v in ports.items()}}
        env.pop("RTML_KAFKA_BOOTSTRAP", None)  # nothing may be started: not even the embedded broker
        env.pop("RTML_REDIS_URL", None)
        done = subprocess.run(
            [sys.executable, "-m", "rtml.cli.main", "up", "--run-dir", str(tmp_path), "--replicas", "2"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1, message
    port = ports["RTML_SERVING_PORT"] + PORT_STEP
    assert message == (f"rtml: port {port} on 127.0.0.1 is taken (Address already in use); serving.1 cannot "
                       "listen there: stop what uses it or set RTML_SERVING_PORT")  # fmt: skip
    assert not (tmp_path / "logs" / "broker.log").exists()
