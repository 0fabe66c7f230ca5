"""Ingest throughput: HTTP ingest -> broker -> features consumer -> Redis, with nothing lost.

Each repeat has two phases on the same machine, back to back:

- **baseline**: the same events published straight to a scratch topic with the platform's own producer
  (``Producer.send_many``, acks=all) at the same concurrency — the broker's ceiling on this machine;
- **platform**: pre-serialized ``view`` batches posted to ``POST /v1/events``, then polling the features
  service until the lifetime feature ``user_views_total`` summed over the run's users equals the accepted
  count. End-to-end rate = accepted / (time until everything is applied).

The features service's own ``rtml_features_freshness_seconds`` histogram is scraped before and after each
platform phase, so freshness at that rate comes from the server (accept -> applied), not from polling.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import orjson

from rtml.bench.common import (
    JSON_HEADERS,
    BenchError,
    auth_headers,
    machine,
    run_id,
    scrape_histograms,
    service_url,
    target,
)
from rtml.bench.stats import delta_buckets, histogram_summary, latency_summary, median, ratio, rnd
from rtml.core.kafka import Producer, create_topics
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms

SCRATCH_TOPIC = "bench"
FRESHNESS = "rtml_features_freshness_seconds"
LAG = "rtml_features_event_lag_seconds"
TARGET_E2E_EVENTS_PER_S = 20_000
TARGET_FRESHNESS_P99_MS = 250
BASELINE_MAX_EVENTS = 500_000  # unpaced runs: enough for a stable rate, little enough for a memory-only broker


def view_events(prefix: str, n: int, users: int, items: int, offset: int = 0) -> list[dict[str, Any]]:
    """``n`` view events spreading round-robin over ``users`` users and ``items`` items of this run."""
    return [
        {"type": "view", "user_id": f"{prefix}-u{(offset + i) % users}", "item_id": f"{prefix}-t{(offset + i) % items}"}
        for i in range(n)
    ]


def batch_bodies(prefix: str, *, batch: int, users: int, items: int, count: int) -> list[bytes]:
    """``count`` distinct pre-serialized ``{"events": [...]}`` bodies (no event_id: ingest makes one each)."""
    return [orjson.dumps({"events": view_events(prefix, batch, users, items, k * batch)}) for k in range(count)]


def user_ids(prefix: str, users: int) -> list[str]:
    return [f"{prefix}-u{i}" for i in range(users)]


async def applied_views(client: httpx.AsyncClient, features_url: str, ids: list[str], headers: dict[str, str]) -> int:
    """``user_views_total`` summed over ``ids`` (chunks of <= 1000 ids per batch read)."""
    total = 0
    for start in range(0, len(ids), 1000):
        body = {"entity": "user", "ids": ids[start : start + 1000], "features": ["user_views_total"]}
        r = await client.post(
            f"{features_url}/v1/features:batch", content=orjson.dumps(body), headers={**JSON_HEADERS, **headers}
        )
        if r.status_code != 200:
            raise BenchError(f"features batch read answered {r.status_code}: {r.text[:200]}")
        total += sum(int(row["features"]["user_views_total"] or 0) for row in orjson.loads(r.content))
    return total


async def _post_for(
    client: httpx.AsyncClient,
    url: str,
    bodies: list[bytes],
    per_body: int,
    *,
    duration_s: float,
    concurrency: int,
    headers: dict[str, str],
    rate: float | None = None,
) -> dict[str, Any]:
    """Keep up to ``concurrency`` requests in flight for ``duration_s`` (paced to ``rate`` events/s when
    given, else as fast as they are answered); per-request latencies and the accepted count."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    accepted = 0
    sent = 0
    start = time.perf_counter()
    deadline = start + duration_s
    hdrs = {**JSON_HEADERS, **headers}

    async def worker(k: int) -> None:
        nonlocal accepted, sent
        i = k
        while time.perf_counter() < deadline:
            if rate:
                due = start + sent * per_body / rate  # the shared schedule: request n leaves at n*batch/rate
                sent += 1
                if due >= deadline:
                    break
                if (wait := due - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
            body = bodies[i % len(bodies)]
            i += concurrency
            t0 = time.perf_counter()
            r = await client.post(url, content=body, headers=hdrs)
            latencies.append(time.perf_counter() - t0)
            statuses[r.status_code] += 1
            if r.status_code == 202:
                accepted += int(orjson.loads(r.content)["accepted"])

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "accepted": accepted,
        "elapsed_s": elapsed,
        "latencies": latencies,
        "statuses": dict(statuses),
        "offered": sum(statuses.values()) * per_body,
    }


