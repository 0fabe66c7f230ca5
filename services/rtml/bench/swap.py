"""Hot swap under load (``rtml bench predict --swap``): what a promotion costs the requests in flight.

Each round drives ``POST /v1/predict`` at a fixed concurrency with the keep-alive asyncio client
(``rawhttp``; wrk cannot give per-request timestamps, statuses and the ``version`` of each answer), for
``before`` seconds of steady load; then it promotes a new version of the live model through the admin API
(``POST /v1/models/{name}/promote``) and keeps the load on for ``after`` seconds. The new version is a copy of
the live one: its ONNX bytes and metadata are read from Redis (``ModelRegistry.get``) and uploaded with
``POST /v1/models/{name}/versions`` before the load starts, so serving really builds, warms and swaps a new
session while the model's answers stay the same. Each round leaves its copy live.

Per round, from every request's send/receive times, status and answered version:
- ``failed``: non-200 answers and transport errors (overall, and during the swap);
- ``swap_s``: seconds from the promote call until every later answer on a connection carries the new version
  (the slowest connection);
- latency in the steady window before the promote call, ``during`` the swap (answers received after the
  promote call from requests sent before the swap completed + ``SETTLE_S``), and after; their p99 ratio.
Medians over rounds; targets: swap within 5 s, 0 failed, p99 during <= 2x p99 before.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from rtml.bench.common import JSON_HEADERS, BenchError, auth_headers, machine, run_id, target
from rtml.bench.predict import WARMUP_S, Client, request_bodies
from rtml.bench.rawhttp import RawConnection, build_request
from rtml.bench.stats import latency_summary, median, ratio, rnd
from rtml.core.redis import Keys, connect
from rtml.core.settings import Settings
from rtml.serving.registry import ModelRegistry

TARGET_SWAP_S = 5.0
TARGET_P99_RATIO = 2.0
SETTLE_S = 1.0  # the "during" window runs until this long after the swap completed
RECONNECT_S = 0.01  # pause after a transport error before reconnecting
GRACE_S = 10.0  # a request still unanswered this long after the load stopped counts as failed ("timeout")
WINDOW_KEYS = ("n", "p50_ms", "p90_ms", "p99_ms", "max_ms")
COPIED_BY = "rtml bench predict --swap"


@dataclass(frozen=True, slots=True)
class Rec:
    """One request: when it was sent and answered; ``tag`` is the answered version, or the failure's kind."""

    sent: float
    received: float
    ok: bool
    tag: str


@dataclass(frozen=True, slots=True)
class Marks:
    """A round's clock (``time.perf_counter``): measuring starts, promote call sent/answered, load stopped."""

    measure: float
    promote: float
    promoted: float
    end: float


def _version(body: bytes) -> str | None:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    version = answer.get("version") if isinstance(answer, dict) else None
    return str(version) if version is not None else None


async def _worker(
    host: str, port: int, raws: Sequence[bytes], k: int, step: int, stop_at: float, out: list[Rec],
    pending: list[float | None],
) -> None:  # fmt: skip
    """Send ``raws[k], raws[k + step], ...`` one at a time until ``stop_at``; reconnect after transport errors."""
    i = k
    while time.perf_counter() < stop_at:
        try:
            async with RawConnection(host, port) as conn:
                while (t0 := time.perf_counter()) < stop_at:
                    pending[k] = t0
                    status, body = await conn.request(raws[i % len(raws)])
                    t1 = time.perf_counter()
                    pending[k] = None
                    i += step
                    if status != 200:
                        out.append(Rec(t0, t1, False, str(status)))
                    elif (version := _version(body)) is None:
                        out.append(Rec(t0, t1, False, "200 without a version"))
                    else:
                        out.append(Rec(t0, t1, True, version))
        except (OSError, EOFError, asyncio.LimitOverrunError, ValueError, BenchError) as exc:
            t1 = time.perf_counter()
            out.append(Rec(pending[k] or t1, t1, False, type(exc).__name__))
            pending[k] = None
            await asyncio.sleep(RECONNECT_S)


def _window(recs: Sequence[Rec]) -> dict[str, Any]:
    summary = latency_summary([r.received - r.sent for r in recs if r.ok])
    return {key: summary[key] for key in WINDOW_KEYS}


