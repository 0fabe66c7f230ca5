"""The benchmarks against the session broker and redis-server: structure and sanity.

read and memory run in-process; predict and recommend drive a serving app under uvicorn and the baseline
shipped in ``benchmarks/`` (started by the bench as a subprocess).

Speed is never asserted (project rule): only that the figures exist, are positive and that a one-entity
read is one Redis round trip.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from rtml.bench import BENCHES, arun_bench, bench_read
from rtml.cli.bench import bench as bench_cmd
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
    assert set(BENCHES) == {"ingest", "freshness", "read", "memory", "predict", "recommend", "overload"}
    with pytest.raises(ValueError, match="unknown benchmark"):
        await arun_bench("nope", settings)


# --- predict / recommend against a real serving app and the shipped baseline -------------------------------


def _check_level(level: dict[str, Any], concurrency: int, rounds: int) -> None:
    assert level["concurrency"] == concurrency and len(level["rounds"]) == rounds
    for side in ("rtml", "baseline"):
        m = level[side]
        assert m["requests"] > 0 and m["errors"] == 0 and m["error_kinds"] == {}, m
        assert m["req_per_s"] > 0 and 0 < m["p50_ms"] <= m["p90_ms"] <= m["p99_ms"] <= m["max_ms"], m
    ratios = level["ratio_to_baseline"]
    assert set(ratios) == {"req_per_s", "p50_ms", "p99_ms"}
    assert all(isinstance(v, float) and v > 0 for v in ratios.values()), ratios


async def test_bench_recommend_against_the_baseline(serving: Settings) -> None:
    out = await arun_bench(
        "recommend", serving, duration_s=0.8, concurrency=(1, 4), rounds=2, users=20, items=30, client="raw"
    )
    assert out["bench"] == "recommend" and out["client"] == "asyncio-raw"
    assert out["params"]["candidates"] == 100 and out["params"]["items"] == 100  # items grow to the candidates
    assert out["params"]["model"] == "ctr" and out["params"]["model_features"] == 3
    assert out["baseline"]["app"] == "benchmarks/baseline_app.py"
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 4]
    for level, c in zip(out["levels"], (1, 4), strict=True):
        _check_level(level, c, rounds=2)
    assert set(out["targets"]) == {"c1_p99_ms", "c1_req_per_s_vs_baseline", "c16_req_per_s_vs_baseline"}
    assert isinstance(out["targets"]["c1_p99_ms"]["meets"], bool)
    assert out["targets"]["c16_req_per_s_vs_baseline"]["meets"] is None  # c=16 not measured
    assert await _keys_with(serving, "bench-") == []  # the baseline's seeded hashes are gone


async def test_bench_predict_against_the_baseline(serving: Settings) -> None:
    out = await arun_bench("predict", serving, duration_s=0.4, concurrency=(2,), rounds=1, users=10, items=10)
    assert out["bench"] == "predict"
    assert out["client"] == ("wrk" if shutil.which("wrk") else "asyncio-raw")
    _check_level(out["levels"][0], 2, rounds=1)
    assert {"c1_p50_ms", "c1_p99_ms", "c16_req_per_s", "c16_p99_ms"} <= set(out["targets"])
    assert await _keys_with(serving, "bench-") == []


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not on PATH (Debian package wrk)")
async def test_bench_predict_with_wrk(serving: Settings) -> None:
    out = await arun_bench("predict", serving, duration_s=1, concurrency=(1,), rounds=1, client="wrk")
    assert out["client"] == "wrk"
    _check_level(out["levels"][0], 1, rounds=1)


def test_cli_rejects_client_for_other_benches() -> None:
    cli = typer.Typer()
    cli.command()(bench_cmd)
    result = CliRunner().invoke(cli, ["read", "--client", "raw"])
    assert result.exit_code != 0
    assert "--client applies to predict, recommend, not read" in f"{result.exception} {result.output}"
