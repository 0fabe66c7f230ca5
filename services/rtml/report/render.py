"""``rtml report``: the panels Grafana's rtml dashboards show, computed from the recorded history.

Panels (one page, 3 x 2): traffic per service (requests/s, and ingest events/s), p99 latency per service and
route (the busiest eight), feature freshness (p50, p99), consumer lag per consumer, online AUC and log loss
per model version. Rates and quantiles are taken over windows of ``step_s`` (the sampler's interval, or a
120th of the range when that is longer), exactly as ``rate()`` and ``histogram_quantile()`` would.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from rtml.bench.stats import histogram_quantile
from rtml.core.settings import SERVICES
from rtml.report.history import History, Snapshot
from rtml.report.mpl import new_figure, save_png
from rtml.report.series import (
    GroupBy,
    HistPoint,
    Point,
    covered_seconds,
    gauge_sum_by,
    last_by,
    quantiles,
    rates,
    sum_buckets_by,
    sum_by,
    total_buckets,
    total_increase,
    typical_interval,
)

T = TypeVar("T")
WIDTH_PX, HEIGHT_PX = 1600, 1200
MAX_ROUTES = 8
POINTS_PER_RANGE = 120
GAP_FACTOR = 3.5  # a step longer than this many sampler intervals is a gap (the sampler was not running)


@dataclass
class Line:
    label: str
    points: list[Point]
    over_range: float | None  # the figure over the whole range (a rate, a quantile, or the last value)

    @property
    def last(self) -> float | None:
        known = [v for _, v in self.points if not math.isnan(v)]
        return known[-1] if known else None


@dataclass
class Panel:
    title: str
    unit: str
    over_range_means: str
    lines: list[Line] = field(default_factory=list)


@dataclass
class Report:
    since: float
    until: float
    step_s: float
    snapshots: int
    services: list[str]
    panels: list[Panel]
    unreadable: int = 0


def _key(name: str, labels: Mapping[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A series; the buckets of one histogram are one series (their owner is where ``+Inf`` moved)."""
    return name, tuple(sorted((k, v) for k, v in labels.items() if k != "le"))


def owned_snapshots(history: History) -> dict[str, list[Snapshot]]:
    """Each series taken from one service's file only: the one where it reached the highest value (ties: the
    first in service order).

    Every process declares all of rtml's metrics (one metrics module), so an unlabelled series such as the
    features' freshness histogram also shows, at 0, on ingest's ``/metrics``: its owner is where it moves.
    When several apps share one process (tests, notebooks) each ``/metrics`` shows the same values, and
    summing the files would count everything several times."""
    best: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, str]] = {}
    service: str
    for service in SERVICES:
        for snap in history.snapshots.get(service, []):
            for name, labels, value in snap.samples:
                key = _key(name, labels)
                if key not in best or value > best[key][0]:
                    best[key] = (value, service)
    out: dict[str, list[Snapshot]] = {}
    for service, snaps in history.snapshots.items():
        out[service] = [
            Snapshot(s.t, s.service, [x for x in s.samples if best[_key(x[0], x[1])][1] == service]) for s in snaps
        ]
    return out


def _merge(per_file: list[dict[str, list[T]]]) -> dict[str, list[T]]:
    """Groups from every file; a group found in several (not expected) keeps its longest series."""
    out: dict[str, list[T]] = {}
    for groups in per_file:
        for key, pts in groups.items():
            if len(pts) > len(out.get(key, [])):
                out[key] = pts
    return out


