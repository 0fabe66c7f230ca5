"""The in-process benchmarks (read cost, memory) against the session redis-server: structure and sanity.

Speed is never asserted (project rule): only that the figures exist, are positive and that a one-entity
read is one Redis round trip.
"""

from __future__ import annotations

import pytest

from rtml.bench import BENCHES, arun_bench, bench_read
from rtml.core.redis import connect
from rtml.core.settings import Settings

pytestmark = pytest.mark.integration


async def _keys_with(settings: Settings, fragment: str) -> list[bytes]:
    redis = connect(settings)
    try:
        return [k async for k in redis.scan_iter(match=f"{settings.redis.key_prefix}{fragment}*")]
    finally:
        await redis.aclose()


async def test_bench_read_counts_one_round_trip_per_read(settings: Settings) -> None:
    out = await bench_read(settings, features=20, n=300, events=300, repeats=3)
    assert out["bench"] == "read"
    assert out["machine"]["cpus"] and out["machine"]["loop"] in ("asyncio", "uvloop")
    assert out["params"]["features"] == 20 and out["params"]["non_null_values"] > 0
    read = out["read"]
    assert read["n"] == 300 and out["params"]["reads"] == 300
    assert read["round_trips_per_read"] == 1 and read["redis_server_us_per_read"] > 0
    assert read["p50_us"] > 0 and read["p99_us"] >= read["p50_us"] and read["client_cpu_us"] > 0
    assert out["baseline_ping"]["p50_us"] > 0
    assert out["ratio_to_ping"]["wall_p50"] > 0
    assert out["targets"]["round_trips_per_read"]["meets"] is True
    assert isinstance(out["targets"]["client_cpu_us_per_read"]["meets"], bool)
    assert await _keys_with(settings, "bench-") == []  # cleans up after itself


async def test_bench_memory_reports_positive_sizes(settings: Settings) -> None:
    out = await arun_bench("memory", settings, entities=5, events_per_entity=50, sample=2)
    assert out["bench"] == "memory"
    assert out["applied_events"] == 5 * 50
    assert out["per_entity_bytes"] > 0 and out["per_entity_per_feature_bytes"] > 0
    assert out["seen_set"]["members"] == 50 and out["seen_set"]["bytes_per_event"] > 0
    by_agg = out["per_tile_bytes_by_agg"]
    assert by_agg and all(v["bytes"] > 0 and v["tiles"] > 0 for v in by_agg.values())
    windowed = [f for f in out["features"].values() if f["tiles"]]
    assert windowed and all(f["bytes"] > 0 and f["bytes_per_tile"] > 0 for f in windowed)
    assert await _keys_with(settings, "bench-") == []


async def test_unknown_benchmark_is_a_clear_error(settings: Settings) -> None:
    assert set(BENCHES) == {"ingest", "freshness", "read", "memory", "predict"}
    with pytest.raises(ValueError, match="unknown benchmark"):
        await arun_bench("nope", settings)
