"""Capacity benchmark: what one event and one prediction COST on this machine, and sizing derived from it.

Against a running ``rtml up`` (``--use-running``: the ``.rtml/endpoints.env`` of the current directory) or,
by default, one it starts itself in a scratch directory on free ports (a fresh broker and Redis, nobody
else's load on them), it runs ``--rounds`` rounds of four phases:

- **idle** (``--idle-s``): nothing sent; each process's background CPU and Redis commands per second
  (polls, metric scrapes, sweeps), subtracted from the phases below;
- **events**: ``--event-rate`` events/s through ``POST /v1/events`` in batches of ``--event-batch`` (a mix
  of 7 views, 2 clicks, 1 purchase, over ``--users`` users and ``--items`` items) for ``--phase-s``, then
  until the features and feedback consumers have committed everything;
- **predict** / **recommend**: ``--concurrency`` connections in flight for ``--phase-s`` each, on the same
  users and items (recommend: ``--candidates`` candidates, k=10), then until feedback has consumed the
  prediction log.

Per unit of work (an accepted event, an answered request) it reports: CPU µs of each process (ingest,
features, serving, feedback, the broker, redis-server) from ``/proc/<pid>/stat`` utime+stime deltas, less
the idle rate; Redis commands by name and Redis CPU (``INFO commandstats`` / ``INFO cpu`` deltas, idle
subtracted); Kafka records and bytes per topic (the records between the offsets before and after, read
back: key + value + headers, and the v2 record size without the batch header); Redis ``used_memory``
growth per unit. Once per run it also runs ``rtml bench memory`` (bytes per entity and feature, per
seen-set entry). Medians over rounds, with min and max.

CPU time, not wall time: a process's CPU per unit of work barely moves when a neighbour steals the cores,
where req/s and latency do, so the figures hold on a shared machine (within the spread printed).
Linux only (``/proc``). The load generator's own CPU is not counted.

``--sizing FILE`` prints the sizing tables (docs/scaling.md) from a JSON summary this script wrote; the
arithmetic is :func:`size` and is unit-tested (tests/unit/test_capacity.py).

    python benchmarks/capacity.py [--rounds 3] [--event-rate 8000] [--concurrency 8] [--out cap.json]
    python benchmarks/capacity.py --sizing cap.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SERVICES = ("ingest", "features", "serving", "feedback")
PROCESSES = (*SERVICES, "broker", "redis")
EVENT_CYCLE = ("view", "view", "click", "view", "view", "view", "click", "view", "view", "purchase")
META_COMMANDS = {"info", "memory", "scan", "type", "object", "hkeys", "zcard", "config", "client", "ping"}

# ---------------------------------------------------------------------------------------------------------
# Pure parts (unit-tested): /proc parsing, per-unit arithmetic, medians, the sizing model.
# ---------------------------------------------------------------------------------------------------------


def cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks, all threads) from the text of ``/proc/<pid>/stat``.

    The command name (field 2) may hold spaces and parentheses, so fields are counted after the last ``)``.
    """
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])  # fields 14 and 15 of proc(5); rest[0] is field 3


def listening_inodes(table: str, port: int) -> set[str]:
    """Socket inodes listening (state 0A) on ``port`` in the text of ``/proc/net/tcp`` or ``tcp6``."""
    out = set()
    for line in table.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
            out.add(parts[9])
    return out