async def _kafka_baseline(
    settings: Settings,
    *,
    duration_s: float,
    concurrency: int,
    batch: int,
    users: int,
    items: int,
    prefix: str,
    max_events: int,
) -> dict[str, Any]:
    """The same events in ingest's normalised shape, published straight to a scratch topic (acks=all), for
    ``duration_s`` or ``max_events``, whichever comes first: an uncapped baseline wrote ~3 million records a
    run, and the embedded broker, which keeps everything in memory, got slower run after run."""  # fmt: skip
    now = now_ms()
    records: list[tuple[bytes | None, bytes]] = []
    for ev in view_events(prefix, batch * 4, users, items):
        full = {"event_id": uuid.uuid4().hex, **ev, "ts": now, "received_at": now, "properties": {}}
        records.append((str(ev["user_id"]).encode(), orjson.dumps(full)))
    chunks = [records[k * batch : (k + 1) * batch] for k in range(4)]
    sent = 0
    async with Producer(settings) as producer:
        await producer.send_many(SCRATCH_TOPIC, chunks[0])  # warm-up: metadata, connections
        deadline = time.perf_counter() + duration_s

        async def worker(k: int) -> None:
            nonlocal sent
            i = k
            while time.perf_counter() < deadline and sent < max_events:
                await producer.send_many(SCRATCH_TOPIC, chunks[i % len(chunks)])
                sent += batch
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"events": sent, "elapsed_s": round(elapsed, 3), "events_per_s": round(sent / elapsed, 1)}


