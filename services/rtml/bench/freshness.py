"""Freshness: how long from ``POST /v1/events`` until a read of the features service shows the event.

A steady background load (``rate`` events/s, one batch every 50 ms) runs while probes, ``probes_per_s``
of them, each post one ``click`` for a fresh user and poll ``user_clicks_5m`` of that user every ~2 ms
until it reads 1. Baseline in the same run: the latency of a read that needs no update (the probe loop's
own floor), measured on the same client under the same load. The server's own histograms (accept ->
applied, event time -> applied) are scraped before and after and reported from their delta.
"""

from __future__ import annotations

import asyncio
import time
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
from rtml.bench.ingest import FRESHNESS, LAG, view_events
from rtml.bench.stats import delta_buckets, histogram_summary, latency_summary, ratio
from rtml.core.settings import Settings

TARGET_RATE = 2000
TARGET_P99_MS = 50
TICK_S = 0.05
POLL_S = 0.002
PROBE_TIMEOUT_S = 5.0
FEATURE = "user_clicks_5m"


async def _read_value(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> int:
    r = await client.get(url, headers=headers)
    if r.status_code != 200:
        raise BenchError(f"GET {url} answered {r.status_code}: {r.text[:200]}")
    value = orjson.loads(r.content)["features"][FEATURE]
    return int(value or 0)


async def bench_freshness(
    settings: Settings,
    *,
    rate: int = TARGET_RATE,
    duration_s: float = 10,
    probes_per_s: float = 20,
    users: int = 1000,
    items: int = 100,
) -> dict[str, Any]:
    """Send->visible latency of single events under a steady load of ``rate`` events/s for ``duration_s``."""
    rid = run_id()
    prefix = f"bench-{rid}"
    ingest_url, features_url = service_url(settings, "ingest"), service_url(settings, "features")
    ingest_hdrs = {**JSON_HEADERS, **auth_headers(settings, "ingest")}
    read_hdrs = auth_headers(settings, "read")
    per_tick = max(1, round(rate * TICK_S))
    ticks_per_body = max(1, -(-users // per_tick))
    bodies = [
        orjson.dumps({"events": view_events(prefix, per_tick, users, items, k * per_tick)})
        for k in range(max(8, ticks_per_body))
    ]

    load_accepted = 0
    load_errors = 0
    load_latency: list[float] = []
    probe_latency: list[float] = []
    probe_post: list[float] = []
    probe_polls: list[int] = []
    floor_latency: list[float] = []
    timeouts = 0

    async with (
        httpx.AsyncClient(timeout=30.0) as load_client,
        httpx.AsyncClient(timeout=30.0) as probe_client,
    ):
        # Warm-up: connections open, a stable entity exists for the floor reads.
        stable = f"{prefix}-stable"
        r = await probe_client.post(
            f"{ingest_url}/v1/events", headers=ingest_hdrs, content=orjson.dumps({"type": "click", "user_id": stable})
        )
        if r.status_code != 202:
            raise BenchError(f"ingest answered {r.status_code}: {r.text[:200]}")
        stable_url = f"{features_url}/v1/features/user/{stable}?features={FEATURE}"
        warm_deadline = time.perf_counter() + 10
        while await _read_value(probe_client, stable_url, read_hdrs) < 1:
            if time.perf_counter() > warm_deadline:
                raise BenchError("the warm-up event did not become visible within 10 s; is the features service up?")
            await asyncio.sleep(0.01)
        await load_client.post(f"{ingest_url}/v1/events", headers=ingest_hdrs, content=bodies[0])

        before = await scrape_histograms(probe_client, features_url, [FRESHNESS, LAG])
        started = time.perf_counter()
        end = started + duration_s
        inflight: set[asyncio.Task[None]] = set()

        async def post_load(body: bytes) -> None:
            nonlocal load_accepted, load_errors
            t0 = time.perf_counter()
            resp = await load_client.post(f"{ingest_url}/v1/events", headers=ingest_hdrs, content=body)
            load_latency.append(time.perf_counter() - t0)
            if resp.status_code == 202:
                load_accepted += int(orjson.loads(resp.content)["accepted"])
            else:
                load_errors += 1

        async def load() -> None:
            k = 0
            while True:
                at = started + k * TICK_S
                if at >= end:
                    break
                delay = at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(post_load(bodies[k % len(bodies)]))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                k += 1

        async def probe(i: int) -> None:
            nonlocal timeouts
            user = f"{prefix}-p{i}"
            url = f"{features_url}/v1/features/user/{user}?features={FEATURE}"
            body = orjson.dumps({"type": "click", "user_id": user})
            t0 = time.perf_counter()
            resp = await probe_client.post(f"{ingest_url}/v1/events", headers=ingest_hdrs, content=body)
            probe_post.append(time.perf_counter() - t0)
            if resp.status_code != 202:
                raise BenchError(f"probe post answered {resp.status_code}: {resp.text[:200]}")
            polls = 0
            while True:
                polls += 1
                if await _read_value(probe_client, url, read_hdrs) >= 1:
                    probe_latency.append(time.perf_counter() - t0)
                    probe_polls.append(polls)
                    return
                if time.perf_counter() - t0 > PROBE_TIMEOUT_S:
                    timeouts += 1
                    return
                await asyncio.sleep(POLL_S)

        async def probes() -> None:
            tasks = []
            i = 0
            while True:
                at = started + 0.1 + i / probes_per_s  # let the load settle for 100 ms
                if at >= end:
                    break
                delay = at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(probe(i)))
                i += 1
            await asyncio.gather(*tasks)

        async def floor() -> None:
            # Reads that need no update, paced like a probe's polls, on the probes' client.
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                await _read_value(probe_client, stable_url, read_hdrs)
                floor_latency.append(time.perf_counter() - t0)
                await asyncio.sleep(max(POLL_S, 1 / (probes_per_s * 5)))

        await asyncio.gather(load(), probes(), floor())
        if inflight:
            await asyncio.gather(*list(inflight))
        load_s = time.perf_counter() - started
        await asyncio.sleep(0.5)  # let the tail of the load be applied before the "after" scrape
        after = await scrape_histograms(probe_client, features_url, [FRESHNESS, LAG])

    visible = latency_summary(probe_latency)
    floor_summary = latency_summary(floor_latency)
    achieved = round(load_accepted / load_s, 1)
    server = histogram_summary(delta_buckets(after.get(FRESHNESS, {}), before.get(FRESHNESS, {})))
    return {
        "bench": "freshness",
        "run_id": rid,
        "machine": machine(),
        "params": {
            "rate": rate,
            "duration_s": duration_s,
            "probes_per_s": probes_per_s,
            "batch_every_ms": 50,
            "batch": per_tick,
            "poll_every_ms": POLL_S * 1000,
            "feature": FEATURE,
        },
        "load": {
            "target_events_per_s": rate,
            "achieved_events_per_s": achieved,
            "accepted": load_accepted,
            "http_errors": load_errors,
            "request_latency": latency_summary(load_latency),
        },
        "probe_send_to_visible": visible,
        "probe_post_ack": latency_summary(probe_post),
        "probe_polls_median": sorted(probe_polls)[len(probe_polls) // 2] if probe_polls else None,
        "probe_timeouts": timeouts,
        "baseline_read_floor": floor_summary,
        "ratio_to_floor": {
            "p50": ratio(visible["p50_ms"], floor_summary["p50_ms"]),
            "p99": ratio(visible["p99_ms"], floor_summary["p99_ms"]),
        },
        "server_freshness": server,
        "server_event_lag": histogram_summary(delta_buckets(after.get(LAG, {}), before.get(LAG, {}))),
        "targets": {
            "achieved_events_per_s": target(achieved, rate * 0.95, at_most=False),
            "probe_p99_ms": target(visible["p99_ms"], TARGET_P99_MS),
            "server_freshness_p99_ms": target(server["p99_ms"], TARGET_P99_MS),
            "probe_timeouts": target(timeouts, 0),
        },
    }
