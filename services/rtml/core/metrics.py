"""The one metrics module: every Prometheus metric of rtml is declared here.

Names follow Prometheus conventions (base units, ``_seconds``, ``_bytes``, ``_total``).

The ``service`` label. The HTTP metrics carry ``service`` themselves (their code is shared by all four
services and one query must cover all of them). Every other series gets ``service`` at scrape time from the
Prometheus target: deploy/prometheus/prometheus.yml labels each target ``service: ingest|features|serving|
feedback`` (any other Prometheus must set ``service`` on its targets the same way). Scrape with
``honor_labels: true`` so the HTTP metrics' own ``service`` is kept as is rather than renamed to
``exported_service`` (the values are the same either way). A metric that only one service emits
(``rtml_ingest_*``, ``rtml_features_*``, ``rtml_predictions_*``, ...) therefore needs no label of its own.

Several uvicorn workers (``RTML_WORKERS`` > 1, see rtml.cli.serve). ``rtml serve`` then points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start, prometheus_client keeps every
value in a per-process file there, and ``GET /metrics`` (any worker) merges the files of all workers
(``scrape()``): counters and histograms are summed over workers (dead ones included, so totals never go
back), and every gauge declares how its workers combine (``multiprocess_mode``: ``livesum``, ``livemax``,
``livemin``, ``livemostrecent``; "live" = only workers still running, a worker's files are marked dead when it
exits).
A series cannot be removed in that mode, so code that drops a gauge's series calls ``drop()``, which sets it
to a neutral value there instead. With one worker (the default) nothing of this is used.
"""

from __future__ import annotations

import gc
import math
import os
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

# prometheus_client chose its value class once, at import, from PROMETHEUS_MULTIPROC_DIR: this is that choice
# (read from the library, so it can never disagree with how the values below are stored).
MULTIPROCESS: bool = bool(getattr(values.ValueClass, "_multiprocess", False))

# 0.25 ms .. 2.5 s: sub-millisecond resolution where serving lives, seconds where timeouts live.
LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025,
    0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

HTTP_REQUEST_SECONDS = Histogram(
    "rtml_http_request_duration_seconds",
    "HTTP request latency by service, route template and method.",
    ["service", "route", "method"],
    buckets=LATENCY_BUCKETS,
)
HTTP_REQUESTS = Counter(
    "rtml_http_requests_total", "HTTP requests by service, route and status.", ["service", "route", "method", "status"]
)

# every service's event loop (rtml.core.looplag): what overload of the process itself looks like
EVENT_LOOP_LAG = Histogram(
    "rtml_event_loop_lag_seconds",
    "How late a timer due every 5 ms ran, each tick: the backlog of work the process had not got to yet.",
    buckets=LATENCY_BUCKETS,
)
EVENT_LOOP_BUSY = Gauge(
    "rtml_event_loop_busy_ratio",
    "Share of recent time the event loop's thread spent on the CPU (decaying average, half-life 50 ms).",
    multiprocess_mode="livemax",
)
EVENT_LOOP_CAP = Gauge(
    "rtml_event_loop_in_flight_cap",
    "Requests in flight a serving or ingest process takes while its event loop runs behind on its own work"
    " (RTML_MAX_LOOP_LAG_MS; +Inf: no cap).",
    multiprocess_mode="livemin",
)
EVENT_LOOP_CAP.set(math.inf)  # a gauge starts at 0, which would read "takes nothing"