class _Builder:
    def __init__(self, history: History, step_s: float | None) -> None:
        self.files = owned_snapshots(history)
        intervals = [i for s in self.files.values() if (i := typical_interval([x.t for x in s])) is not None]
        self.interval = sorted(intervals)[len(intervals) // 2] if intervals else 1.0
        span = history.span() or (0.0, 0.0)
        self.step = step_s or max(self.interval, (span[1] - span[0]) / POINTS_PER_RANGE)
        self.max_gap = GAP_FACTOR * self.interval

    def counters(self, name: str, group: GroupBy) -> dict[str, list[Point]]:
        return _merge([sum_by(s, name, group) for s in self.files.values()])

    def histograms(self, name: str, group: GroupBy) -> dict[str, list[HistPoint]]:
        return _merge([sum_buckets_by(s, name, group) for s in self.files.values()])

    def gauges(self, name: str, group: GroupBy, combine: str = "sum") -> dict[str, list[Point]]:
        f = gauge_sum_by if combine == "sum" else last_by
        return _merge([f(s, name, group) for s in self.files.values()])

    def rate_line(self, label: str, pts: list[Point]) -> Line:
        seconds = covered_seconds([t for t, _ in pts], max_gap_s=self.max_gap)
        total = total_increase(pts, max_gap_s=self.max_gap)
        return Line(label, rates(pts, step_s=self.step, max_gap_s=self.max_gap), total / seconds if seconds else None)

    def quantile_line(self, label: str, pts: list[HistPoint], q: float, scale: float = 1e3) -> Line:
        series = [(t, v * scale) for t, v in quantiles(pts, q, step_s=self.step, max_gap_s=self.max_gap)]
        whole = total_buckets(pts, max_gap_s=self.max_gap)
        v = histogram_quantile(q, whole) if math.inf in whole else None
        return Line(label, series, None if v is None else v * scale)

    def gauge_line(self, label: str, pts: list[Point]) -> Line:
        return Line(label, self._break_gaps(pts), pts[-1][1] if pts else None)

    def _break_gaps(self, pts: list[Point]) -> list[Point]:
        out: list[Point] = []
        for p in pts:
            if out and p[0] - out[-1][0] > self.max_gap:
                out.append((out[-1][0], math.nan))
            out.append(p)
        return out


def _label(*keys: str) -> GroupBy:
    return lambda labels: " ".join(labels.get(k, "?") for k in keys)


def _quality(metric: str) -> GroupBy:
    return lambda labels: f"{labels.get('model')} v{labels.get('version')}" if labels.get("metric") == metric else None


def build_report(history: History, since: float, until: float, *, step_s: float | None = None) -> Report:
    """The six panels from ``history`` (already cut to ``[since, until]``)."""
    b = _Builder(history, step_s)
    traffic = Panel("Traffic", "per second", "mean rate")
    for service, pts in sorted(b.counters("rtml_http_requests_total", _label("service")).items()):
        traffic.lines.append(b.rate_line(f"{service} requests/s", pts))
    for _, pts in b.counters("rtml_ingest_events_total", lambda _: "events").items():
        traffic.lines.append(b.rate_line("ingest events/s", pts))

    latency = Panel(f"p99 latency per service and route (busiest {MAX_ROUTES})", "ms", "p99 over the range")
    routes = b.histograms("rtml_http_request_duration_seconds_bucket", _label("service", "method", "route"))
    busiest = sorted(routes.items(), key=lambda kv: -total_buckets(kv[1], max_gap_s=b.max_gap).get(math.inf, 0.0))
    for route, hist in busiest[:MAX_ROUTES]:
        latency.lines.append(b.quantile_line(route, hist, 0.99))

    freshness = Panel("Feature freshness: accepted -> applied in Redis", "ms", "quantile over the range")
    for _, hist in b.histograms("rtml_features_freshness_seconds_bucket", lambda _: "all").items():
        freshness.lines += [b.quantile_line("p50", hist, 0.5), b.quantile_line("p99", hist, 0.99)]

    lag = Panel("Consumer lag (records not yet committed)", "records", "last value")
    for consumer, pts in sorted(b.gauges("rtml_consumer_lag_records", _label("consumer")).items()):
        lag.lines.append(b.gauge_line(consumer, pts))

    panels = [traffic, latency, freshness, lag]
    for metric, title in (("auc", "Online AUC per model version"), ("log_loss", "Online log loss per model version")):
        panel = Panel(title, metric, "last value")
        for version, pts in sorted(b.gauges("rtml_model_quality", _quality(metric), combine="last").items()):
            panel.lines.append(b.gauge_line(version, pts))
        panels.append(panel)
    span = history.span()
    shown_from = max(since, span[0]) if span else since  # the range drawn starts with the data
    return Report(shown_from, until, b.step, len(history), sorted(history.snapshots), panels, history.unreadable)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def subtitle(report: Report) -> str:
    return (f"{_when(report.since)} to {_when(report.until)} — {report.snapshots} snapshots of "
            f"{', '.join(report.services)}, windows of {report.step_s:.0f} s")  # fmt: skip


def render_png(report: Report, path: Path | None = None) -> bytes:
    """The report as one 1600x1200 PNG (its bytes; also written to ``path`` when given)."""
    import matplotlib.dates as mdates

    fig = new_figure(WIDTH_PX, HEIGHT_PX)
    axes = fig.subplots(3, 2).flatten()
    span = (datetime.fromtimestamp(report.since, UTC), datetime.fromtimestamp(report.until, UTC))
    for ax, panel in zip(axes, report.panels, strict=False):
        ax.set_title(panel.title, fontsize=11)
        ax.set_ylabel(panel.unit)
        ax.set_xlim(*span)
        locator = mdates.AutoDateLocator(tz=UTC)  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))  # type: ignore[no-untyped-call]
        ax.grid(alpha=0.3)
        drawn = False
        for line in panel.lines:
            if not line.points:
                continue
            xs = [datetime.fromtimestamp(t, UTC) for t, _ in line.points]
            ax.plot(
                xs, [v for _, v in line.points], label=line.label, linewidth=1.2, marker="." if len(xs) < 30 else None
            )
            drawn = True
        if drawn:
            ax.legend(fontsize=7, loc="upper left")
            ax.set_ylim(bottom=0, top=1 if panel.unit == "auc" else None)
        else:
            ax.text(0.5, 0.5, "no data in this range", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(f"rtml report\n{subtitle(report)}", fontsize=12)
    return save_png(fig, path)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.4g}"


def render_html(report: Report, png: bytes) -> str:
    """A self-contained page: the PNG inline (data: URI) and each panel's figures as a table."""
    rows = []
    for panel in report.panels:
        for line in panel.lines or [Line("no data", [], None)]:
            rows.append(f"<tr><td>{html.escape(panel.title)}</td><td>{html.escape(line.label)}</td>"
                        f"<td>{_fmt(line.over_range)}</td><td>{_fmt(line.last)}</td>"
                        f"<td>{html.escape(panel.unit)} ({html.escape(panel.over_range_means)})</td></tr>")  # fmt: skip
    img = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rtml report</title>
<style>body{{font-family:sans-serif;margin:1.5em}}img{{max-width:100%}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}</style></head>
<body><h1>rtml report</h1><p>{html.escape(subtitle(report))}</p>
<img alt="rtml report: traffic, p99 latency, freshness, consumer lag, model quality" src="data:image/png;base64,{img}">
<table><thead><tr><th>panel</th><th>series</th><th>over the range</th><th>last</th><th>unit</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
