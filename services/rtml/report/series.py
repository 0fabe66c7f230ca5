"""Pure maths over recorded snapshots: what PromQL's ``rate``, ``histogram_quantile`` and ``sum by`` would
answer, for the report. No I/O: unit-tested against hand-computed values.

A point is ``(t, value)`` (epoch seconds); a histogram point is ``(t, {le: cumulative count})``. Counters
restart from zero when a service restarts (a new ``rtml up``): a value lower than the previous one is a
reset, and the increase over that step is the new value (what Prometheus assumes). Gaps longer than
``max_gap_s`` (the sampler was not running) are never bridged: the line breaks there (a NaN point).
A window closes once it spans ``SLACK`` x ``step_s``: scrapes 9.99 s apart still make 10 s windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from rtml.bench.stats import Buckets, histogram_quantile
from rtml.report.history import Snapshot

Point = tuple[float, float]
HistPoint = tuple[float, Buckets]
NAN = math.nan
SLACK = 0.95
Labels = Mapping[str, str]


def counter_increase(before: float, after: float) -> float:
    """Increase of a counter between two scrapes; a lower value is a restart from zero."""
    return after - before if after >= before else after


def bucket_increase(before: Mapping[float, float], after: Mapping[float, float]) -> Buckets:
    """Observations between two scrapes of one histogram; a lower total (+Inf) count is a restart."""
    if after.get(math.inf, 0.0) < before.get(math.inf, 0.0):
        return dict(after)
    return {le: max(0.0, n - before.get(le, 0.0)) for le, n in after.items()}


def rates(points: Sequence[Point], *, step_s: float, max_gap_s: float) -> list[Point]:
    """Per-second rate of a counter over consecutive windows of at least ``step_s``, at each window's end.

    A gap longer than ``max_gap_s`` between two points closes nothing and emits ``(t, NaN)`` (a break)."""
    out: list[Point] = []
    if not points:
        return out
    start_t, prev_t, prev_v = points[0][0], points[0][0], points[0][1]
    acc = 0.0
    for t, v in points[1:]:
        if t - prev_t > max_gap_s:
            out.append((prev_t, NAN))
            start_t, acc = t, 0.0
        else:
            acc += counter_increase(prev_v, v)
            if t - start_t >= SLACK * step_s:
                out.append((t, acc / (t - start_t)))
                start_t, acc = t, 0.0
        prev_t, prev_v = t, v
    return out


def quantiles(points: Sequence[HistPoint], q: float, *, step_s: float, max_gap_s: float) -> list[Point]:
    """Quantile ``q`` (0..1, seconds as recorded) of the observations made in each window of at least
    ``step_s``; NaN for a window without observations and at gaps."""
    out: list[Point] = []
    if not points:
        return out
    start_t, (prev_t, prev_b) = points[0][0], points[0]
    acc: Buckets = {}
    for t, b in points[1:]:
        if t - prev_t > max_gap_s:
            out.append((prev_t, NAN))
            start_t, acc = t, {}
        else:
            for le, n in bucket_increase(prev_b, b).items():
                acc[le] = acc.get(le, 0.0) + n
            if t - start_t >= SLACK * step_s:
                value = histogram_quantile(q, acc) if math.inf in acc else None
                out.append((t, NAN if value is None else value))
                start_t, acc = t, {}
        prev_t, prev_b = t, b
    return out


def total_increase(points: Sequence[Point], *, max_gap_s: float) -> float:
    """The counter's increase over the whole series (gaps contribute nothing)."""
    return sum(counter_increase(a[1], b[1]) for a, b in zip(points, points[1:], strict=False)
               if b[0] - a[0] <= max_gap_s)  # fmt: skip


def total_buckets(points: Sequence[HistPoint], *, max_gap_s: float) -> Buckets:
    """Observations over the whole series (gaps contribute nothing), for a quantile over the range."""
    acc: Buckets = {}
    for (t0, b0), (t1, b1) in zip(points, points[1:], strict=False):
        if t1 - t0 <= max_gap_s:
            for le, n in bucket_increase(b0, b1).items():
                acc[le] = acc.get(le, 0.0) + n
    return acc


def covered_seconds(times: Sequence[float], *, max_gap_s: float) -> float:
    """Seconds between the first and last point, less the gaps: the denominator of a rate over the range."""
    return sum(b - a for a, b in zip(times, times[1:], strict=False) if b - a <= max_gap_s)


def typical_interval(times: Sequence[float]) -> float | None:
    """Median spacing of the points (the sampler's interval as it really ran); None for fewer than two."""
    gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False) if b > a)
    return gaps[len(gaps) // 2] if gaps else None


# -- from snapshots to series: "sum by (labels)" per snapshot --------------------------------------------------

Match = Callable[[Labels], bool]
GroupBy = Callable[[Labels], str | None]


def sum_by(snapshots: Sequence[Snapshot], name: str, group: GroupBy) -> dict[str, list[Point]]:
    """For each snapshot, the counters called ``name`` summed per group (``group`` -> None: skipped).

    A group absent from a snapshot reads 0 there: a counter not created yet (a route never called so far, or
    not yet again since a restart) has counted nothing, so its first requests are not lost to the rate."""
    sums = [_sums(snap, name, group) for snap in snapshots]
    keys = sorted({k for s in sums for k in s})
    return {k: [(snap.t, s.get(k, 0.0)) for snap, s in zip(snapshots, sums, strict=True)] for k in keys}


def sum_buckets_by(snapshots: Sequence[Snapshot], name: str, group: GroupBy) -> dict[str, list[HistPoint]]:
    """Like :func:`sum_by` for the ``_bucket`` samples of a histogram: per snapshot and group, ``{le: count}``
    (``{}`` where the group is absent: nothing observed)."""
    sums: list[dict[str, Buckets]] = []
    for snap in snapshots:
        per: dict[str, Buckets] = {}
        for n, labels, v in snap.samples:
            if n == name and "le" in labels and (key := group(labels)) is not None:
                b = per.setdefault(key, {})
                le = float(labels["le"])
                b[le] = b.get(le, 0.0) + v
        sums.append(per)
    keys = sorted({k for s in sums for k in s})
    return {k: [(snap.t, s.get(k, {})) for snap, s in zip(snapshots, sums, strict=True)] for k in keys}


def _sums(snap: Snapshot, name: str, group: GroupBy) -> dict[str, float]:
    out: dict[str, float] = {}
    for n, labels, v in snap.samples:
        if n == name and (key := group(labels)) is not None:
            out[key] = out.get(key, 0.0) + v
    return out


def gauge_sum_by(snapshots: Iterable[Snapshot], name: str, group: GroupBy) -> dict[str, list[Point]]:
    """A gauge summed per group over time, only where the group has series (absent is unknown, not 0)."""
    out: dict[str, list[Point]] = {}
    for snap in snapshots:
        for key, v in _sums(snap, name, group).items():
            out.setdefault(key, []).append((snap.t, v))
    return out


def last_by(snapshots: Iterable[Snapshot], name: str, group: GroupBy) -> dict[str, list[Point]]:
    """A gauge per group over time (several series in one group: their maximum, e.g. one model's replicas)."""
    out: dict[str, list[Point]] = {}
    for snap in snapshots:
        vals: dict[str, float] = {}
        for n, labels, v in snap.samples:
            if n == name and (key := group(labels)) is not None:
                vals[key] = max(v, vals.get(key, -math.inf))
        for key, v in vals.items():
            out.setdefault(key, []).append((snap.t, v))
    return out
