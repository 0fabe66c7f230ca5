"""CPU-bound overload, isolated: what callers see at twice the capacity of a process whose own CPU is the
bottleneck, with the event-loop lag refusal (``rtml.core.looplag``) on and off in the same run.

Why a separate benchmark. ``rtml bench overload`` drives the real stack, but on a small machine the service,
Redis, the broker and the load generator share the cores: whichever of them is starved sets the latency, and
the client's own lateness ends up in its figures. Here the server is alone on one CPU and the client alone on
another (``sched_setaffinity``), and the server does nothing but CPU work, so what is measured is the admission
itself: the same decision serving's fast path and ingest make (``in_flight >= limit or not lag.admits(in_flight)`` ->
503 ``overloaded`` + Retry-After), with the same ``LoopLag``.

The server (``--serve``, started by this script) is uvicorn (uvloop, httptools) with a bare ASGI app: an
admitted request costs ``--cost-ms`` of CPU in two halves around one turn of the loop (where a real request
awaits Redis); a refused one costs only the HTTP exchange. Each round, for the lag limit off (0), then
``--lag-ms`` with the refusal written by the app, then ``--lag-ms`` with it written by ``rtml serve``'s HTTP
protocol before a task exists (``early``, ``rtml.core.early``): start the server, warm up; with the lag limit
off, measure capacity (the best admitted rate of closed loops at 1, 4, 16 and 64 in flight); offer
``--factor`` (2) times that open loop for ``--phase-s`` with the client's GC off, stop; the other settings get
the same offered rate. Then the baseline, ``floor``: the same client at the same offered rate against
requests that cost nothing (nothing is refused): the fastest any answer comes back on this machine, the
client's and the loopback's own tail.
Reported per setting, as medians over rounds: capacity, admitted per second, admitted and refused p50/p99 of
the requests sent after the first 0.5 s (steady state) and of those sent in it (onset), other answers, and the
client's own loop lag (when high, the client was the bottleneck); and the refused p99 over the floor's p99.
Linux, 2+ CPUs (~4 min with the defaults):

    python benchmarks/overload_cpu.py [--rounds 3] [--lag-ms 2] [--cost-ms 0.5] [--phase-s 8] [--factor 2]
        [--confirm-ticks N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

ONSET_S = 0.5
MAX_IN_FLIGHT = 64  # RTML_PREDICT_MAX_IN_FLIGHT's default


def serve(port: int, lag_ms: float, cost_ms: float, confirm_ticks: int, early: bool) -> None:
    """The server: uvicorn with an app that burns ``cost_ms`` of CPU per admitted request; with ``early``, the
    refusals are written by ``rtml serve``'s HTTP protocol (``rtml.core.early``) before a task exists."""
    import uvicorn

    from rtml.core.early import RefusingHttpToolsProtocol
    from rtml.core.errors import Overloaded, RtmlError
    from rtml.core.looplag import CONFIRM_TICKS, LoopLag

    lag = LoopLag(lag_ms / 1000, confirm_ticks=confirm_ticks or CONFIRM_TICKS)
    in_flight = 0
    lag.watch(lambda: in_flight)
    refusal = b'{"error":{"code":"overloaded","message":"retry shortly"}}'

    def burn(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    async def respond(send: Any, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal in_flight
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    lag.start()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await lag.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if in_flight >= MAX_IN_FLIGHT or not lag.admits(in_flight):  # serving's fast path decides the same way
            await respond(send, 503, refusal, [(b"retry-after", b"1")])
            return
        in_flight += 1
        try:
            await receive()
            burn(cost_ms / 2000)
            await asyncio.sleep(0)  # where a real request awaits its feature read
            burn(cost_ms / 2000)
        finally:
            in_flight -= 1
        await respond(send, 200, b"{}", [])

    def early_refusal(method: bytes, path: bytes, headers: Any) -> RtmlError | None:
        if in_flight >= MAX_IN_FLIGHT or not lag.admits(in_flight):
            return Overloaded("retry shortly")
        return None

    if early:
        app.early_refusal = early_refusal  # type: ignore[attr-defined]
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", loop="uvloop",
                http=RefusingHttpToolsProtocol, proxy_headers=False)  # fmt: skip


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile in ms, as ``rtml bench`` computes it (rtml.bench.stats)."""
    from rtml.bench.stats import percentile

    value = percentile(values, q)
    return None if value is None else round(1000 * value, 2)


async def one_run(port: int, phase_s: float, rate: float | None, factor: float) -> dict[str, Any]:
    from rtml.bench.overload import Pool, closed_loop, no_gc, open_loop
    from rtml.bench.rawhttp import build_request
    from rtml.core.looplag import LoopLag

    requests = [build_request("POST", "127.0.0.1", port, "/", b"{}", {"Content-Type": "application/json"})]
    pool = Pool("127.0.0.1", port)
    try:
        await closed_loop(pool, requests, concurrency=4, duration_s=1.0)  # warm-up
        capacity = None
        if rate is None:
            rates = {}
            for c in (1, 4, 16, MAX_IN_FLIGHT):
                got, took = await closed_loop(pool, requests, concurrency=c, duration_s=1.0)
                rates[c] = sum(1 for a in got if a.status == 200) / took
            capacity = max(rates.values())
            rate = factor * capacity
        own = LoopLag(0)
        own.record = []
        own.start()
        try:
            with no_gc():
                answers = await open_loop(pool, requests, rate=rate, duration_s=phase_s, timeout_s=30)
        finally:
            await own.stop()
    finally:
        await pool.close()
    out: dict[str, Any] = {"capacity": capacity and round(capacity), "offered": round(rate)}
    steady = [a for a in answers if a.sent_at >= ONSET_S]
    onset = [a for a in answers if a.sent_at < ONSET_S]
    out["admitted_per_s"] = round(sum(1 for a in steady if a.status == 200) / (phase_s - ONSET_S))
    for name, part in (("steady", steady), ("onset", onset)):
        ok = [a.latency_s for a in part if a.status == 200]
        refused = [a.latency_s for a in part if a.refused]
        out[name] = {
            "admitted_p50_ms": pct(ok, 50), "admitted_p99_ms": pct(ok, 99),
            "refused_p50_ms": pct(refused, 50), "refused_p99_ms": pct(refused, 99),
            "refused_share": round(len(refused) / len(part), 3) if part else None,
            "other": len(part) - len(ok) - len(refused),
        }  # fmt: skip
    out["client_lag_p99_ms"] = pct(own.record, 99)
    return out


def run(
    lag_ms: float,
    cost_ms: float,
    phase_s: float,
    server_cpu: int,
    confirm_ticks: int,
    factor: float,
    rate: float | None = None,
    early: bool = False,
) -> dict[str, Any]:
    from rtml.core.embedded import free_port, wait_for_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--lag-ms", str(lag_ms), "--cost-ms", str(cost_ms)]
        + ["--confirm-ticks", str(confirm_ticks)]
        + (["--early"] if early else [])
    )
    try:
        os.sched_setaffinity(server.pid, {server_cpu})
        wait_for_port("127.0.0.1", port, 20, server)
        try:
            import uvloop

            return uvloop.run(one_run(port, phase_s, rate, factor))
        except (ImportError, AttributeError):  # no uvloop, or one older than uvloop.run (0.18)
            return asyncio.run(one_run(port, phase_s, rate, factor))
    finally:
        server.terminate()
        server.wait(10)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise median over rounds (nested dicts too; None where no round had a value)."""
    from rtml.bench.stats import median

    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, dict):
            out[key] = median_of([r[key] for r in runs])
        else:
            value = median(r[key] for r in runs)
            out[key] = None if value is None else round(value, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lag-ms", type=float, default=2.0)
    parser.add_argument("--cost-ms", type=float, default=0.5)
    parser.add_argument("--phase-s", type=float, default=8.0)
    parser.add_argument("--factor", type=float, default=2.0, help="offered rate over the measured capacity")
    parser.add_argument("--confirm-ticks", type=int, default=0, help="late ticks before a halving (0: rtml's)")
    parser.add_argument("--early", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.lag_ms, args.cost_ms, args.confirm_ticks, args.early)
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs 2 CPUs: the server on one, the client on the other")
    os.sched_setaffinity(0, {cpus[1]})
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": [], "early": [], "floor": []}
    for _ in range(args.rounds):
        runs["off"].append(run(0.0, args.cost_ms, args.phase_s, cpus[0], args.confirm_ticks, args.factor))
        # the same offered rate with the lag cap: a capacity measured with it on would be lower (closed loops of
        # many in flight get refused), and so would the load
        offered = runs["off"][-1]["offered"]
        on = run(args.lag_ms, args.cost_ms, args.phase_s, cpus[0], args.confirm_ticks, args.factor, rate=offered)
        runs["on"].append(on)
        # the same, with the refusals written by the HTTP protocol (rtml serve's) instead of the app
        runs["early"].append(run(args.lag_ms, args.cost_ms, args.phase_s, cpus[0], args.confirm_ticks, args.factor,
                                 rate=offered, early=True))  # fmt: skip
        # the floor: the same client at the same offered rate against requests that cost nothing, so nothing
        # is refused: how fast any answer can be on this machine (the client and the loopback's own tail)
        runs["floor"].append(run(0.0, 0.0, args.phase_s, cpus[0], args.confirm_ticks, args.factor, rate=offered))
    from rtml.bench.stats import ratio
    from rtml.core.looplag import CONFIRM_TICKS

    medians = {s: median_of(r) for s, r in runs.items()}
    off, on, floor = medians["off"]["steady"], medians["on"]["steady"], medians["floor"]["steady"]
    early = medians["early"]["steady"]
    summary = {
        "bench": "overload_cpu",
        "rounds": args.rounds,
        "cost_ms": args.cost_ms,
        "phase_s": args.phase_s,
        "factor": args.factor,
        "confirm_ticks": args.confirm_ticks or CONFIRM_TICKS,
        "lag_off": medians["off"],
        f"lag_{args.lag_ms:g}ms": medians["on"],
        f"lag_{args.lag_ms:g}ms_early": medians["early"],
        "floor": medians["floor"],
        "admitted_p99_off_over_on": ratio(off["admitted_p99_ms"], on["admitted_p99_ms"]),
        "refused_p99_off_over_on": ratio(off["refused_p99_ms"], on["refused_p99_ms"]),
        "refused_p99_on_over_floor": ratio(on["refused_p99_ms"], floor["admitted_p99_ms"]),
        "refused_p99_on_over_early": ratio(on["refused_p99_ms"], early["refused_p99_ms"]),
        "refused_p99_early_over_floor": ratio(early["refused_p99_ms"], floor["admitted_p99_ms"]),
        "runs": runs,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
