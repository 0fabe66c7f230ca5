"""``run_bench(kind, settings, **opts)``: one entry point for the CLI, under uvloop when it is installed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from rtml.bench.freshness import bench_freshness
from rtml.bench.ingest import bench_ingest
from rtml.bench.memory import bench_memory
from rtml.bench.overload import bench_overload
from rtml.bench.predict import bench_predict
from rtml.bench.read import bench_read
from rtml.bench.recommend import bench_recommend
from rtml.core.settings import Settings

BENCHES: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "ingest": bench_ingest,
    "freshness": bench_freshness,
    "read": bench_read,
    "memory": bench_memory,
    "predict": bench_predict,
    "recommend": bench_recommend,
    "overload": bench_overload,
}


async def arun_bench(kind: str, settings: Settings, **opts: Any) -> dict[str, Any]:
    """Run one benchmark in the current event loop."""
    try:
        bench = BENCHES[kind]
    except KeyError:
        raise ValueError(f"unknown benchmark {kind!r}; choose one of {', '.join(BENCHES)}") from None
    return await bench(settings, **opts)


def run_bench(kind: str, settings: Settings, **opts: Any) -> dict[str, Any]:
    """Run one benchmark to completion in a fresh event loop (uvloop if available) and return its summary."""
    if kind not in BENCHES:
        raise ValueError(f"unknown benchmark {kind!r}; choose one of {', '.join(BENCHES)}")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(arun_bench(kind, settings, **opts))
    return uvloop.run(arun_bench(kind, settings, **opts))