async def _platform_run(
    settings: Settings,
    *,
    duration_s: float,
    concurrency: int,
    batch: int,
    users: int,
    items: int,
    prefix: str,
    apply_timeout_s: float,
    rate: float | None,
) -> dict[str, Any]:
    ingest_url, features_url = service_url(settings, "ingest"), service_url(settings, "features")
    ids = user_ids(prefix, users)
    bodies = batch_bodies(prefix, batch=batch, users=users, items=items, count=max(2 * concurrency, -(-users // batch)))
    ingest_hdrs, read_hdrs = auth_headers(settings, "ingest"), auth_headers(settings, "read")
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        before = await scrape_histograms(client, features_url, [FRESHNESS, LAG])
        started = time.perf_counter()
        sent = await _post_for(
            client,
            f"{ingest_url}/v1/events",
            bodies,
            batch,
            duration_s=duration_s,
            concurrency=concurrency,
            headers=ingest_hdrs,
            rate=rate,
        )
        accepted = int(sent["accepted"])
        applied = 0
        apply_deadline = time.perf_counter() + apply_timeout_s
        while True:
            applied = await applied_views(client, features_url, ids, read_hdrs)
            done_at = time.perf_counter()
            if applied >= accepted:
                break
            if done_at > apply_deadline:
                raise BenchError(
                    f"ingest bench: {accepted - applied} of {accepted} accepted events not applied "
                    f"{apply_timeout_s:.0f} s after the last send (run {prefix})"
                )
            await asyncio.sleep(0.05)
        after = await scrape_histograms(client, features_url, [FRESHNESS, LAG])
    if applied != accepted:
        raise BenchError(f"ingest bench: features counted {applied} views but only {accepted} were accepted")
    e2e_s = done_at - started
    send_s = float(sent["elapsed_s"])
    return {
        "accepted": accepted,
        "http_errors": {str(k): v for k, v in sent["statuses"].items() if k != 202},
        "send_s": round(send_s, 3),
        "e2e_s": round(e2e_s, 3),
        "drain_s": round(e2e_s - send_s, 3),
        "http_events_per_s": round(accepted / send_s, 1),
        "e2e_events_per_s": round(accepted / e2e_s, 1),
        "lost": accepted - applied,
        "request_latency": latency_summary(sent["latencies"]),
        "server_freshness": histogram_summary(delta_buckets(after.get(FRESHNESS, {}), before.get(FRESHNESS, {}))),
        "server_event_lag": histogram_summary(delta_buckets(after.get(LAG, {}), before.get(LAG, {}))),
    }


async def bench_ingest(
    settings: Settings,
    *,
    duration_s: float = 10,
    concurrency: int = 8,
    batch: int = 500,
    users: int = 1000,
    items: int = 100,
    repeats: int = 3,
    apply_timeout_s: float = 60,
    rate: float | None = None,
) -> dict[str, Any]:
    """Sustained ingest -> features throughput with a same-run broker baseline.

    ``duration_s`` is the total sending time of the platform phases, split evenly over ``repeats`` runs
    (each also gets a baseline phase of the same length). Without ``rate`` the senders go as fast as ingest
    answers (capacity; features may fall behind and drain afterwards); with ``rate`` (events/s) they are
    paced, which is how the sustained-rate target is checked. Raises :class:`BenchError` if any accepted
    event is not applied within ``apply_timeout_s`` after the last send.
    """
    rid = run_id()
    per_run = max(1.0, duration_s / max(1, repeats))
    await create_topics(settings, [SCRATCH_TOPIC])
    runs: list[dict[str, Any]] = []
    for k in range(max(1, repeats)):
        prefix = f"bench-{rid}r{k}"
        base = await _kafka_baseline(
            settings, duration_s=per_run, concurrency=concurrency, batch=batch, users=users, items=items, prefix=prefix,
            max_events=int(rate * per_run) if rate else BASELINE_MAX_EVENTS,
        )  # fmt: skip
        run = await _platform_run(
            settings,
            duration_s=per_run,
            concurrency=concurrency,
            batch=batch,
            users=users,
            items=items,
            prefix=prefix,
            apply_timeout_s=apply_timeout_s,
            rate=rate,
        )
        run["baseline_kafka_events_per_s"] = base["events_per_s"]
        run["e2e_vs_baseline"] = ratio(run["e2e_events_per_s"], base["events_per_s"])
        runs.append(run)

    def med(path: tuple[str, ...]) -> float | None:
        vals: list[float | None] = []
        for r in runs:
            v: Any = r
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            vals.append(v)
        return rnd(median(vals), 3)

    e2e = med(("e2e_events_per_s",))
    fresh_p99 = med(("server_freshness", "p99_ms"))
    summary = {
        "accepted": sum(int(r["accepted"]) for r in runs),
        "lost": sum(int(r["lost"]) for r in runs),
        "http_events_per_s": med(("http_events_per_s",)),
        "e2e_events_per_s": e2e,
        "request_p50_ms": med(("request_latency", "p50_ms")),
        "request_p99_ms": med(("request_latency", "p99_ms")),
        "server_freshness_p50_ms": med(("server_freshness", "p50_ms")),
        "server_freshness_p99_ms": fresh_p99,
        "server_event_lag_p99_ms": med(("server_event_lag", "p99_ms")),
        "baseline_kafka_events_per_s": med(("baseline_kafka_events_per_s",)),
        "e2e_vs_baseline": med(("e2e_vs_baseline",)),
    }
    return {
        "bench": "ingest",
        "run_id": rid,
        "machine": machine(),
        "params": {
            "duration_s": duration_s,
            "run_duration_s": per_run,
            "repeats": repeats,
            "rate": rate or "unpaced (as fast as ingest answers)",
            "concurrency": concurrency,
            "batch": batch,
            "users": users,
            "items": items,
            "event": "view (touches user and item features)",
        },
        "median": summary,
        "runs": runs,
        "targets": {
            "e2e_events_per_s": target(e2e, TARGET_E2E_EVENTS_PER_S, at_most=False),
            "lost": target(summary["lost"], 0),
            "server_freshness_p99_ms_at_this_rate": target(fresh_p99, TARGET_FRESHNESS_P99_MS),
        },
    }
