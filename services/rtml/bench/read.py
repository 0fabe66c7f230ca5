"""One-entity read cost: wall time, client CPU and Redis round trips of ``FeatureStore.read_many``.

In process, against Redis: ``features`` windowed features of mixed aggregations on one user that has seen
~500 events. Baseline in the same run and on the same client: ``PING`` (one round trip, nothing to do).
Round trips are counted by Redis itself (``INFO commandstats``, ``cmdstat_evalsha`` calls); other clients
calling EVALSHA on the same Redis at the same time would inflate the count, so run it on a quiet stack.
"""

from __future__ import annotations

import time
from typing import Any

from rtml.bench.common import machine, run_id, target
from rtml.bench.stats import latency_summary, median, ratio, rnd
from rtml.bench.workload import events_for, mixed_config
from rtml.core.redis import Keys, Redis, connect
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.features.store import FeatureStore

TARGET_ROUND_TRIPS = 1
TARGET_CPU_US = 150


async def evalsha_stats(redis: Redis) -> tuple[int, int]:
    """(calls, total server µs) of EVALSHA so far, from ``INFO commandstats``."""
    stats = await redis.info("commandstats")
    entry = stats.get("cmdstat_evalsha") or {}
    if not isinstance(entry, dict):
        return 0, 0
    return int(entry.get("calls", 0)), int(entry.get("usec", 0))


async def _delete_prefix(redis: Redis, prefix: str) -> None:
    batch: list[Any] = []
    async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await redis.delete(*batch)
            batch = []
    if batch:
        await redis.delete(*batch)


async def bench_read(
    settings: Settings, *, features: int = 20, n: int = 5000, events: int = 500, repeats: int = 3
) -> dict[str, Any]:
    """Per-read wall µs (p50/p99), client CPU µs and Redis round trips; PING on the same client as baseline.

    ``n`` reads in ``repeats`` blocks alternating with equal blocks of PING; CPU is the median over blocks.
    """
    rid = run_id()
    prefix = f"{settings.redis.key_prefix}bench-{rid}:"
    config = mixed_config(features)
    redis = connect(settings)
    store = FeatureStore(redis, Keys(prefix), config)
    try:
        await store.warm_up()
        user = "u0"
        now = now_ms()
        evs = events_for(user, events, now, spread_ms=50 * 60_000)
        for start in range(0, len(evs), 100):
            await store.apply(evs[start : start + 100], now=now)
        request = [("user", user, None)]
        for _ in range(200):  # warm-up: read plan cached, connection open, CPU caches hot
            await store.read_many(request)
        values = (await store.read_many(request))[0]

        for _ in range(200):
            await redis.ping()
        wall: list[float] = []
        ping_wall: list[float] = []
        cpu_read: list[float] = []
        cpu_ping: list[float] = []
        per_block = max(1, n // max(1, repeats))
        calls = usec = 0
        for _ in range(max(1, repeats)):  # alternate blocks so both see the same machine noise
            calls0, usec0 = await evalsha_stats(redis)
            cpu0 = time.process_time()
            for _ in range(per_block):
                t0 = time.perf_counter()
                await store.read_many(request)
                wall.append(time.perf_counter() - t0)
            cpu_read.append((time.process_time() - cpu0) / per_block)
            calls1, usec1 = await evalsha_stats(redis)
            calls, usec = calls + calls1 - calls0, usec + usec1 - usec0
            cpu0 = time.process_time()
            for _ in range(per_block):
                t0 = time.perf_counter()
                await redis.ping()
                ping_wall.append(time.perf_counter() - t0)
            cpu_ping.append((time.process_time() - cpu0) / per_block)
        await _delete_prefix(redis, prefix)
    finally:
        await store.aclose()
        await redis.aclose()

    read = latency_summary(wall, "us")
    ping = latency_summary(ping_wall, "us")
    reads = per_block * max(1, repeats)
    round_trips = calls / reads
    cpu_us = rnd((median(cpu_read) or 0.0) * 1e6, 1)
    ping_cpu_us = rnd((median(cpu_ping) or 0.0) * 1e6, 1)
    return {
        "bench": "read",
        "run_id": rid,
        "machine": machine(),
        "params": {
            "features": features,
            "reads": reads,
            "repeats": repeats,
            "events_applied": events,
            "entity": "user",
            "aggs": sorted({f.agg for f in config.features.values()}),
            "non_null_values": sum(v is not None for v in values.values()),
        },
        "read": {
            **read,
            "client_cpu_us": cpu_us,
            "client_cpu_us_per_block": [rnd(c * 1e6, 1) for c in cpu_read],
            "round_trips_per_read": round_trips,
            "redis_server_us_per_read": rnd(usec / calls if calls else None, 1),
        },
        "baseline_ping": {**ping, "client_cpu_us": ping_cpu_us},
        "ratio_to_ping": {
            "wall_p50": ratio(read["p50_us"], ping["p50_us"]),
            "wall_p99": ratio(read["p99_us"], ping["p99_us"]),
            "client_cpu": ratio(cpu_us, ping_cpu_us),
        },
        "targets": {
            "round_trips_per_read": target(round_trips, TARGET_ROUND_TRIPS),
            "client_cpu_us_per_read": target(cpu_us, TARGET_CPU_US),
        },
    }