def analyse_round(
    conns: Sequence[Sequence[Rec]], *, old: str, new: str, marks: Marks, settle_s: float = SETTLE_S
) -> dict[str, Any]:
    """The figures of one round from each connection's requests (in send order). Pure: unit-tested."""
    per_conn: list[float | None] = []
    for recs in conns:
        answered = [r for r in recs if r.ok]
        last_other = max((j for j, r in enumerate(answered) if r.tag != new), default=-1)
        first_new = answered[last_other + 1] if last_other + 1 < len(answered) else None
        per_conn.append(None if first_new is None else max(0.0, first_new.received - marks.promote))
    observed = bool(per_conn) and all(s is not None for s in per_conn)
    swap_s = max(s for s in per_conn if s is not None) if observed else None
    during_end = marks.end if swap_s is None else min(marks.end, marks.promote + swap_s + settle_s)

    recs = [r for conn in conns for r in conn]
    before = [r for r in recs if r.sent >= marks.measure and r.received <= marks.promote]
    during = [r for r in recs if r.received > marks.promote and r.sent < during_end]
    after = [r for r in recs if r.sent >= during_end]
    failed = [r for r in recs if not r.ok]
    failed_during = [r for r in during if not r.ok]
    window_before, window_during = _window(before), _window(during)
    elapsed = marks.end - marks.measure
    answered_measured = sum(1 for r in recs if r.ok and r.sent >= marks.measure)
    versions = Counter(r.tag for r in recs if r.ok and r.received > marks.promote)
    return {
        "from_version": old,
        "to_version": new,
        "promote_call_ms": rnd((marks.promoted - marks.promote) * 1e3),
        "requests": len(recs),
        "req_per_s": rnd(answered_measured / elapsed, 1) if elapsed > 0 else None,
        "failed": len(failed),
        "failed_during_swap": len(failed_during),
        "error_kinds": dict(Counter(r.tag for r in failed)),
        "swap_observed": observed,
        "swap_s": rnd(swap_s),
        "swap_s_per_connection": [rnd(s) for s in per_conn],
        "observed_for_s": rnd(marks.end - marks.promote),
        "old_version_after_promote_answered": sum(1 for r in recs if r.ok and r.tag == old and r.sent > marks.promoted),
        "versions_after_promote": dict(versions),
        "before": {**window_before, "window_s": rnd(marks.promote - marks.measure)},
        "during": {**window_during, "window_s": rnd(during_end - marks.promote)},
        "after": {**_window(after), "window_s": rnd(max(0.0, marks.end - during_end))},
        "p99_during_to_before": ratio(window_during["p99_ms"], window_before["p99_ms"]),
    }


