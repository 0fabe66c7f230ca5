"""Pure statistics for the benchmarks: percentiles of samples and Prometheus histogram quantiles.

No I/O here, so the maths is unit-tested on known data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Buckets = dict[float, float]  # upper bound ``le`` -> cumulative count (``+Inf`` included)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's default).

    None for no samples, so JSON shows ``null`` rather than a made-up number.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Iterable[float | None]) -> float | None:
    """Median of the known values (None entries are skipped); None when there are none."""
    known = [v for v in values if v is not None]
    return percentile(known, 50)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded to 3 places; None when either is unknown or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def rnd(x: float | None, places: int = 3) -> float | None:
    return None if x is None else round(x, places)


def latency_summary(seconds: Sequence[float], unit: str = "ms") -> dict[str, float | int | None]:
    """n, p50, p90, p99, max and mean of latencies given in seconds, expressed in ``unit`` (ms or us)."""
    scale = {"ms": 1e3, "us": 1e6}[unit]

    def s(x: float | None) -> float | None:
        return None if x is None else round(x * scale, 3)

    return {
        "n": len(seconds),
        f"p50_{unit}": s(percentile(seconds, 50)),
        f"p90_{unit}": s(percentile(seconds, 90)),
        f"p99_{unit}": s(percentile(seconds, 99)),
        f"max_{unit}": s(max(seconds) if seconds else None),
        f"mean_{unit}": s(sum(seconds) / len(seconds) if seconds else None),
    }


def parse_histograms(text: str, names: Iterable[str] | None = None) -> dict[str, Buckets]:
    """Cumulative buckets of every histogram in Prometheus text (or only ``names``), summed over label sets."""
    wanted = None if names is None else set(names)
    out: dict[str, Buckets] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram" or (wanted is not None and family.name not in wanted):
            continue
        buckets = out.setdefault(family.name, {})
        for sample in family.samples:
            if sample.name == f"{family.name}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + float(sample.value)
    return out


def delta_buckets(after: Mapping[float, float], before: Mapping[float, float]) -> Buckets:
    """Observations made between two scrapes of the same histogram (a counter reset shows as negative: clamp)."""
    return {le: max(0.0, count - before.get(le, 0.0)) for le, count in after.items()}


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus ``histogram_quantile``: linear interpolation inside the bucket holding rank ``q * count``.

    ``buckets`` maps upper bounds to cumulative counts and must include ``+Inf``. Returns None when there
    are no observations (PromQL gives NaN). A rank in the ``+Inf`` bucket answers the highest finite bound,
    as Prometheus does: the true value is then only known to be above it.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} is outside 0..1")
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        raise ValueError("a histogram needs a +Inf bucket")
    counts: list[float] = []
    for le in bounds:  # cumulative counts must not decrease (a scrape can race an observation)
        counts.append(max(buckets[le], counts[-1] if counts else 0.0))
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    b = next(i for i, c in enumerate(counts) if c >= rank)
    if b == len(bounds) - 1:
        return bounds[-2] if len(bounds) >= 2 else None
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, end, count = 0.0, bounds[b], counts[b]
    if b > 0:
        start = bounds[b - 1]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    if count <= 0:
        return end
    return start + (end - start) * (rank / count)


def above_top_bucket(q: float, buckets: Mapping[float, float]) -> bool:
    """True when quantile ``q`` lies in the ``+Inf`` bucket: the reported value is only a lower bound."""
    finite = [c for le, c in buckets.items() if not math.isinf(le)]
    total = buckets.get(math.inf, 0.0)
    return total > 0 and (max(finite) if finite else 0.0) < q * total


def histogram_summary(buckets: Mapping[float, float], unit: str = "ms") -> dict[str, Any]:
    """count, p50, p90, p99 of a (delta) histogram of seconds, in ``unit``; ``above_top_bucket`` lists the
    quantiles that are only lower bounds (they fell beyond the highest finite bucket)."""
    scale = {"ms": 1e3, "us": 1e6}[unit]
    total = max(buckets.values()) if buckets else 0.0
    out: dict[str, Any] = {"count": total}
    capped = []
    for q in (0.5, 0.9, 0.99):
        name = f"p{round(q * 100)}_{unit}"
        v = histogram_quantile(q, buckets) if buckets else None
        out[name] = None if v is None else round(v * scale, 3)
        if buckets and above_top_bucket(q, buckets):
            capped.append(name)
    out["above_top_bucket"] = capped
    return out
