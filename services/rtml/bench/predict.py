"""Serving latency and throughput: ``POST /v1/predict`` at fixed concurrency, ``GET /healthz`` as baseline.

The baseline runs through the same client and concurrency, so the ratio predict/healthz separates what
serving does (feature read, ONNX, prediction log) from HTTP and load-generator overhead. The default client
is the minimal keep-alive one (``rawhttp``): on 2 cores httpx's ~1 ms of client CPU per request would be the
bottleneck being measured. Client CPU per request is reported either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal

import httpx
import orjson

from rtml.bench.common import JSON_HEADERS, BenchError, auth_headers, machine, run_id
from rtml.bench.rawhttp import RawConnection, build_request
from rtml.bench.stats import latency_summary, ratio
from rtml.core.settings import Settings

WARMUP_S = 0.3
Client = Literal["raw", "httpx"]
Send = Callable[[int], Awaitable[int]]  # request number -> HTTP status


class _Target:
    """One endpoint driven by either client: ``sender()`` yields a per-worker send function."""

    def __init__(
        self,
        settings: Settings,
        client: Client,
        method: str,
        path: str,
        bodies: Sequence[bytes],
        headers: dict[str, str],
        shared: httpx.AsyncClient,
    ) -> None:
        self.host, self.port = settings.host, settings.serving_port
        self.client, self.method, self.path = client, method, path
        self.url = f"http://{self.host}:{self.port}{path}"
        self.bodies, self.headers, self.shared = bodies, headers, shared
        self.raw = [build_request(method, self.host, self.port, path, b, headers) for b in bodies]

    @contextlib.asynccontextmanager
    async def sender(self) -> AsyncIterator[Send]:
        if self.client == "raw":
            async with RawConnection(self.host, self.port) as conn:

                async def send_raw(i: int) -> int:
                    return (await conn.request(self.raw[i % len(self.raw)]))[0]

                yield send_raw
            return

        async def send_httpx(i: int) -> int:
            if self.method == "POST":
                r = await self.shared.post(self.url, content=self.bodies[i % len(self.bodies)], headers=self.headers)
            else:
                r = await self.shared.get(self.url, headers=self.headers)
            return r.status_code

        yield send_httpx


async def _drive(target: _Target, *, concurrency: int, duration_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    phase = {"measure": False, "end": time.perf_counter() + WARMUP_S}
    ready = asyncio.Event()

    async def worker(k: int) -> None:
        async with target.sender() as send:
            i = k
            while True:
                now = time.perf_counter()
                if now >= phase["end"]:
                    if phase["measure"]:
                        return
                    await ready.wait()
                    continue
                t0 = time.perf_counter()
                status = await send(i)
                if phase["measure"]:
                    latencies.append(time.perf_counter() - t0)
                    statuses[status] += 1
                i += concurrency

    tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
    await asyncio.sleep(WARMUP_S + 0.05)  # warm-up on every connection, results dropped
    cpu0 = time.process_time()
    started = time.perf_counter()
    phase.update(measure=True, end=started + duration_s)
    ready.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    ok = statuses.get(200, 0)
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
    client: Client = "raw",
) -> dict[str, Any]:
    """req/s and p50/p99/max of predict at each concurrency; ``duration_s`` is split over all phases."""
    if client not in ("raw", "httpx"):
        raise ValueError(f"client must be raw or httpx, not {client!r}")
    rid = run_id()
    hdrs = {**JSON_HEADERS, **auth_headers(settings, "predict")}
    bodies = []
    for i in range(max(users, items)):
        req: dict[str, Any] = {"entities": {"user_id": f"u{i % users}", "item_id": f"t{i % items}"}}
        if model:
            req["model"] = model
        bodies.append(orjson.dumps(req))
    phase_s = max(1.0, duration_s / (2 * max(1, len(concurrency))))
    levels: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=max(concurrency) + 2)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as shared:
        url = f"http://{settings.host}:{settings.serving_port}/v1/predict"
        first = await shared.post(url, content=bodies[0], headers=hdrs)
        if first.status_code != 200:
            raise BenchError(f"POST {url} answered {first.status_code}: {first.text[:200]}")
        answer = orjson.loads(first.content)
        predict = _Target(settings, client, "POST", "/v1/predict", bodies, hdrs, shared)
        healthz = _Target(settings, client, "GET", "/healthz", [b""], {}, shared)
        for c in concurrency:
            health = await _drive(healthz, concurrency=c, duration_s=phase_s)
            pred = await _drive(predict, concurrency=c, duration_s=phase_s)
            if pred["errors"]:
                raise BenchError(f"predict answered errors at concurrency {c}: {pred['errors']}")
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
            "client": client,
        },
        "levels": levels,
        "targets": {},  # no numeric target in the issue: reported for tracking, compared with /healthz
    }