def net(gross: float, idle_rate: float, seconds: float) -> float:
    """A counter's growth during a phase less what the idle rate would have added in as long (>= 0)."""
    return max(0.0, gross - idle_rate * seconds)


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """median, min and max of the known values (None when none), rounded to 2 decimals."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return {"median": None, "min": None, "max": None}
    n = len(known)
    mid = known[n // 2] if n % 2 else (known[n // 2 - 1] + known[n // 2]) / 2
    return {"median": round(mid, 2), "min": round(known[0], 2), "max": round(known[-1], 2)}


def varint_len(n: int) -> int:
    """Bytes of a zig-zag varint (Kafka record v2 lengths and deltas)."""
    z = (n << 1) ^ (n >> 63)
    size = 1
    while z >= 0x80:
        z >>= 7
        size += 1
    return size


def record_v2_bytes(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    """Size of one record in a Kafka v2 record batch, the batch's 61-byte header not included (it is shared
    by every record of the batch). Timestamp and offset deltas are taken as 2 and 1 bytes."""
    klen = -1 if key is None else len(key)
    vlen = -1 if value is None else len(value)
    body = 1 + 2 + 1  # attributes, timestamp delta, offset delta
    body += varint_len(klen) + max(0, klen) + varint_len(vlen) + max(0, vlen) + varint_len(len(headers))
    for name, hval in headers:
        hk = name.encode()
        body += varint_len(len(hk)) + len(hk) + varint_len(len(hval)) + len(hval)
    return varint_len(body) + body


def _get(d: Mapping[str, Any], path: str) -> float:
    cur: Any = d
    for part in path.split("."):
        cur = cur[part]
    return float(cur["median"] if isinstance(cur, Mapping) and "median" in cur else cur)


@dataclass(frozen=True)
class Assumptions:
    """What the sizing assumes beyond the measured figures (docs/scaling.md states each)."""

    target_utilisation: float = 0.6  # of one core per Python process, and of one Redis main thread
    redis_node_memory_gb: float = 25.0  # usable dataset per Redis master (a 32 GB node, fragmentation room)
    replication_factor: int = 3  # Kafka
    partition_mb_s: float = 5.0  # produce MB/s one partition is planned for (Apache Kafka, conservative)
    broker_mb_s: float = 50.0  # produce MB/s (before replication) one broker is planned for
    entities_per_event_rate: float = 100.0  # distinct entities kept = 100 x events/s (1M entities at 10k/s)
    features_per_entity: float = 10.0  # windowed features per entity (the demo config: 10 on user)
    dedup_horizon_s: float = 86_400.0  # RTML_DEDUP_HORIZON and the longest window (24 h in the demo config)
    prediction_retention_s: float = 5_580.0  # ctr: label window 30 m + horizon 2 x 31 m + 1 m margin
    min_partitions: int = 12


def _pow2ish(n: float) -> int:
    """The next of 12, 24, 48, 96, ... (partition counts that divide evenly among many group sizes)."""
    p = 12
    while p < n:
        p *= 2
    return p


def size(measured: Mapping[str, Any], rate: float, kind: str, a: Assumptions = Assumptions()) -> dict[str, Any]:
    """Sizing for ``rate`` events/s (``kind="events"``) or predictions/s (``kind="predict"``) from the
    per-unit costs in ``measured`` (the ``per_unit`` block of this script's JSON summary).

    First-order arithmetic only: cores = rate x CPU µs per unit / 1e6, processes = cores / target
    utilisation (one Python process uses one core), Redis masters = max(CPU, memory) need, partitions
    = room for twice the consumer members and for the topic's MB/s.
    """
    u = measured[kind]
    services = ("ingest", "features", "feedback") if kind == "events" else ("serving", "feedback")
    out: dict[str, Any] = {"rate": rate, "kind": kind}
    procs = {}
    for s in services:
        cores = rate * _get(u, f"cpu_us.{s}") / 1e6
        procs[s] = {"cores": round(cores, 2), "processes": max(1, math.ceil(cores / a.target_utilisation))}
    out["processes"] = procs
    # Kafka: the topic this unit writes, its bytes and the partitions for consumers and throughput.
    topic = "events" if kind == "events" else "predictions"
    rec_bytes = _get(u, f"kafka.{topic}.record_bytes")
    recs = _get(u, f"kafka.{topic}.records")
    mb_s = rate * recs * rec_bytes / 1e6
    consumers = [procs[s]["processes"] for s in services if s != ("ingest" if kind == "events" else "serving")]
    partitions = _pow2ish(max(a.min_partitions, 2 * max(consumers), mb_s / a.partition_mb_s))
    out["kafka"] = {
        "topic": f"rtml.{topic}",
        "records_per_s": round(rate * recs),
        "produce_mb_s": round(mb_s, 1),
        "replicated_write_mb_s": round(mb_s * a.replication_factor, 1),
        "partitions": partitions,
        "brokers_for_this_topic": max(1, math.ceil(mb_s / a.broker_mb_s)),
    }
    # Redis: ops, CPU, memory.
    redis_cores = rate * _get(u, "redis_cpu_us") / 1e6
    ops = rate * _get(u, "redis_commands")
    if kind == "events":
        entities = a.entities_per_event_rate * rate
        feature_gb = entities * a.features_per_entity * _get(measured, "memory.per_entity_per_feature_bytes") / 1e9
        seen_gb = (
            rate
            * a.dedup_horizon_s
            * _get(u, "entities_per_event")
            * _get(measured, "memory.seen_bytes_per_event")
            / 1e9
        )
        mem = {"entities": round(entities), "features_gb": round(feature_gb, 1), "seen_sets_gb": round(seen_gb, 1)}
        total_gb = feature_gb + seen_gb
    else:
        join_gb = rate * a.prediction_retention_s * _get(u, "redis_bytes_retained") / 1e9
        mem = {"prediction_state_gb": round(join_gb, 1)}
        total_gb = join_gb
    mem["total_gb"] = round(total_gb, 1)
    by_cpu = math.ceil(redis_cores / a.target_utilisation)
    by_mem = math.ceil(total_gb / a.redis_node_memory_gb)
    out["redis"] = {
        "commands_per_s": round(ops),
        "cores": round(redis_cores, 2),
        "memory": mem,
        "masters_for_cpu": max(1, by_cpu),
        "masters_for_memory": max(1, by_mem),
        "masters": max(1, by_cpu, by_mem),
    }
    out["first_limit"] = (
        "Redis memory"
        if by_mem > by_cpu
        else "Redis CPU (a single-threaded node)"
        if by_cpu > 1
        else "none on one node"
    )
    return out


def sizing_inputs(per: Mapping[str, Any]) -> dict[str, Any]:
    """The medians :func:`size` reads, from the ``per_unit`` block of a summary: the compact JSON that
    docs/scaling.md quotes and its tables are checked against."""
    out: dict[str, Any] = {}
    for kind, services, topic in (("events", ("ingest", "features", "feedback"), "events"),
                                  ("predict", ("serving", "feedback"), "predictions")):  # fmt: skip
        u = per[kind]
        out[kind] = {
            "cpu_us": {s: _get(u, f"cpu_us.{s}") for s in services},
            "redis_commands": _get(u, "redis_commands"),
            "redis_cpu_us": _get(u, "redis_cpu_us"),
            "redis_bytes_retained": _get(u, "redis_bytes_retained"),
            "kafka": {topic: {"records": _get(u, f"kafka.{topic}.records"),
                              "record_bytes": _get(u, f"kafka.{topic}.record_bytes")}},
        }  # fmt: skip
    out["events"]["entities_per_event"] = _get(per["events"], "entities_per_event")
    out["memory"] = {k: _get(per["memory"], k) for k in ("per_entity_per_feature_bytes", "seen_bytes_per_event")}
    return out


def sizing_markdown(measured: Mapping[str, Any], a: Assumptions = Assumptions()) -> str:
    """The two sizing tables of docs/scaling.md, generated from the per-unit figures."""
    rates = (10_000, 100_000, 1_000_000)
    lines = [
        "| events/s | ingest procs | features procs | feedback procs | rtml.events partitions | MB/s in (×RF) | "
        "Redis cmds/s | Redis cores | Redis memory (features + seen-sets) | Redis masters (CPU / memory) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rates:
        s = size(measured, r, "events", a)
        p, k, rd = s["processes"], s["kafka"], s["redis"]
        m = rd["memory"]
        lines.append(
            f"| {r:,} | {p['ingest']['processes']} | {p['features']['processes']} | {p['feedback']['processes']} | "
            f"{k['partitions']} | {k['produce_mb_s']:g} ({k['replicated_write_mb_s']:g}) | {rd['commands_per_s']:,} | "
            f"{rd['cores']:g} | {m['features_gb']:g} + {m['seen_sets_gb']:g} = {m['total_gb']:g} GB | "
            f"{rd['masters']} ({rd['masters_for_cpu']} / {rd['masters_for_memory']}) |"
        )
    lines += [
        "",
        "| predictions/s | serving procs | feedback procs | rtml.predictions partitions | MB/s in (×RF) | "
        "Redis cmds/s | Redis cores | Redis memory (prediction state) | Redis masters (CPU / memory) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rates:
        s = size(measured, r, "predict", a)
        p, k, rd = s["processes"], s["kafka"], s["redis"]
        lines.append(
            f"| {r:,} | {p['serving']['processes']} | {p['feedback']['processes']} | {k['partitions']} | "
            f"{k['produce_mb_s']:g} ({k['replicated_write_mb_s']:g}) | {rd['commands_per_s']:,} | {rd['cores']:g} | "
            f"{rd['memory']['total_gb']:g} GB | {rd['masters']} "
            f"({rd['masters_for_cpu']} / {rd['masters_for_memory']}) |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Measurement (needs a running platform).
# ---------------------------------------------------------------------------------------------------------


def pids_listening(port: int) -> list[int]:
    """Every process holding a socket that listens on ``port`` (uvicorn workers share their parent's)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            inodes |= listening_inodes(Path(table).read_text(), port)
    wanted = {f"socket:[{i}]" for i in inodes}
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        found.append(int(proc.name))
                        break
    return sorted(found)


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
    return total / CLK_TCK


@dataclass
class Snapshot:
    at: float
    cpu: dict[str, float]
    redis_calls: dict[str, int]
    redis_cpu_s: float
    redis_used_memory: int


@dataclass
class Probe:
    """Where everything is: the processes to read CPU of, a Redis client, the services' URLs."""

    settings: Any
    pids: dict[str, list[int]]
    redis: Any
    urls: dict[str, list[str]] = field(default_factory=dict)

    async def snapshot(self) -> Snapshot:
        stats = await self.redis.info("commandstats")
        cpu = await self.redis.info("cpu")
        mem = await self.redis.info("memory")
        calls = {
            k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in stats.items()
            if isinstance(v, dict) and k.removeprefix("cmdstat_").split("|")[0] not in META_COMMANDS
        }
        return Snapshot(
            at=time.perf_counter(),
            cpu={name: cpu_seconds(p) for name, p in self.pids.items()},
            redis_calls=calls,
            redis_cpu_s=float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            redis_used_memory=int(mem["used_memory"]),
        )


def replica_urls(settings: Any, host: str) -> dict[str, list[str]]:
    """Every replica's URL per service: ``RTML_<SERVICE>_URLS`` (environment, else the endpoints file that
    ``rtml up`` wrote in this directory), else the one ``RTML_<SERVICE>_PORT``."""
    written: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in (Path(".rtml") / "endpoints.env").read_text().splitlines():
            k, sep, v = line.partition("=")
            if sep and not k.startswith("#"):
                written[k.strip()] = v.strip()
    out = {}
    for s in SERVICES:
        raw = os.environ.get(f"RTML_{s.upper()}_URLS") or written.get(f"RTML_{s.upper()}_URLS")
        out[s] = [u.strip().rstrip("/") for u in raw.split(",") if u.strip()] if raw else []
        out[s] = out[s] or [f"http://{host}:{settings.port_of(s)}"]
    return out


def deltas(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    return {
        "seconds": b.at - a.at,
        "cpu": {k: b.cpu[k] - a.cpu[k] for k in b.cpu},
        "redis_calls": {
            k: v - a.redis_calls.get(k, 0) for k, v in b.redis_calls.items() if v - a.redis_calls.get(k, 0)
        },
        "redis_cpu_s": b.redis_cpu_s - a.redis_cpu_s,
        "redis_memory": b.redis_used_memory - a.redis_used_memory,
    }


def per_unit(d: dict[str, Any], idle: dict[str, Any], units: int) -> dict[str, Any]:
    """Phase deltas per unit of work, the idle rates subtracted (CPU, Redis commands and Redis CPU)."""
    secs = d["seconds"]
    rate = {k: v / idle["seconds"] for k, v in idle["cpu"].items()}
    cpu = {k: net(v, rate[k], secs) / units * 1e6 for k, v in d["cpu"].items()}
    cpu["total"] = sum(cpu.values())
    idle_calls = {k: v / idle["seconds"] for k, v in idle["redis_calls"].items()}
    calls = {k: net(v, idle_calls.get(k, 0.0), secs) / units for k, v in d["redis_calls"].items()}
    return {
        "units": units,
        "seconds": round(secs, 2),
        "cpu_us": {k: round(v, 1) for k, v in cpu.items()},
        "cpu_us_gross": {k: round(v / units * 1e6, 1) for k, v in d["cpu"].items()},
        "redis_commands": round(sum(calls.values()), 3),
        "redis_commands_by_name": {k: round(v, 3) for k, v in sorted(calls.items()) if v >= 0.001},
        "redis_cpu_us": round(net(d["redis_cpu_s"], idle["redis_cpu_s"] / idle["seconds"], secs) / units * 1e6, 1),
        "redis_bytes_retained": round(d["redis_memory"] / units, 1),
    }


async def scrape(client: Any, url: str) -> str:
    r = await client.get(f"{url}/metrics")
    return str(r.text)


_SAMPLE = re.compile(r"^(rtml_consumer_records_total|rtml_consumer_lag_records)\{([^}]*)\} ([0-9.eE+-]+)$", re.M)


def consumer_state(texts: Sequence[str]) -> tuple[float, float]:
    """(records consumed and committed, records of lag) summed over the consumers in ``texts``, skipping
    serving's per-process model-announcement consumer."""
    done = lag = 0.0
    for text in texts:
        for name, labels, value in _SAMPLE.findall(text):
            if "serving-models" in labels:
                continue
            if name == "rtml_consumer_records_total":
                done += float(value)
            else:
                lag += float(value)
    return done, lag


async def settle(client: Any, urls: Sequence[str], at_least: float, timeout_s: float = 60) -> float:
    """Wait until the consumers committed ``at_least`` more records than before, show no lag and stop
    moving; the seconds it took."""
    t0 = time.perf_counter()
    last = None
    while True:
        done, lag = consumer_state([await scrape(client, u) for u in urls])
        if done >= at_least and lag == 0 and done == last:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"consumers did not catch up in {timeout_s} s (committed {done}, lag {lag})")
        last = done
        await asyncio.sleep(0.3)


def event_bodies(prefix: str, users: int, items: int, batch: int, count: int) -> list[bytes]:
    bodies = []
    k = 0
    for _ in range(count):
        evs = []
        for _ in range(batch):
            kind = EVENT_CYCLE[k % len(EVENT_CYCLE)]
            ev: dict[str, Any] = {"type": kind, "user_id": f"{prefix}u{(k * 7919) % users}",
                                  "item_id": f"{prefix}t{(k * 104729) % items}"}  # fmt: skip
            if kind == "purchase":
                ev["properties"] = {"amount": round(5 + (k % 97) * 1.5, 2)}
            evs.append(ev)
            k += 1
        bodies.append(orjson.dumps({"events": evs}))
    return bodies


def entities_per_event(settings: Any, bodies: Sequence[bytes]) -> float:
    """(entity, event) pairs the features service writes per event, by the platform's own planner."""
    from rtml.core.config import load_config
    from rtml.core.schemas import Event
    from rtml.core.timeutil import now_ms
    from rtml.features.plan import plan_batch

    config = load_config(settings.platform_config_path())
    now = now_ms()
    evs = [
        Event(event_id=f"e{i}", ts=now, received_at=now, **e) for i, e in enumerate(orjson.loads(bodies[0])["events"])
    ]
    plan = plan_batch(evs, config, now)
    return sum(len(ep.events) for ep in plan.entities.values()) / len(evs)


async def send_events(client: Any, urls: Sequence[str], bodies: Sequence[bytes], batch: int, rate: float, secs: float,
                      headers: dict[str, str]) -> int:  # fmt: skip
    """Post a batch every ``batch / rate`` s for ``secs`` (without waiting for answers), to the ingest
    replicas in turn; events accepted."""
    accepted = 0
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()

    async def post(url: str, body: bytes) -> None:
        nonlocal accepted
        r = await client.post(url, content=body, headers=headers)
        if r.status_code != 202:
            raise RuntimeError(f"ingest answered {r.status_code}: {r.text[:200]}")
        accepted += int(orjson.loads(r.content)["accepted"])

    k = 0
    while (due := start + k * batch / rate) < start + secs:
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(post(urls[k % len(urls)], bodies[k % len(bodies)])))
        k += 1
    await asyncio.gather(*tasks)
    return accepted


async def drive(host: str, ports: Sequence[int], raw: Sequence[bytes], concurrency: int, secs: float
                ) -> tuple[int, int]:  # fmt: skip
    """``concurrency`` keep-alive connections (spread over the serving replicas' ports) sending the pre-built
    requests in turn: (answered 200, other). The Host header names replica 0's port, which uvicorn ignores."""
    from rtml.bench.rawhttp import RawConnection

    ok = bad = 0
    end = time.perf_counter() + secs

    async def worker(k: int) -> None:
        nonlocal ok, bad
        i = k
        async with RawConnection(host, ports[k % len(ports)]) as conn:
            while time.perf_counter() < end:
                status, _ = await conn.request(raw[i % len(raw)])
                ok, bad = (ok + 1, bad) if status == 200 else (ok, bad + 1)
                i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return ok, bad


class TopicMeter:
    """Records and bytes appended to rtml's topics between ``mark()`` and ``measure()``, read back."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.marks: dict[Any, int] = {}

    async def _consumer(self) -> Any:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from rtml.core.kafka import TOPICS, client_options

        c = AIOKafkaConsumer(**client_options(self.settings.kafka), enable_auto_commit=False, group_id=None,
                             fetch_max_wait_ms=100, max_partition_fetch_bytes=8 << 20)  # fmt: skip
        await c.start()
        tps = []
        for t in TOPICS:
            name = self.settings.topic(t)
            for p in sorted(c.partitions_for_topic(name) or await _partitions(c, name)):
                tps.append(TopicPartition(name, p))
        c.assign(tps)
        return c

    async def _drain(self, c: Any, count: dict[str, list[int]] | None) -> dict[Any, int]:
        """Read to the end of every assigned partition; positions there (the true end on every broker)."""
        quiet = 0
        while quiet < 2:
            batch = await c.getmany(timeout_ms=300, max_records=20_000)
            quiet = 0 if batch else quiet + 1
            if count is not None:
                for tp, recs in batch.items():
                    acc = count.setdefault(tp.topic, [0, 0, 0])
                    for r in recs:
                        acc[0] += 1
                        acc[1] += (
                            len(r.key or b"") + len(r.value or b"") + sum(len(h[0]) + len(h[1]) for h in r.headers)
                        )
                        acc[2] += record_v2_bytes(r.key, r.value, list(r.headers))
        return {tp: await c.position(tp) for tp in c.assignment()}

    async def mark(self) -> None:
        c = await self._consumer()
        try:
            await c.seek_to_end()  # Tansu answers the last batch's base offset: drained from there
            self.marks = await self._drain(c, None)
        finally:
            await c.stop()

    async def measure(self) -> dict[str, dict[str, float]]:
        c = await self._consumer()
        counts: dict[str, list[int]] = {}
        try:
            for tp in c.assignment():
                c.seek(tp, self.marks.get(tp, 0))
            await self._drain(c, counts)
        finally:
            await c.stop()
        return {t.removeprefix(self.settings.topic_prefix): {"records": n, "payload_bytes": b, "v2_bytes": v}
                for t, (n, b, v) in counts.items()}  # fmt: skip


async def _partitions(c: Any, topic: str) -> set[int]:
    await c._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public "refresh metadata"
    return set(c.partitions_for_topic(topic) or ())


def kafka_per_unit(topics: dict[str, dict[str, float]], units: int) -> dict[str, dict[str, float]]:
    out = {}
    for t, v in topics.items():
        if v["records"]:
            out[t] = {
                "records": round(v["records"] / units, 3),
                "payload_bytes": round(v["payload_bytes"] / v["records"], 1),
                "record_bytes": round(v["v2_bytes"] / v["records"], 1),
                "bytes_per_unit": round(v["v2_bytes"] / units, 1),
            }
    return out


async def measure(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    import httpx

    from rtml.bench.common import auth_headers, machine, run_id
    from rtml.bench.rawhttp import build_request
    from rtml.core.redis import connect

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host  # noqa: S104
    urls = replica_urls(settings, host)
    ports = {s: [int(u.rsplit(":", 1)[1]) for u in urls[s]] for s in SERVICES}
    broker_port = int(settings.kafka.bootstrap.split(",")[0].rsplit(":", 1)[1])
    redis_port = int(re.search(r":(\d+)(/|$)", settings.redis.url.split("@")[-1]).group(1))  # type: ignore[union-attr]
    pids = {s: sorted({p for port in ports[s] for p in pids_listening(port)}) for s in SERVICES}
    pids["broker"], pids["redis"] = pids_listening(broker_port), pids_listening(redis_port)
    missing = [k for k, v in pids.items() if not v]
    if missing:
        raise SystemExit(f"capacity: no local process listens for {', '.join(missing)} (is rtml up running here?)")
    redis = connect(settings)
    probe = Probe(settings, pids, redis, urls)
    meter = TopicMeter(settings)
    prefix = f"cap{run_id()}-"
    bodies = event_bodies(prefix, args.users, args.items, args.event_batch, 50)
    ev_headers = {"content-type": "application/json", **auth_headers(settings, "ingest")}
    p_headers = {"content-type": "application/json", **auth_headers(settings, "predict")}
    n = max(args.users, args.items)
    predict_raw = [
        build_request("POST", host, settings.serving_port, "/v1/predict", orjson.dumps(
            {"entities": {"user_id": f"{prefix}u{i % args.users}", "item_id": f"{prefix}t{i % args.items}"}}),
            p_headers)
        for i in range(min(n, 2000))
    ]  # fmt: skip
    rec_raw = [
        build_request("POST", host, settings.serving_port, "/v1/recommend", orjson.dumps(
            {"user_id": f"{prefix}u{i % args.users}", "k": 10,
             "candidates": [f"{prefix}t{(i + j) % args.items}" for j in range(args.candidates)]}), p_headers)
        for i in range(min(n, 500))
    ]  # fmt: skip
    consumers = [*urls["features"], *urls["feedback"]]
    ingest = [f"{u}/v1/events" for u in urls["ingest"]]
    rounds: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=30.0) as client:
        # warm-up: every path once, entities exist before the first measured predictions
        await send_events(client, ingest, bodies, args.event_batch, args.event_rate,
                          min(3.0, args.phase_s), ev_headers)  # fmt: skip
        await drive(host, ports["serving"], predict_raw, 2, 1.0)
        await drive(host, ports["serving"], rec_raw, 2, 1.0)
        await settle(client, consumers, 0)
        for r in range(args.rounds):
            out: dict[str, Any] = {}
            s0 = await probe.snapshot()
            await asyncio.sleep(args.idle_s)
            idle = deltas(s0, await probe.snapshot())
            out["idle_cpu_pct"] = {k: round(v / idle["seconds"] * 100, 1) for k, v in idle["cpu"].items()}
            for phase in ("events", "predict", "recommend"):
                base_done, _ = consumer_state([await scrape(client, u) for u in consumers])
                await meter.mark()
                a = await probe.snapshot()
                t0 = time.perf_counter()
                if phase == "events":
                    units = await send_events(client, ingest, bodies, args.event_batch,
                                              args.event_rate, args.phase_s, ev_headers)  # fmt: skip
                    bad = 0
                    expect = base_done + units  # at least features' records
                else:
                    units, bad = await drive(host, ports["serving"], predict_raw if phase == "predict" else rec_raw,
                                             args.concurrency, args.phase_s)  # fmt: skip
                    expect = base_done + units
                load_s = time.perf_counter() - t0
                drain_s = await settle(client, consumers, expect)
                b = await probe.snapshot()
                topics = await meter.measure()
                pu = per_unit(deltas(a, b), idle, max(1, units))
                pu.update(
                    load_s=round(load_s, 2), drain_s=round(drain_s, 2), errors=bad,
                    units_per_s=round(units / load_s, 1), kafka=kafka_per_unit(topics, max(1, units)),
                )  # fmt: skip
                out[phase] = pu
                print(f"round {r + 1}/{args.rounds} {phase}: {units} units, total CPU "
                      f"{pu['cpu_us']['total']:.0f} µs/unit", file=sys.stderr)  # fmt: skip
            rounds.append(out)
        ent_per_event = entities_per_event(settings, bodies)
    memory = None
    if not args.skip_memory:
        from rtml.bench.memory import bench_memory

        memory = await bench_memory(settings)
    await redis.aclose()
    out = summarise(rounds, memory, ent_per_event, args, machine())
    out["processes"] = {k: len(v) for k, v in pids.items()}  # replicas found per service (by listening port)
    return out


def summarise(rounds: list[dict[str, Any]], memory: dict[str, Any] | None, ent_per_event: float,
              args: argparse.Namespace, mach: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    per: dict[str, Any] = {}
    for phase in ("events", "predict", "recommend"):
        rs = [r[phase] for r in rounds]
        cpu = {k: spread([x["cpu_us"].get(k) for x in rs]) for k in (*PROCESSES, "total")}
        topics = sorted({t for x in rs for t in x["kafka"]})
        per[phase] = {
            "cpu_us": cpu,
            "redis_commands": spread([x["redis_commands"] for x in rs]),
            "redis_commands_by_name": {
                k: spread([x["redis_commands_by_name"].get(k, 0.0) for x in rs])
                for k in sorted({k for x in rs for k in x["redis_commands_by_name"]})
            },
            "redis_cpu_us": spread([x["redis_cpu_us"] for x in rs]),
            "redis_bytes_retained": spread([x["redis_bytes_retained"] for x in rs]),
            "kafka": {t: {m: spread([x["kafka"].get(t, {}).get(m) for x in rs])
                          for m in ("records", "payload_bytes", "record_bytes", "bytes_per_unit")} for t in topics},
            "units_per_s": spread([x["units_per_s"] for x in rs]),
            "errors": sum(x["errors"] for x in rs),
        }  # fmt: skip
    per["events"]["entities_per_event"] = round(ent_per_event, 3)
    if memory is not None:
        per["memory"] = {
            "per_entity_per_feature_bytes": memory["per_entity_per_feature_bytes"],
            "per_entity_bytes": memory["per_entity_bytes"],
            "seen_bytes_per_event": memory["seen_set"]["bytes_per_event"],
            "features": memory["params"]["features"],
            "events_per_entity": memory["params"]["events_per_entity"],
        }
    return {
        "bench": "capacity",
        "machine": mach,
        "params": {k: v for k, v in vars(args).items() if k not in ("out", "sizing")},
        "note": "CPU time per unit of work (utime+stime of each process, idle rate subtracted); medians over "
        "rounds with min and max. The load generator's CPU is not counted.",
        "per_unit": per,
        "rounds": rounds,
    }


def pool(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several runs' summaries as one: every round of every run, medians (min, max) over all of them; the
    memory figures are medians of the runs'."""
    rounds = [r for s in summaries for r in s["rounds"]]
    mems = [s["per_unit"]["memory"] for s in summaries if "memory" in s["per_unit"]]
    memory = None
    if mems:
        med = {k: spread([m[k] for m in mems])["median"] for k in mems[0]}
        memory = {"per_entity_per_feature_bytes": med["per_entity_per_feature_bytes"],
                  "per_entity_bytes": med["per_entity_bytes"],
                  "seen_set": {"bytes_per_event": med["seen_bytes_per_event"]},
                  "params": {"features": med["features"], "events_per_entity": med["events_per_entity"]}}  # fmt: skip
    first = summaries[0]
    args = argparse.Namespace(**{**first["params"], "runs": len(summaries)})
    out = summarise(rounds, memory, first["per_unit"]["events"]["entities_per_event"], args, first["machine"])
    del out["rounds"]
    return out


# ---------------------------------------------------------------------------------------------------------
# Running: an own `rtml up` on free ports, or the one in the current directory.
# ---------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def own_platform(replicas: int = 1) -> Iterator[Path]:
    """``rtml up`` in a scratch directory on free ports; its directory once ``endpoints.env`` exists."""
    work = Path(tempfile.mkdtemp(prefix="rtml-capacity-"))
    env = {**os.environ, **{f"RTML_{s.upper()}_PORT": str(_free_port()) for s in SERVICES}}
    for var in ("RTML_KAFKA_BOOTSTRAP", "RTML_REDIS_URL"):
        env.pop(var, None)
    log = open(work / "up.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "rtml.cli.main", "up", *(["--replicas", str(replicas)] if replicas > 1 else [])],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (work / ".rtml" / "endpoints.env").is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"capacity: rtml up did not start; see {work / 'up.log'}")
            time.sleep(0.5)
        yield work
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--use-running", action="store_true", help="measure the rtml up of this directory")
    ap.add_argument("--replicas", type=int, default=1, help="start rtml up --replicas N (not with --use-running)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=3.0)
    ap.add_argument("--phase-s", type=float, default=8.0)
    ap.add_argument("--event-rate", type=float, default=8000.0)
    ap.add_argument("--event-batch", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--items", type=int, default=1_000)
    ap.add_argument("--skip-memory", action="store_true", help="skip rtml bench memory")
    ap.add_argument("--out", type=Path, help="also write the JSON summary here")
    ap.add_argument("--sizing", type=Path, nargs="+",
                    help="print the pooled figures and the sizing tables from summaries this script wrote")  # fmt: skip
    args = ap.parse_args(argv)
    if args.sizing:
        pooled = pool([orjson.loads(f.read_bytes()) for f in args.sizing])
        print(orjson.dumps(pooled, option=orjson.OPT_INDENT_2).decode())
        inputs = sizing_inputs(pooled["per_unit"])
        print(orjson.dumps(inputs, option=orjson.OPT_INDENT_2).decode())
        print()
        print(sizing_markdown(inputs))
        return

    def run_here() -> dict[str, Any]:
        from rtml.cli.common import load_client_settings

        settings = load_client_settings()
        return asyncio.run(measure(args, settings))

    if args.use_running:
        result = run_here()
    else:
        with own_platform(args.replicas) as work:
            cwd = Path.cwd()
            os.chdir(work)
            try:
                result = run_here()
            finally:
                os.chdir(cwd)
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