# Kafka
KAFKA_PUBLISHED = Counter("rtml_kafka_published_total", "Records acknowledged by the broker.", ["topic"])
KAFKA_PUBLISH_ERRORS = Counter("rtml_kafka_publish_errors_total", "Publishes the broker did not ack.", ["topic"])
KAFKA_PUBLISH_SECONDS = Histogram(
    "rtml_kafka_publish_duration_seconds", "Time until the broker acked a publish.", ["topic"],
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
CONSUMED = Counter("rtml_consumer_records_total", "Records consumed and committed.", ["consumer"])
CONSUMER_RESTARTS = Counter(
    "rtml_consumer_restarts_total", "Consumer loops restarted after an unexpected error.", ["consumer"]
)
CONSUMER_RETRIES = Counter("rtml_consumer_retries_total", "Batches retried after a retriable error.", ["consumer"])
CONSUMER_POSITION = Gauge(
    "rtml_consumer_committed_offset", "Last committed offset of each partition this member owns.",
    ["consumer", "topic", "partition"], multiprocess_mode="livemax",
)  # fmt: skip
CONSUMER_LAG = Gauge(
    "rtml_consumer_lag_records",
    "Records of a partition not yet committed by its consumer group: the partition's end (the larger of the latest "
    "fetch response's high watermark and a periodic ListOffsets answer) minus the group's committed offset. "
    "Reported by the member that owns the partition.",
    ["consumer", "group", "topic", "partition"],
    multiprocess_mode="livemax",
)
DEAD_LETTERS = Counter("rtml_deadletter_total", "Records sent to the dead-letter topic.", ["topic"])

# ingest
INGEST_EVENTS = Counter("rtml_ingest_events_total", "Events accepted and acknowledged by the broker.")
INGEST_REJECTED = Counter("rtml_ingest_events_rejected_total", "Events rejected as invalid.")
INGEST_BYTES = Counter("rtml_ingest_bytes_total", "Request body bytes received on /v1/events.")
INGEST_SHED = Counter(
    "rtml_ingest_shed_total",
    "POST /v1/events requests refused at once (503): too many requests or events in flight, or past the cap "
    "the event loop's lag sets (RTML_MAX_LOOP_LAG_MS).",
)
INGEST_IN_FLIGHT = Gauge(
    "rtml_ingest_in_flight_requests", "POST /v1/events requests being handled.", multiprocess_mode="livesum"
)
INGEST_PENDING_EVENTS = Gauge(
    "rtml_ingest_pending_events", "Events waiting for the broker's acknowledgement.", multiprocess_mode="livesum"
)

# features
FEATURE_EVENTS_APPLIED = Counter("rtml_features_events_applied_total", "Event applications per entity.", ["entity"])
FEATURE_EVENTS_DUPLICATE = Counter("rtml_features_events_duplicate_total", "Duplicate event_ids ignored.", ["entity"])
FEATURE_EVENTS_LATE = Counter(
    "rtml_features_events_late_total", "Events too late for every finite window of a feature.", ["feature"]
)
FEATURE_FRESHNESS_SECONDS = Histogram(
    "rtml_features_freshness_seconds", "From ingest receive time to the feature update in Redis.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
FEATURE_EVENT_LAG_SECONDS = Histogram(
    "rtml_features_event_lag_seconds", "From event time (ts) to the feature update in Redis.",
    buckets=(*LATENCY_BUCKETS, 5.0, 10.0, 30.0, 60.0, 300.0),
)  # fmt: skip
REDIS_SECONDS = Histogram(
    "rtml_redis_call_duration_seconds", "Redis round trips by operation.", ["op"], buckets=LATENCY_BUCKETS
)

# serving
PREDICTIONS = Counter("rtml_predictions_total", "Predictions by model and version.", ["model", "version"])
SERVING_SHED = Counter(
    "rtml_serving_shed_total",
    "Requests refused at once (503): too many in flight, or past the cap the event loop's lag sets.",
    ["route"],
)
SERVING_DEADLINE_EXCEEDED = Counter(
    "rtml_serving_deadline_exceeded_total", "Feature reads abandoned at the request deadline.", ["model"]
)
PREDICTIONS_DEGRADED = Counter("rtml_predictions_degraded_total", "Predictions made without the store.", ["model"])
INFERENCE_SECONDS = Histogram(
    "rtml_inference_duration_seconds", "ONNX Runtime time per call.", ["model"], buckets=LATENCY_BUCKETS
)
PREDICTION_LOG_DROPPED = Counter(
    "rtml_prediction_log_dropped_total", "Prediction log records dropped because the buffer was full."
)
MODEL_LOAD_ERRORS = Counter("rtml_model_load_errors_total", "Live versions a replica failed to load.", ["model"])
MODEL_POLL_ERRORS = Counter("rtml_model_poll_errors_total", "Registry polls that failed (Redis down).")
PREDICTION_LOG_PENDING = Gauge(
    "rtml_prediction_log_pending", "Prediction records waiting to be published.", multiprocess_mode="livesum"
)
MODEL_LIVE_VERSION = Gauge(
    "rtml_model_live_info", "1 for the version each replica serves (0 or absent: not served).",
    ["model", "version"], multiprocess_mode="livemax",
)  # fmt: skip

# process
GC_PAUSE_SECONDS = Histogram(
    "rtml_gc_pause_seconds", "Garbage-collector pauses by generation (a request waits through them).",
    ["generation"], buckets=LATENCY_BUCKETS,
)  # fmt: skip

# feedback
OUTCOMES = Counter("rtml_outcomes_total", "Outcomes by join result.", ["result"])
EXAMPLES = Counter("rtml_examples_total", "Joined examples published.", ["model"])
RULE_LABELS = Counter(
    "rtml_rule_labels_total",
    "Labels derived by a model's label rule: positive, negative, late (an event after the label was given).",
    ["model", "result"],
)
EXAMPLES_STORED = Counter("rtml_examples_stored_total", "Examples written to the Parquet store.", ["model"])
EXAMPLES_FILES = Counter("rtml_examples_files_total", "Parquet files written by the examples store.")
EXAMPLES_WRITE_SECONDS = Histogram(
    "rtml_examples_write_duration_seconds", "Time to write and fsync one batch of Parquet files.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)  # fmt: skip
MODEL_QUALITY = Gauge(
    "rtml_model_quality",
    "Online quality per model version over its quality window: count, positive_rate, mean_score, log_loss, "
    "auc, calibration_error, score_psi.",
    ["model", "version", "metric"],
    multiprocess_mode="livemostrecent",
)
FEATURE_PSI = Gauge(
    "rtml_model_feature_psi", "Drift of each input against training (PSI), over the quality window.",
    ["model", "version", "feature"], multiprocess_mode="livemostrecent",
)  # fmt: skip
RETRAINS = Counter(
    "rtml_retrains_total",
    "Trainings the learning loop started (manual `rtml train` runs are not counted).",
    ["model", "trigger", "result"],
)
ROLLOUT_DECISIONS = Counter(
    "rtml_rollout_decisions_total",
    "Rollout decisions of the learning loop: canary, promote, ready, reject, rollback, keep.",
    ["model", "decision"],
)
SHADOW_PREDICTIONS = Counter(
    "rtml_shadow_predictions_total", "Scores of a candidate or guard version that were not returned.",
    ["model", "version"],
)  # fmt: skip


def drop(gauge: Gauge, *labelvalues: str, absent: float = 0.0) -> None:
    """Forget one series of a labelled gauge (a partition revoked, a version no longer served or measured).

    One process: the series is removed from the exposition. Multiprocess mode cannot remove it (its value
    lives in this worker's file), so it is set to ``absent`` instead: 0 for gauges combined with ``livemax``
    (another worker's real value wins), NaN for measurements (every PromQL comparison with NaN is false, so
    no alert fires on it)."""
    if MULTIPROCESS:
        gauge.labels(*labelvalues).set(absent)
        return
    try:
        gauge.remove(*labelvalues)
    except KeyError:
        pass


def scrape() -> bytes:
    """The Prometheus text of this process, or, in multiprocess mode, of every worker of this service merged
    (a fresh registry per scrape, as prometheus_client prescribes: the files of new workers are seen)."""
    if not MULTIPROCESS:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def process_exited(pid: int | None = None) -> None:
    """Multiprocess mode: stop counting the "live" gauges of a worker that ended (``pid``, default this
    process). Each worker calls it when its app shuts down and ``rtml serve`` for workers that died; counters
    and histograms of the worker stay, so totals never go back. Nothing to do with one process."""
    if MULTIPROCESS:
        mark_process_dead(os.getpid() if pid is None else pid)  # type: ignore[no-untyped-call]


def observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """``histogram.observe(v)`` for every v, with one bucket increment per DISTINCT value.

    The features consumer observes two latencies per event (40,000 observations a second at 20,000 events/s)
    and the values of one micro-batch repeat (ms clocks, one receive time per ingest request). Same result
    as calling ``observe`` for each value (tested against it); uses the client's value objects, so it also
    holds in multiprocess mode.
    """
    bounds = histogram._upper_bounds  # noqa: SLF001 -- stable since prometheus_client 0.4; no public batch API
    buckets = histogram._buckets  # noqa: SLF001
    total = 0.0
    for value, n in Tally(values).items():
        buckets[bisect_left(bounds, value)].inc(n)
        total += value * n
    histogram._sum.inc(total)  # noqa: SLF001


def watch_gc() -> None:
    """Time every garbage collection into GC_PAUSE_SECONDS (idempotent). Tail latency in Python services is
    mostly GC pauses; this shows whether the thresholds set at start-up keep them short."""
    if any(getattr(cb, "__name__", "") == "_rtml_gc_timer" for cb in gc.callbacks):
        return
    started = [0.0]
    children = [GC_PAUSE_SECONDS.labels(str(g)) for g in range(3)]

    def _rtml_gc_timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            children[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(_rtml_gc_timer)
