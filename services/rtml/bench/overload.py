"""``rtml bench overload``: what callers see at about twice a service's capacity.

Two phases against one running service (``--of predict``: ``POST /v1/predict``; ``--of ingest``:
``POST /v1/events`` with batches of view events):

- **capacity** (closed loop): 1, 4, 16 and ``concurrency`` requests in flight in turn (default: the service's
  own in-flight limit, ``RTML_PREDICT_MAX_IN_FLIGHT`` / ``RTML_INGEST_MAX_IN_FLIGHT`` as this process reads
  them), each sent as soon as the previous answered, at least 0.5 s each: the best admitted rate is the capacity
  (``capacity.concurrency`` says which; the best of several short runs leans high, so the offered rate may be a
  little over ``factor`` x the sustained capacity);
- **overload** (open loop): requests leave on a fixed schedule at ``factor`` (2) x that rate whatever the
  answers, each on a free keep-alive connection (a new one when all are busy, up to ``MAX_CONNECTIONS``).

It reports how many were admitted (200/202) and how fast, how many were refused (503 ``overloaded`` or 429)
and how fast, and anything else (other statuses, timeouts, connection errors), which should be nothing.
The same functions drive the overload tests (tests/e2e/test_overload.py), which assert the counts; the
timings are only reported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from rtml.bench.common import JSON_HEADERS, BenchError, auth_headers, machine, run_id, target
from rtml.bench.ingest import batch_bodies
from rtml.bench.rawhttp import RawConnection, build_request
from rtml.bench.stats import latency_summary, ratio
from rtml.core.looplag import LoopLag
from rtml.core.settings import Settings

Of = Literal["predict", "ingest"]
MAX_CONNECTIONS = 1_000
# A keep-alive connection idle longer than this is closed rather than reused: a server closes idle ones after
# its keep-alive timeout (rtml serve: 75 s; uvicorn's default: 5 s), and a request written as it does so fails
# without being an answer of the server's.
MAX_IDLE_S = 2.0
TARGET_REFUSAL_P99_MS = 5.0
# The capacity is the best admitted rate of closed loops at these concurrencies (and the in-flight limit): when
# the CPU is the bottleneck, many requests in flight only queue in the loop and get refused for its lag
# (rtml.core.looplag), so the most admitted may come from a few in flight.
CAPACITY_LEVELS = (1, 4, 16)
TIMEOUT = 0  # ``Answer.status`` of a request that got no answer within the timeout
CONNECTION_ERROR = -1  # ... of a request whose connection failed
CLIENT_LIMIT = -2  # ... of a request not sent: MAX_CONNECTIONS requests were already unanswered
OTHER_NAMES = {TIMEOUT: "timeout", CONNECTION_ERROR: "connection_error", CLIENT_LIMIT: "not_sent_client_limit"}


@dataclass(frozen=True, slots=True)
class Answer:
    """One request: when it left (seconds from the phase start), its status (or TIMEOUT / CONNECTION_ERROR /
    CLIENT_LIMIT), latency, body, Retry-After header and which request it was."""

    sent_at: float
    status: int
    latency_s: float
    body: bytes = b""
    retry_after: bytes | None = None
    index: int = -1  # which of the phase's requests (its position in the ``requests`` given)

    @property
    def refused(self) -> bool:
        """503 ``overloaded`` or 429: refused for load, which a caller retries after Retry-After."""
        if self.status == 429:
            return True
        if self.status != 503:
            return False
        try:
            return bool(orjson.loads(self.body)["error"]["code"] == "overloaded")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return False


class Pool:
    """Keep-alive raw connections to one server; a request takes a free one or opens another."""

    def __init__(self, host: str, port: int, max_connections: int = MAX_CONNECTIONS) -> None:
        self.host, self.port, self.max_connections = host, port, max_connections
        self._free: list[tuple[RawConnection, float]] = []  # with the time each was last answered on
        self.opened = 0

    async def request(self, raw: bytes, timeout_s: float, started: float, index: int = -1) -> Answer:
        t0 = time.perf_counter()
        conn = None
        while self._free:
            conn, last = self._free.pop()
            if t0 - last <= MAX_IDLE_S:
                break
            await self._drop(conn)
            conn = None
        try:
            async with asyncio.timeout(timeout_s):
                if conn is None:
                    if self.opened >= self.max_connections:
                        return Answer(t0 - started, CLIENT_LIMIT, 0.0, index=index)
                    self.opened += 1
                    conn = RawConnection(self.host, self.port)
                    await conn.__aenter__()
                status, headers, body = await conn.exchange(raw)
        except TimeoutError:
            await self._drop(conn)
            return Answer(t0 - started, TIMEOUT, time.perf_counter() - t0, index=index)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await self._drop(conn)
            return Answer(t0 - started, CONNECTION_ERROR, time.perf_counter() - t0, index=index)
        latency = time.perf_counter() - t0
        if headers.get(b"connection", b"").lower() == b"close":
            await self._drop(conn)
        else:
            self._free.append((conn, time.perf_counter()))
        return Answer(t0 - started, status, latency, body, headers.get(b"retry-after"), index)

    async def _drop(self, conn: RawConnection | None) -> None:
        if conn is not None:
            self.opened -= 1
            with contextlib.suppress(Exception):
                await conn.__aexit__(None, None, None)

    async def close(self) -> None:
        while self._free:
            await self._drop(self._free.pop()[0])


async def closed_loop(
    pool: Pool, requests: Sequence[bytes], *, concurrency: int, duration_s: float, timeout_s: float = 30.0
) -> tuple[list[Answer], float]:
    """``concurrency`` workers, each sending its next request when the last answered; (answers, elapsed s)."""
    answers: list[Answer] = []
    start = time.perf_counter()
    deadline = start + duration_s

    async def worker(k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            answers.append(await pool.request(requests[i % len(requests)], timeout_s, start, i % len(requests)))
            i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return answers, time.perf_counter() - start


async def open_loop(
    pool: Pool, requests: Sequence[bytes], *, rate: float, duration_s: float, timeout_s: float = 30.0
) -> list[Answer]:
    """Request n leaves at ``n / rate`` seconds whatever the answers; every answer once all came back."""
    start = time.perf_counter()
    total = max(1, math.floor(rate * duration_s))
    tasks: list[asyncio.Task[Answer]] = []
    for n in range(total):
        wait = start + n / rate - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        k = n % len(requests)
        tasks.append(asyncio.create_task(pool.request(requests[k], timeout_s, start, k)))
    return list(await asyncio.gather(*tasks))


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """No garbage collection in this process meanwhile: the open loop keeps every task and answer of the phase,
    and a full collection over tens of thousands of them stalled this client ~270 ms (measured), which then
    showed as the server's latency. The phase is short and its objects are freed when it ends."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def summary(answers: Sequence[Answer], ok: int, elapsed_s: float) -> dict[str, Any]:
    """Counts and latencies of admitted (status ``ok``), refused (503 overloaded / 429) and everything else."""
    admitted = [a for a in answers if a.status == ok]
    refused = [a for a in answers if a.refused]
    other = Counter(OTHER_NAMES.get(a.status, str(a.status)) for a in answers if a.status != ok and not a.refused)
    return {
        "sent": len(answers),
        "elapsed_s": round(elapsed_s, 3),
        "admitted": {
            **latency_summary([a.latency_s for a in admitted]),
            "per_s": round(len(admitted) / elapsed_s, 1) if elapsed_s else None,
        },
        "refused": {
            **latency_summary([a.latency_s for a in refused]),
            "with_retry_after": sum(1 for a in refused if a.retry_after),
        },
        "other": dict(sorted(other.items())),
    }