def summarise(rounds: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(medians and totals over rounds, targets). The swap target takes the slowest round."""
    observed = all(r["swap_observed"] for r in rounds)
    swaps = [r["swap_s"] for r in rounds if r["swap_s"] is not None]
    summary: dict[str, Any] = {
        "rounds": len(rounds),
        "swap_observed": observed,
        "swap_s_median": rnd(median(swaps)),
        "swap_s_max": rnd(max(swaps)) if observed and swaps else None,
        "failed": sum(r["failed"] for r in rounds),
        "failed_during_swap": sum(r["failed_during_swap"] for r in rounds),
        "before_p50_ms": rnd(median(r["before"]["p50_ms"] for r in rounds)),
        "before_p99_ms": rnd(median(r["before"]["p99_ms"] for r in rounds)),
        "during_p50_ms": rnd(median(r["during"]["p50_ms"] for r in rounds)),
        "during_p99_ms": rnd(median(r["during"]["p99_ms"] for r in rounds)),
        "p99_during_to_before": rnd(median(r["p99_during_to_before"] for r in rounds)),
        "promote_call_ms": rnd(median(r["promote_call_ms"] for r in rounds)),
    }
    swap_target = target(summary["swap_s_max"], TARGET_SWAP_S)
    if not observed:
        swap_target["meets"] = False
        swap_target["note"] = "a connection never answered with the new version before the load stopped"
    targets = {
        "swap_s": swap_target,
        "failed": target(summary["failed"], 0),
        "p99_during_vs_before": target(summary["p99_during_to_before"], TARGET_P99_RATIO),
    }
    return summary, targets


async def _copy_live(settings: Settings, admin: httpx.AsyncClient, url: str, model: str) -> tuple[str, str]:
    """Upload the live version's bytes and metadata as a new version (not promoted): (live, new version)."""
    redis = connect(settings)
    try:
        registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
        live = await registry.live_version(model)
        if live is None:
            raise BenchError(f"model {model!r} has no live version to copy")
        onnx_bytes, metadata = await registry.get(model, live)
    finally:
        await redis.aclose()
    metadata = {k: v for k, v in metadata.items() if k not in ("created_at", "created_by")}
    metadata.update(copy_of=live, created_by=COPIED_BY)
    r = await admin.post(
        f"{url}/v1/models/{model}/versions",
        params={"metadata": orjson.dumps(metadata).decode()},
        content=onnx_bytes,
        headers={"content-type": "application/octet-stream"},
    )
    if r.status_code != 201:
        raise BenchError(f"uploading a copy of {model} version {live} answered {r.status_code}: {r.text[:200]}")
    return live, str(r.json()["version"])


async def _round(
    settings: Settings, admin: httpx.AsyncClient, model: str, raws: Sequence[bytes], *, concurrency: int,
    before_s: float, after_s: float,
) -> dict[str, Any]:  # fmt: skip
    url = f"http://{settings.host}:{settings.serving_port}"
    old, new = await _copy_live(settings, admin, url, model)
    conns: list[list[Rec]] = [[] for _ in range(concurrency)]
    pending: list[float | None] = [None] * concurrency
    start = time.perf_counter()
    measure = start + WARMUP_S
    promote_at = measure + before_s
    stop_at = promote_at + after_s
    cpu0 = time.process_time()
    workers = [
        asyncio.create_task(
            _worker(settings.host, settings.serving_port, raws, k, concurrency, stop_at, conns[k], pending)
        )
        for k in range(concurrency)
    ]
    try:
        await asyncio.sleep(promote_at - time.perf_counter())
        promote = time.perf_counter()
        r = await admin.post(f"{url}/v1/models/{model}/promote", json={"version": new})
        promoted = time.perf_counter()
        if r.status_code != 200:
            raise BenchError(f"promoting {model} version {new} answered {r.status_code}: {r.text[:200]}")
        _, still_running = await asyncio.wait(workers, timeout=max(0.0, stop_at - time.perf_counter()) + GRACE_S)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    end = time.perf_counter() if still_running else stop_at
    for k, sent in enumerate(pending):  # requests the server never answered
        if sent is not None:
            conns[k].append(Rec(sent, end, False, "timeout"))
    cpu = time.process_time() - cpu0
    out = analyse_round(conns, old=old, new=new, marks=Marks(measure, promote, promoted, min(end, stop_at)))
    out["client_cpu_us_per_req"] = rnd(cpu / max(1, out["requests"]) * 1e6, 1)
    return out


async def bench_swap(
    settings: Settings,
    *,
    duration_s: float = 27,
    concurrency: int | Sequence[int] = 16,
    rounds: int = 3,
    model: str | None = None,
    users: int = 1000,
    items: int = 100,
    client: Client = "raw",
) -> dict[str, Any]:
    """``rounds`` promotions under ``POST /v1/predict`` load; ``duration_s`` of load in all, per round a third
    before the promote call and two thirds after it (a swap slower than that is reported as not observed)."""
    if client not in ("auto", "raw"):
        raise BenchError(f"--swap uses the built-in asyncio client (it reads each answer's version), not {client}")
    if not isinstance(concurrency, int):
        if len(concurrency) != 1:
            raise BenchError("--swap runs at one concurrency: give --concurrency once")
        concurrency = concurrency[0]
    if concurrency < 1 or rounds < 1:
        raise ValueError("need a concurrency of at least 1 and at least one round")
    per_round = duration_s / rounds
    before_s, after_s = per_round / 3, per_round * 2 / 3
    rid = run_id()
    hdrs = {**JSON_HEADERS, **auth_headers(settings, "predict")}
    bodies, _ = request_bodies("predict", users=users, items=items, model=model)
    host, port = settings.host, settings.serving_port
    raws = [build_request("POST", host, port, "/v1/predict", b, hdrs) for b in bodies]
    async with httpx.AsyncClient(timeout=30.0, headers=auth_headers(settings, "admin")) as admin:
        first = await admin.post(f"http://{host}:{port}/v1/predict", content=bodies[0], headers=hdrs)
        if first.status_code != 200:
            raise BenchError(f"POST http://{host}:{port}/v1/predict answered {first.status_code}: {first.text[:200]}")
        name = str(first.json()["model"])
        per_round_out = [
            await _round(settings, admin, name, raws, concurrency=concurrency, before_s=before_s, after_s=after_s)
            for _ in range(rounds)
        ]
    summary, targets = summarise(per_round_out)
    return {
        "bench": "predict-swap",
        "run_id": rid,
        "machine": machine(),
        "client": "asyncio-raw",
        "params": {
            "duration_s": duration_s,
            "rounds": rounds,
            "concurrency": concurrency,
            "before_s": rnd(before_s),
            "after_s": rnd(after_s),
            "warmup_s": WARMUP_S,
            "settle_s": SETTLE_S,
            "model": name,
            "users": users,
            "items": items,
            "new_version": "a copy of the live version (same ONNX bytes and metadata), uploaded then promoted",
        },
        "summary": summary,
        "rounds": per_round_out,
        "targets": targets,
        "pass": all(t["meets"] is True for t in targets.values()),
    }
