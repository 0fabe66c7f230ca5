"""Load benchmarks against a running stack (``rtml bench``), each returning a JSON-able summary.

Project rule: speed goals live here, never in timed unit tests. Every benchmark reports medians and a
baseline measured in the same run (ratios against it), because the machine is small and noisy.
"""

from rtml.bench.freshness import bench_freshness
from rtml.bench.ingest import bench_ingest
from rtml.bench.memory import bench_memory
from rtml.bench.predict import bench_predict
from rtml.bench.read import bench_read
from rtml.bench.recommend import bench_recommend
from rtml.bench.runner import BENCHES, arun_bench, run_bench

__all__ = [
    "BENCHES",
    "arun_bench",
    "bench_freshness",
    "bench_ingest",
    "bench_memory",
    "bench_predict",
    "bench_read",
    "bench_recommend",
    "run_bench",
]
