"""The sampler's file side: what is kept of a scrape, rotation bounds, reading back."""

from __future__ import annotations

import math
from pathlib import Path

from rtml.report.history import Sampler, load_history, select_samples

TEXT = """\
# HELP rtml_http_requests_total HTTP requests by service, route and status.
# TYPE rtml_http_requests_total counter
rtml_http_requests_total{service="serving",route="/v1/predict",method="POST",status="200"} 7.0
rtml_http_requests_total{service="serving",route="/healthz",method="GET",status="200"} 99.0
rtml_http_requests_total{service="serving",route="/metrics",method="GET",status="200"} 12.0
# HELP rtml_http_requests_created HTTP requests by service, route and status.
# TYPE rtml_http_requests_created gauge
rtml_http_requests_created{service="serving",route="/v1/predict",method="POST",status="200"} 1.7e9
# HELP rtml_model_quality Online quality.
# TYPE rtml_model_quality gauge
rtml_model_quality{model="ctr",version="2",metric="auc"} 0.71
rtml_model_quality{model="ctr",version="2",metric="log_loss"} NaN
rtml_model_quality{model="ctr",version="2",metric="score_psi"} 0.02
# HELP rtml_features_freshness_seconds From ingest receive time to the feature update in Redis.
# TYPE rtml_features_freshness_seconds histogram
rtml_features_freshness_seconds_bucket{le="0.005"} 3.0
rtml_features_freshness_seconds_bucket{le="+Inf"} 4.0
rtml_features_freshness_seconds_count 4.0
rtml_features_freshness_seconds_sum 0.1
# HELP rtml_redis_call_duration_seconds Redis round trips by operation.
# TYPE rtml_redis_call_duration_seconds histogram
rtml_redis_call_duration_seconds_bucket{op="get",le="+Inf"} 4.0
"""


def test_select_samples_keeps_only_what_the_report_draws() -> None:
    kept = select_samples(TEXT)
    assert kept == [
        ("rtml_http_requests_total", {"service": "serving", "route": "/v1/predict", "method": "POST",
                                      "status": "200"}, 7.0),
        ("rtml_model_quality", {"model": "ctr", "version": "2", "metric": "auc"}, 0.71),
        ("rtml_features_freshness_seconds_bucket", {"le": "0.005"}, 3.0),
        ("rtml_features_freshness_seconds_bucket", {"le": "+Inf"}, 4.0),
    ]  # fmt: skip


def test_rotation_bounds_the_files_and_reading_spans_both(tmp_path: Path) -> None:
    sampler = Sampler({}, tmp_path, max_bytes=400)
    samples = select_samples(TEXT)
    for k in range(12):
        sampler.write("serving", 1000.0 + k, samples)
    current, rotated = tmp_path / "serving.jsonl", tmp_path / "serving.jsonl.1"
    assert current.stat().st_size <= 400 and rotated.stat().st_size <= 400
    history = load_history(tmp_path)
    times = [s.t for s in history.snapshots["serving"]]
    assert times == sorted(times) and times[-1] == 1011.0  # the newest, in order, across both files
    assert len(times) < 12  # the oldest were rotated away
    assert load_history(tmp_path, since=1010.5).snapshots["serving"][0].t == 1011.0
    (snap,) = load_history(tmp_path, since=1011).snapshots["serving"]
    assert snap.samples == samples and not math.isnan(snap.samples[0][2])
