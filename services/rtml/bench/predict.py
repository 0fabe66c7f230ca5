"""Serving latency and throughput: ``POST /v1/predict`` at fixed concurrency, ``GET /healthz`` as baseline.

The baseline runs through the same client, connection pool and concurrency, so the ratio predict/healthz
separates what serving does (feature read, ONNX, prediction log) from HTTP and load-generator overhead.
Client CPU per request is reported too: on a small machine the load generator shares the cores.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from rtml.bench.common import JSON_HEADERS, BenchError, auth_headers, machine, run_id, service_url
from rtml.bench.stats import latency_summary, ratio
from rtml.core.settings import Settings

WARMUP_S = 0.3


async def _drive(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    bodies: Sequence[bytes],
    *,
    concurrency: int,
    duration_s: float,
    headers: dict[str, str],
) -> dict[str, Any]:
    async def one(i: int) -> int:
        if method == "POST":
            r = await client.post(url, content=bodies[i % len(bodies)], headers=headers)
        else:
            r = await client.get(url, headers=headers)
        return r.status_code

    warm_end = time.perf_counter() + WARMUP_S

    async def warm(k: int) -> None:
        i = k
        while time.perf_counter() < warm_end:
            await one(i)
            i += concurrency

    await asyncio.gather(*(warm(k) for k in range(concurrency)))

    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    deadline = time.perf_counter() + duration_s

    async def worker(k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            statuses[await one(i)] += 1
            latencies.append(time.perf_counter() - t0)
            i += concurrency

    cpu0 = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    ok = sum(v for k, v in statuses.items() if k == 200)
    return {
        "requests": len(latencies),
        "errors": {str(k): v for k, v in statuses.items() if k != 200},
        "req_per_s": round(ok / elapsed, 1),
        **latency_summary(latencies),
        "client_cpu_us_per_req": round(cpu / max(1, len(latencies)) * 1e6, 1),
    }


async def bench_predict(
    settings: Settings,
    *,
    duration_s: float = 10,
    concurrency: Sequence[int] = (1, 16),
    model: str | None = None,
    users: int = 1000,
    items: int = 100,
) -> dict[str, Any]:
    """req/s and p50/p99/max of predict at each concurrency; ``duration_s`` is split over all phases."""
    rid = run_id()
    url = service_url(settings, "serving")
    hdrs = {**JSON_HEADERS, **auth_headers(settings, "predict")}
    bodies = []
    for i in range(max(users, items)):
        req: dict[str, Any] = {"entities": {"user_id": f"u{i % users}", "item_id": f"t{i % items}"}}
        if model:
            req["model"] = model
        bodies.append(orjson.dumps(req))
    phase_s = max(1.0, duration_s / (2 * max(1, len(concurrency))))
    levels: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=max(concurrency) + 2)) as client:
        probe = await client.post(f"{url}/v1/predict", content=bodies[0], headers=hdrs)
        if probe.status_code != 200:
            raise BenchError(f"POST {url}/v1/predict answered {probe.status_code}: {probe.text[:200]}")
        answer = orjson.loads(probe.content)
        for c in concurrency:
            health = await _drive(client, "GET", f"{url}/healthz", [b""], concurrency=c, duration_s=phase_s, headers={})
            pred = await _drive(
                client, "POST", f"{url}/v1/predict", bodies, concurrency=c, duration_s=phase_s, headers=hdrs
            )
            levels.append(
                {
                    "concurrency": c,
                    "predict": pred,
                    "baseline_healthz": health,
                    "ratio_to_healthz": {
                        "p50": ratio(pred["p50_ms"], health["p50_ms"]),
                        "p99": ratio(pred["p99_ms"], health["p99_ms"]),
                        "req_per_s": ratio(pred["req_per_s"], health["req_per_s"]),
                    },
                }
            )
    return {
        "bench": "predict",
        "run_id": rid,
        "machine": machine(),
        "params": {
            "duration_s": duration_s,
            "phase_s": phase_s,
            "concurrency": list(concurrency),
            "model": answer.get("model"),
            "version": answer.get("version"),
            "client": "httpx",
        },
        "levels": levels,
        "targets": {},  # no numeric target in the issue: reported for tracking, compared with /healthz
    }
