"""The report's maths on synthetic snapshots, against values computed by hand."""

from __future__ import annotations

import math

import pytest

from rtml.report.history import History, Snapshot
from rtml.report.render import build_report, owned_snapshots
from rtml.report.series import (
    bucket_increase,
    counter_increase,
    covered_seconds,
    quantiles,
    rates,
    sum_buckets_by,
    sum_by,
    total_buckets,
    total_increase,
    typical_interval,
)

INF = math.inf


def test_counter_increase_treats_a_lower_value_as_a_restart() -> None:
    assert counter_increase(10, 25) == 15
    assert counter_increase(25, 7) == 7  # restarted from 0, then counted 7


def test_rates_per_window_with_a_reset() -> None:
    pts = [(0.0, 0.0), (10.0, 50.0), (20.0, 100.0), (30.0, 20.0), (40.0, 70.0)]
    assert rates(pts, step_s=10, max_gap_s=35) == [(10.0, 5.0), (20.0, 5.0), (30.0, 2.0), (40.0, 5.0)]
    # windows of 20 s: 100 / 20, then (20 after the reset + 50) / 20
    assert rates(pts, step_s=20, max_gap_s=35) == [(20.0, 5.0), (40.0, 3.5)]
    assert total_increase(pts, max_gap_s=35) == 170.0


def test_a_gap_breaks_the_line_and_counts_nothing() -> None:
    pts = [(0.0, 0.0), (10.0, 10.0), (100.0, 500.0), (110.0, 510.0)]
    out = rates(pts, step_s=10, max_gap_s=35)
    assert out[0] == (10.0, 1.0) and out[2] == (110.0, 1.0)
    assert out[1][0] == 10.0 and math.isnan(out[1][1])
    assert total_increase(pts, max_gap_s=35) == 20.0  # the 490 across the gap is not attributed
    assert covered_seconds([t for t, _ in pts], max_gap_s=35) == 20.0
    assert typical_interval([t for t, _ in pts]) == 10.0


def test_bucket_increase_and_restart() -> None:
    before = {0.1: 10.0, 0.2: 20.0, INF: 20.0}
    assert bucket_increase(before, {0.1: 12.0, 0.2: 25.0, INF: 26.0}) == {0.1: 2.0, 0.2: 5.0, INF: 6.0}
    after_restart = {0.1: 0.0, 0.2: 4.0, INF: 4.0}
    assert bucket_increase(before, after_restart) == after_restart


def test_quantiles_per_window_by_hand() -> None:
    pts = [
        (0.0, {0.1: 0.0, 0.2: 0.0, INF: 0.0}),
        (10.0, {0.1: 10.0, 0.2: 20.0, INF: 20.0}),  # 10 in (0, 0.1], 10 in (0.1, 0.2]
        (20.0, {0.1: 0.0, 0.2: 4.0, INF: 4.0}),  # restarted: 4 in (0.1, 0.2]
        (30.0, {0.1: 0.0, 0.2: 4.0, INF: 4.0}),  # nothing observed
    ]
    p75 = quantiles(pts, 0.75, step_s=10, max_gap_s=35)
    # window 1: rank 15 -> 5th of the 10 in (0.1, 0.2] -> 0.15; window 2: rank 3 of 4 in (0.1, 0.2] -> 0.175
    assert [t for t, _ in p75] == [10.0, 20.0, 30.0]
    assert p75[0][1] == pytest.approx(0.15) and p75[1][1] == pytest.approx(0.175) and math.isnan(p75[2][1])
    p99 = quantiles(pts, 0.99, step_s=10, max_gap_s=35)
    assert p99[0][1] == pytest.approx(0.198)  # rank 19.8: 0.1 + 0.1 * 9.8 / 10
    # over the range: 10 in the first bucket, 14 in the second
    assert total_buckets(pts, max_gap_s=35) == {0.1: 10.0, 0.2: 24.0, INF: 24.0}


def snap(t: float, service: str, *samples: tuple[str, dict[str, str], float]) -> Snapshot:
    return Snapshot(t, service, list(samples))


def http(service: str, route: str, status: str, v: float) -> tuple[str, dict[str, str], float]:
    labels = {"service": service, "route": route, "method": "POST", "status": status}
    return ("rtml_http_requests_total", labels, v)


def hist(name: str, buckets: dict[float, float], **labels: str) -> list[tuple[str, dict[str, str], float]]:
    return [(name, {**labels, "le": "+Inf" if math.isinf(le) else str(le)}, v) for le, v in buckets.items()]


def test_sum_by_groups_and_sums_label_sets() -> None:
    snaps = [
        snap(0, "serving", http("serving", "/v1/predict", "200", 5), http("serving", "/v1/predict", "503", 1)),
        snap(10, "serving", http("serving", "/v1/predict", "200", 9), http("serving", "/v1/predict", "503", 1),
             http("serving", "/v1/recommend", "200", 2)),
    ]  # fmt: skip
    assert sum_by(snaps, "rtml_http_requests_total", lambda lb: lb["service"]) == {"serving": [(0, 6.0), (10, 12.0)]}
    by_route = sum_by(snaps, "rtml_http_requests_total", lambda lb: lb["route"])
    # recommend was not called before 10 s: it reads 0 at 0 s, so its 2 requests show in the rate
    assert by_route == {"/v1/predict": [(0, 6.0), (10, 10.0)], "/v1/recommend": [(0, 0.0), (10, 2.0)]}
    assert rates(by_route["/v1/recommend"], step_s=10, max_gap_s=35) == [(10, 0.2)]
    h = sum_buckets_by([snap(0, "x", *hist("h_bucket", {0.1: 1, INF: 2}, r="a"), *hist("h_bucket", {0.1: 3, INF: 3},
                       r="b"))], "h_bucket", lambda _: "all")  # fmt: skip
    assert h == {"all": [(0, {0.1: 4.0, INF: 5.0})]}


