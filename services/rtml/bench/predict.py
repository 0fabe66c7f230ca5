"""Serving latency and throughput at fixed concurrency, against a baseline app measured in the same run.

``bench predict`` drives ``POST /v1/predict`` and ``bench recommend`` ``POST /v1/recommend`` (100 candidates
by default) at each concurrency (1 and 16 by default). The baseline is ``benchmarks/baseline_app.py``: a plain
FastAPI endpoint doing a redis-py ``HGETALL`` (one pipeline of N for recommend) and scikit-learn
``predict_proba``, started as a subprocess. Rounds are interleaved (rtml, baseline, rtml, baseline, ...) and
the medians over rounds are reported, with the ratios rtml / baseline.

The client is ``wrk`` when it is on PATH, else the minimal keep-alive asyncio client (``rawhttp``): on 2
cores httpx's ~1 ms of client CPU per request would be the bottleneck being measured. ``client`` in the JSON
says which one ran.

``bench predict --swap`` is the hot-swap benchmark (:mod:`rtml.bench.swap`): the same requests, while a new
version of the live model is promoted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from rtml.bench.baseline import running_baseline
from rtml.bench.common import JSON_HEADERS, BenchError, auth_headers, machine, run_id, target
from rtml.bench.rawhttp import RawConnection, build_request
from rtml.bench.stats import latency_summary, median, ratio
from rtml.bench.wrk import run_wrk, wrk_path
from rtml.core.config import load_config
from rtml.core.settings import Settings

WARMUP_S = 0.2
MIN_PHASE_S = 0.2
Client = Literal["auto", "wrk", "raw", "httpx"]
Kind = Literal["predict", "recommend"]
Send = Callable[[int], Awaitable[int]]  # request number -> HTTP status
CLIENT_NAMES = {"wrk": "wrk", "raw": "asyncio-raw", "httpx": "httpx"}
SUMMARY_KEYS = ("req_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms")


@dataclass
class Endpoint:
    """One POST endpoint and the bodies sent to it in turn."""

    host: str
    port: int
    path: str
    bodies: Sequence[bytes]
    headers: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


class _Target:
    """One endpoint driven by the raw or httpx client: ``sender()`` yields a per-worker send function."""

    def __init__(self, ep: Endpoint, client: Client, shared: httpx.AsyncClient) -> None:
        self.ep, self.client, self.shared = ep, client, shared
        self.raw = [build_request("POST", ep.host, ep.port, ep.path, b, ep.headers) for b in ep.bodies]

    @contextlib.asynccontextmanager
    async def sender(self) -> AsyncIterator[Send]:
        if self.client == "raw":
            async with RawConnection(self.ep.host, self.ep.port) as conn:

                async def send_raw(i: int) -> int:
                    return (await conn.request(self.raw[i % len(self.raw)]))[0]

                yield send_raw
            return

        async def send_httpx(i: int) -> int:
            body = self.ep.bodies[i % len(self.ep.bodies)]
            return (await self.shared.post(self.ep.url, content=body, headers=self.ep.headers)).status_code

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
    summary = latency_summary(latencies)
    return {
        "requests": len(latencies),
        "errors": len(latencies) - ok,
        "error_kinds": {str(k): v for k, v in statuses.items() if k != 200},
        "req_per_s": round(ok / elapsed, 1),
        **{k: summary[k] for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")},
        "client_cpu_us_per_req": round(cpu / max(1, len(latencies)) * 1e6, 1),
    }


async def _measure(
    ep: Endpoint, client: Client, shared: httpx.AsyncClient, *, concurrency: int, duration_s: float
) -> dict[str, Any]:
    if client == "wrk":
        return await run_wrk(
            ep.url, method="POST", bodies=ep.bodies, headers=ep.headers, concurrency=concurrency, duration_s=duration_s
        )
    return await _drive(_Target(ep, client, shared), concurrency=concurrency, duration_s=duration_s)


def _medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: median(r[k] for r in rounds) for k in SUMMARY_KEYS}
    out["requests"] = sum(r["requests"] for r in rounds)
    out["errors"] = sum(r["errors"] for r in rounds)
    kinds: Counter[str] = Counter()
    for r in rounds:
        kinds.update(r["error_kinds"])
    out["error_kinds"] = dict(kinds)
    return out


def request_bodies(
    kind: Kind, *, users: int, items: int, candidates: int = 100, k: int = 10, model: str | None = None
) -> tuple[list[bytes], list[bytes]]:
    """(rtml bodies, baseline bodies): users ``u0..`` and items ``t0..`` cycled, ``max(users, items)`` of each."""
    item_ids = [f"t{j}" for j in range(items)]
    rtml_bodies: list[bytes] = []
    base_bodies: list[bytes] = []
    for i in range(max(users, items)):
        user, item = f"u{i % users}", item_ids[i % items]
        if kind == "predict":
            req: dict[str, Any] = {"entities": {"user_id": user, "item_id": item}}
            base: dict[str, Any] = {"user_id": user, "item_id": item}
        else:
            cands = [item_ids[(i + j) % items] for j in range(candidates)]
            req = {"user_id": user, "candidates": cands, "k": k}
            base = {"user_id": user, "candidates": cands, "k": k}
        if model:
            req["model"] = model
        rtml_bodies.append(orjson.dumps(req))
        base_bodies.append(orjson.dumps(base))
    return rtml_bodies, base_bodies


def resolve_client(client: Client) -> Literal["wrk", "raw", "httpx"]:
    if client not in ("auto", "wrk", "raw", "httpx"):
        raise ValueError(f"client must be auto, wrk, raw or httpx, not {client!r}")
    if client == "auto":
        return "wrk" if wrk_path() else "raw"
    if client == "wrk" and not wrk_path():
        raise BenchError("--client wrk: wrk is not on PATH (Debian: apt-get install wrk)")
    return client


def _model_features(settings: Settings, model: str | None) -> int:
    """How many inputs rtml's model has (the baseline model gets as many); 3 when the config cannot say."""
    with contextlib.suppress(Exception):
        models = load_config(settings.platform_config_path()).models
        return len(models[model].features) if model in models else len(next(iter(models.values())).features)
    return 3