def bodies_for(of: Of, prefix: str, batch: int) -> tuple[str, list[bytes]]:
    """(path, request bodies) of this run's workload."""
    if of == "predict":
        return "/v1/predict", [
            orjson.dumps({"entities": {"user_id": f"{prefix}-u{i}", "item_id": f"{prefix}-t{i % 50}"}})
            for i in range(1000)
        ]
    return "/v1/events", batch_bodies(prefix, batch=batch, users=200, items=50, count=64)


def raw_requests(settings: Settings, of: Of, path: str, bodies: Sequence[bytes]) -> list[bytes]:
    port = settings.port_of("serving" if of == "predict" else "ingest")
    headers = {**JSON_HEADERS, **auth_headers(settings, "predict" if of == "predict" else "ingest")}
    return [build_request("POST", settings.host, port, path, b, headers) for b in bodies]


async def bench_overload(
    settings: Settings,
    of: Of = "predict",
    duration_s: float = 12.0,
    concurrency: int | None = None,
    factor: float = 2.0,
    batch: int = 100,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """Closed-loop capacity for a third of ``duration_s``, then ``factor`` x that rate open loop."""
    limit = settings.predict_max_in_flight if of == "predict" else settings.ingest_max_in_flight
    concurrency = concurrency or limit
    path, bodies = bodies_for(of, run_id(), batch)
    requests = raw_requests(settings, of, path, bodies)
    ok = 200 if of == "predict" else 202
    pool = Pool(settings.host, settings.port_of("serving" if of == "predict" else "ingest"))
    try:
        await closed_loop(pool, requests, concurrency=concurrency, duration_s=0.5, timeout_s=timeout_s)  # warm-up
        levels = sorted({c for c in CAPACITY_LEVELS if c < concurrency} | {concurrency})
        by_level: dict[int, tuple[list[Answer], float]] = {}
        for c in levels:
            by_level[c] = await closed_loop(
                pool, requests, concurrency=c, duration_s=max(0.5, duration_s / 3 / len(levels)), timeout_s=timeout_s
            )
        rates = {c: sum(1 for a in got if a.status == ok) / took for c, (got, took) in by_level.items()}
        best = max(levels, key=lambda c: rates[c])
        answers, elapsed = by_level[best]
        capacity = rates[best]
        if capacity <= 0:
            raise BenchError(f"no request was admitted in the capacity phase: {summary(answers, ok, elapsed)}")
        rate = capacity * factor
        own = LoopLag(0)  # this client's own lateness: when it is high, the client was the bottleneck
        own.record = []
        own.start()
        started = time.perf_counter()
        try:
            with no_gc():
                loaded = await open_loop(pool, requests, rate=rate, duration_s=duration_s * 2 / 3, timeout_s=timeout_s)
        finally:
            await own.stop()
        over = summary(loaded, ok, time.perf_counter() - started)
    finally:
        await pool.close()
    admitted = [a for a in loaded if a.status == ok]
    result: dict[str, Any] = {
        "bench": "overload",
        "of": of,
        "machine": machine(),
        "client": "asyncio-raw",
        "max_in_flight": limit,
        "capacity": {
            "concurrency": best,
            "req_per_s": round(capacity, 1),
            "req_per_s_by_concurrency": {str(c): round(r, 1) for c, r in rates.items()},
            **{k: v for k, v in summary(answers, ok, elapsed).items() if k != "elapsed_s"},
        },
        "overload": {
            "factor": factor,
            "offered_req_per_s": round(rate, 1),
            **over,
            "client_loop_lag": latency_summary(own.record),
        },
        "refused_p99_over_admitted_p50": ratio(over["refused"]["p99_ms"], over["admitted"]["p50_ms"]),
        "targets": {"refused_p99_ms": target(over["refused"]["p99_ms"], TARGET_REFUSAL_P99_MS)},
    }
    if of == "ingest":
        result["overload"]["events_accepted"] = sum(int(orjson.loads(a.body)["accepted"]) for a in admitted)
        result["batch"] = batch
    return result