def _history() -> History:
    """Two services, 10 s apart, hand-made: serving answers 100 then 300 requests; features applies events."""
    lat0 = hist("rtml_http_request_duration_seconds_bucket", {0.001: 0, 0.002: 0, INF: 0},
                service="serving", route="/v1/predict", method="POST")  # fmt: skip
    lat1 = hist("rtml_http_request_duration_seconds_bucket", {0.001: 50, 0.002: 100, INF: 100},
                service="serving", route="/v1/predict", method="POST")  # fmt: skip
    lat2 = hist("rtml_http_request_duration_seconds_bucket", {0.001: 50, 0.002: 400, INF: 400},
                service="serving", route="/v1/predict", method="POST")  # fmt: skip
    fresh = [{0.01: 0, 0.05: 0, INF: 0}, {0.01: 90, 0.05: 100, INF: 100}, {0.01: 90, 0.05: 200, INF: 200}]
    lag = ("rtml_consumer_lag_records", {"consumer": "features", "group": "g", "topic": "e", "partition": "0"})
    lag1 = ("rtml_consumer_lag_records", {"consumer": "features", "group": "g", "topic": "e", "partition": "1"})
    auc = ("rtml_model_quality", {"model": "ctr", "version": "1", "metric": "auc"})
    ll = ("rtml_model_quality", {"model": "ctr", "version": "1", "metric": "log_loss"})
    h = History()
    # every process declares every metric: serving shows the features' freshness histogram, at 0
    zero = hist("rtml_features_freshness_seconds_bucket", {0.01: 0, 0.05: 0, INF: 0})
    h.snapshots["serving"] = [
        snap(1000, "serving", http("serving", "/v1/predict", "200", 0), *lat0, *zero),
        snap(1010, "serving", http("serving", "/v1/predict", "200", 100), *lat1, *zero),
        snap(1020, "serving", http("serving", "/v1/predict", "200", 400), *lat2, *zero),
    ]
    h.snapshots["features"] = [
        snap(
            1001 + 10 * k,
            "features",
            *hist("rtml_features_freshness_seconds_bucket", fresh[k]),
            (*lag, 5.0 * k),
            (*lag1, 1.0),
        )  # fmt: skip
        for k in range(3)
    ]
    h.snapshots["feedback"] = [snap(1002 + 10 * k, "feedback", (*auc, 0.7 + k / 100), (*ll, 0.5)) for k in range(3)]
    return h


def test_build_report_panels_by_hand() -> None:
    rep = build_report(_history(), 1000, 1030)
    assert rep.snapshots == 9 and rep.step_s == 10 and rep.since == 1000 and rep.until == 1030
    traffic, latency, freshness, lag, auc, log_loss = rep.panels
    (serving,) = traffic.lines
    assert serving.label == "serving requests/s"
    assert [v for _, v in serving.points] == [10.0, 30.0] and serving.over_range == 20.0  # 400 in 20 s
    (route,) = latency.lines
    assert route.label == "serving POST /v1/predict"
    # window 2: 300 observations all in (1 ms, 2 ms]: p99 rank 297 -> 1 + 297/300 ms
    assert route.points[1][1] == pytest.approx(1.99)
    # whole range: 50 <= 1 ms, 350 in (1, 2]: rank 396 -> 1 + (396 - 50) / 350
    assert route.over_range == pytest.approx(1 + 346 / 350)
    p50, p99 = freshness.lines  # from features, where it moved, not serving's zeros
    assert p50.points[0][1] == pytest.approx(50 / 90 * 10)  # rank 50 of 90 in (0, 10 ms]
    assert p99.points[1][1] == pytest.approx(10 + 40 * 99 / 100)  # window 2: 100 in (10, 50 ms], rank 99
    assert lag.lines[0].label == "features" and [v for _, v in lag.lines[0].points] == [1.0, 6.0, 11.0]
    assert auc.lines[0].label == "ctr v1" and auc.lines[0].over_range == pytest.approx(0.72)
    assert log_loss.lines[0].last == 0.5


def test_a_series_shown_by_several_services_counts_once() -> None:
    """Apps sharing one process (tests) each show every metric: the report must not add them up."""
    h = _history()
    h.snapshots["ingest"] = [snap(s.t - 0.5, "ingest", *s.samples) for s in h.snapshots["serving"]]
    owned = owned_snapshots(h)
    assert all(not s.samples for s in owned["serving"])  # ingest (first in service order) owns them
    traffic = build_report(h, 1000, 1030).panels[0]
    assert [line.over_range for line in traffic.lines] == [20.0]