def _targets(kind: Kind, levels: dict[int, dict[str, Any]]) -> dict[str, Any]:
    def get(c: int, side: str, key: str) -> float | None:
        level = levels.get(c)
        return None if level is None else level[side].get(key) if side != "ratio" else level["ratio_to_baseline"][key]

    out: dict[str, Any] = {}
    if kind == "predict":
        out["c1_p50_ms"] = target(get(1, "rtml", "p50_ms"), 0.5)
        out["c1_p99_ms"] = target(get(1, "rtml", "p99_ms"), 1.5)
        out["c16_req_per_s"] = target(get(16, "rtml", "req_per_s"), 3500, at_most=False)
        out["c16_p99_ms"] = target(get(16, "rtml", "p99_ms"), 8)
    else:
        out["c1_p99_ms"] = target(get(1, "rtml", "p99_ms"), 5)
    out["c1_req_per_s_vs_baseline"] = target(get(1, "ratio", "req_per_s"), 3.5, at_most=False)
    out["c16_req_per_s_vs_baseline"] = target(get(16, "ratio", "req_per_s"), 15, at_most=False)
    return out


async def bench_serving(
    kind: Kind,
    settings: Settings,
    *,
    duration_s: float = 8,
    concurrency: Sequence[int] = (1, 16),
    rounds: int = 3,
    model: str | None = None,
    users: int = 1000,
    items: int = 100,
    candidates: int = 100,
    k: int = 10,
    client: Client = "auto",
) -> dict[str, Any]:
    """Interleaved rounds of rtml and the baseline at each concurrency; ``duration_s`` is split over all phases."""
    used = resolve_client(client)
    concurrency = tuple(concurrency)
    if not concurrency or rounds < 1:
        raise ValueError("need at least one concurrency level and one round")
    rid = run_id()
    hdrs = {**JSON_HEADERS, **auth_headers(settings, "predict")}
    if kind == "recommend":
        items = max(items, candidates)
    item_ids = [f"t{j}" for j in range(items)]
    rtml_bodies, base_bodies = request_bodies(kind, users=users, items=items, candidates=candidates, k=k, model=model)
    path = f"/v1/{kind}"
    rtml_ep = Endpoint(settings.host, settings.serving_port, path, rtml_bodies, hdrs)
    phase_s = max(MIN_PHASE_S, duration_s / (2 * rounds * len(concurrency)))
    if used == "wrk":
        phase_s = float(max(1, math.ceil(phase_s)))  # wrk runs whole seconds
    prefix = f"{settings.redis.key_prefix}bench-{rid}:base:"
    seeded = [f"u{i}" for i in range(users)] + item_ids
    limits = httpx.Limits(max_connections=max(concurrency) + 2)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as shared:
        first = await shared.post(rtml_ep.url, content=rtml_bodies[0], headers=hdrs)
        if first.status_code != 200:
            raise BenchError(f"POST {rtml_ep.url} answered {first.status_code}: {first.text[:200]}")
        answer = orjson.loads(first.content)
        n_features = _model_features(settings, answer.get("model") or model)
        async with running_baseline(settings, prefix, seeded, n_features) as baseline:
            base_ep = Endpoint(baseline.host, baseline.port, f"/{kind}", base_bodies, JSON_HEADERS)
            check = await shared.post(base_ep.url, content=base_bodies[0], headers=JSON_HEADERS)
            if check.status_code != 200:
                raise BenchError(f"the baseline answered {check.status_code}: {check.text[:200]}")
            levels: dict[int, dict[str, Any]] = {}
            for c in concurrency:
                per_round: list[dict[str, Any]] = []
                for _ in range(rounds):
                    ours = await _measure(rtml_ep, used, shared, concurrency=c, duration_s=phase_s)
                    theirs = await _measure(base_ep, used, shared, concurrency=c, duration_s=phase_s)
                    per_round.append({"rtml": ours, "baseline": theirs})
                mine = _medians([r["rtml"] for r in per_round])
                base_m = _medians([r["baseline"] for r in per_round])
                levels[c] = {
                    "concurrency": c,
                    "rtml": mine,
                    "baseline": base_m,
                    "ratio_to_baseline": {
                        "req_per_s": ratio(mine["req_per_s"], base_m["req_per_s"]),
                        "p50_ms": ratio(mine["p50_ms"], base_m["p50_ms"]),
                        "p99_ms": ratio(mine["p99_ms"], base_m["p99_ms"]),
                    },
                    "rounds": per_round,
                }
    params: dict[str, Any] = {
        "duration_s": duration_s,
        "phase_s": round(phase_s, 3),
        "rounds": rounds,
        "concurrency": list(concurrency),
        "model": answer.get("model"),
        "version": answer.get("version"),
        "model_features": n_features,
        "users": users,
        "items": items,
    }
    if kind == "recommend":
        params.update(candidates=candidates, k=k)
    return {
        "bench": kind,
        "run_id": rid,
        "machine": machine(),
        "client": CLIENT_NAMES[used],
        "params": params,
        "baseline": {
            "app": "benchmarks/baseline_app.py",
            "what": "FastAPI + redis-py asyncio HGETALL"
            + (" (one pipeline of N)" if kind == "recommend" else "")
            + " + sklearn GradientBoostingClassifier.predict_proba",
        },
        "levels": list(levels.values()),
        "targets": _targets(kind, levels),
    }


async def bench_predict(settings: Settings, *, swap: bool = False, **opts: Any) -> dict[str, Any]:
    """``POST /v1/predict`` vs the baseline: req/s, p50/p90/p99 and errors at each concurrency, medians.

    ``swap=True`` runs the hot-swap benchmark instead (:func:`rtml.bench.swap.bench_swap`): the same requests
    at one concurrency while a new version of the live model is promoted.
    """
    if swap:
        from rtml.bench.swap import bench_swap  # it builds on this module (request bodies, warm-up)

        return await bench_swap(settings, **opts)
    return await bench_serving("predict", settings, **opts)
