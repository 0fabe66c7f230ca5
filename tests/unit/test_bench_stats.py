"""The benchmarks' statistics on known data (no timing is asserted anywhere)."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from rtml.bench.common import target
from rtml.bench.memory import glob_escape, tile_of_field
from rtml.bench.stats import (
    above_top_bucket,
    delta_buckets,
    histogram_quantile,
    histogram_summary,
    latency_summary,
    median,
    parse_histograms,
    percentile,
    ratio,
)

INF = math.inf


def test_percentile_interpolates_between_closest_ranks() -> None:
    data = [float(x) for x in range(1, 101)]  # 1..100, shuffled order must not matter
    data.reverse()
    assert percentile(data, 0) == 1
    assert percentile(data, 100) == 100
    assert percentile(data, 50) == pytest.approx(50.5)
    assert percentile(data, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(data, 101)


def test_median_skips_unknowns_and_ratio_guards_zero() -> None:
    assert median([3, None, 1, 2]) == 2
    assert median([None]) is None
    assert ratio(3, 2) == 1.5
    assert ratio(1, 0) is None
    assert ratio(None, 1) is None


def test_latency_summary_in_ms_and_us() -> None:
    s = latency_summary([0.001, 0.002, 0.003])
    assert s["n"] == 3 and s["p50_ms"] == 2.0 and s["max_ms"] == 3.0 and s["mean_ms"] == 2.0
    u = latency_summary([0.0001], "us")
    assert u["p99_us"] == 100.0
    assert latency_summary([])["p50_ms"] is None


def test_histogram_quantile_matches_prometheus_interpolation() -> None:
    buckets = {0.1: 10.0, 0.2: 20.0, 0.5: 30.0, INF: 30.0}
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.03)  # 3rd of 10 in [0, 0.1]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.15)  # rank 15: halfway through (0.1, 0.2]
    assert histogram_quantile(1.0, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.0, buckets) == pytest.approx(0.0)


def test_histogram_quantile_edge_cases() -> None:
    # a rank in +Inf answers the highest finite bound, like PromQL
    assert histogram_quantile(0.9, {0.1: 5.0, INF: 10.0}) == pytest.approx(0.1)
    assert histogram_quantile(0.5, {0.1: 0.0, INF: 0.0}) is None  # no observations (NaN in PromQL)
    # a scrape racing an observation can make cumulative counts dip: treated as monotonic
    assert histogram_quantile(0.5, {0.1: 4.0, 0.2: 3.0, INF: 8.0}) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        histogram_quantile(0.5, {0.1: 1.0})  # no +Inf bucket
    with pytest.raises(ValueError):
        histogram_quantile(1.5, {INF: 1.0})


def test_parse_and_delta_of_a_real_exposition() -> None:
    registry = CollectorRegistry()
    h = Histogram("bench_demo_seconds", "demo", buckets=(0.01, 0.1, 1.0), registry=registry)
    for v in (0.005, 0.05, 0.05, 0.5):
        h.observe(v)
    before = parse_histograms(generate_latest(registry).decode(), ["bench_demo_seconds"])["bench_demo_seconds"]
    assert before == {0.01: 1.0, 0.1: 3.0, 1.0: 4.0, INF: 4.0}
    for _ in range(10):
        h.observe(0.02)
    after = parse_histograms(generate_latest(registry).decode())["bench_demo_seconds"]
    delta = delta_buckets(after, before)
    assert delta == {0.01: 0.0, 0.1: 10.0, 1.0: 10.0, INF: 10.0}
    # every new observation lies in (0.01, 0.1]: the median interpolates to the middle of that bucket
    assert histogram_quantile(0.5, delta) == pytest.approx(0.055)
    summary = histogram_summary(delta)
    assert summary["count"] == 10 and summary["p50_ms"] == pytest.approx(55.0)


def test_labelled_histograms_are_summed_over_label_sets() -> None:
    registry = CollectorRegistry()
    h = Histogram("bench_lab_seconds", "demo", ["op"], buckets=(0.1,), registry=registry)
    h.labels(op="a").observe(0.05)
    h.labels(op="b").observe(0.5)
    assert parse_histograms(generate_latest(registry).decode())["bench_lab_seconds"] == {0.1: 1.0, INF: 2.0}


def test_targets_and_field_helpers() -> None:
    assert target(40.0, 50)["meets"] is True
    assert target(60.0, 50)["meets"] is False
    assert target(25_000.0, 20_000, at_most=False) == {"target": ">= 20000", "measured": 25_000.0, "meets": True}
    assert target(None, 1)["meets"] is None
    assert tile_of_field("123") == "123"
    assert tile_of_field("s123") == "s123"[1:]
    assert tile_of_field("123|t9") == "123"
    assert tile_of_field("_u") is None
    assert glob_escape("p:{user:u[1]}*") == r"p:{user:u\[1\]}\*"


def test_quantiles_beyond_the_top_bucket_are_flagged_as_lower_bounds() -> None:
    buckets = {0.1: 5.0, 2.5: 6.0, INF: 10.0}
    assert above_top_bucket(0.5, buckets) is False
    assert above_top_bucket(0.99, buckets) is True
    summary = histogram_summary(buckets)
    assert summary["p99_ms"] == pytest.approx(2500.0)
    assert summary["above_top_bucket"] == ["p90_ms", "p99_ms"]
