"""``POST /v1/recommend`` (100 candidates, k=10 by default) against the baseline's pipeline of N HGETALLs +
one ``predict_proba`` on N rows; the machinery is :func:`rtml.bench.predict.bench_serving`."""

from __future__ import annotations

from typing import Any

from rtml.bench.predict import bench_serving
from rtml.core.settings import Settings


async def bench_recommend(settings: Settings, **opts: Any) -> dict[str, Any]:
    """req/s, p50/p90/p99 and errors of recommend at each concurrency, medians of interleaved rounds."""
    return await bench_serving("recommend", settings, **opts)
