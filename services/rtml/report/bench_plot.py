"""``rtml bench ... --plot FILE.png``: one PNG of a benchmark summary (the JSON ``rtml bench`` prints).

Left: latency percentiles (p50/p90/p99) per target and concurrency, rtml next to the same-run baseline.
Right: throughput (requests/s or events/s), again with the baseline where the benchmark has one.
Only the summary is read, so a saved ``--out`` JSON can be drawn again with :func:`plot_bench`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtml.core.errors import RtmlError
from rtml.report.mpl import new_figure, save_png

if TYPE_CHECKING:
    from matplotlib.axes import Axes

WIDTH_PX, HEIGHT_PX = 1400, 560
PLOTTABLE = ("predict", "recommend", "ingest", "freshness")
PERCENTILES = ("p50", "p90", "p99")
# rtml in blues, baselines in greys: the same colour means the same percentile across groups.
RTML_COLOURS = {"p50": "#9ecae1", "p90": "#4292c6", "p99": "#08519c"}
BASE_COLOURS = {"p50": "#d9d9d9", "p90": "#969696", "p99": "#525252"}
Bars = tuple[str, Sequence[float | None], str, str]  # label, one value per group, colour, hatch


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def _value(h: float) -> str:
    return "n/a" if math.isnan(h) else f"{h:,.0f}" if h >= 100 else f"{h:.3g}"


def _grouped_bars(ax: Axes, groups: Sequence[str], bars: Sequence[Bars], *, title: str, ylabel: str) -> None:
    """One cluster of bars per group, each bar labelled with its value (``n/a`` when not measured)."""
    width = 0.8 / max(1, len(bars))
    for k, (label, values, colour, hatch) in enumerate(bars):
        xs = [g + (k - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        heights = [_num(v) for v in values]
        drawn = ax.bar(xs, [0.0 if math.isnan(h) else h for h in heights], width, label=label, color=colour,
                       hatch=hatch, edgecolor="white" if not hatch else "#333333", linewidth=0.5)  # fmt: skip
        ax.bar_label(drawn, labels=[_value(h) for h in heights], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, ncols=2)


def _percentile_bars(name: str, summaries: Sequence[Mapping[str, Any]], colours: Mapping[str, str],
                     hatch: str = "") -> list[Bars]:  # fmt: skip
    return [(f"{name} {p}", [s.get(f"{p}_ms") for s in summaries], colours[p], hatch) for p in PERCENTILES]


def _serving(result: Mapping[str, Any], left: Axes, right: Axes) -> None:
    levels = list(result.get("levels") or [])
    groups = [f"concurrency {lv['concurrency']}" for lv in levels]
    rtml = [lv.get("rtml", {}) for lv in levels]
    base = [lv.get("baseline", {}) for lv in levels]
    kind = result["bench"]
    _grouped_bars(
        left, groups,
        _percentile_bars("rtml", rtml, RTML_COLOURS) + _percentile_bars("baseline", base, BASE_COLOURS, "//"),
        title=f"POST /v1/{kind} latency (median of rounds)", ylabel="ms",
    )  # fmt: skip
    _grouped_bars(
        right, groups,
        [("rtml", [m.get("req_per_s") for m in rtml], RTML_COLOURS["p99"], ""),
         ("baseline", [m.get("req_per_s") for m in base], BASE_COLOURS["p90"], "//")],
        title="throughput", ylabel="requests/s",
    )  # fmt: skip


def _ingest(result: Mapping[str, Any], left: Axes, right: Axes) -> None:
    runs = list(result.get("runs") or [])
    groups = [f"run {k + 1}" for k in range(len(runs))]
    _grouped_bars(
        left, groups,
        _percentile_bars("POST /v1/events", [r.get("request_latency", {}) for r in runs], RTML_COLOURS)
        + _percentile_bars("freshness (accepted->applied)", [r.get("server_freshness", {}) for r in runs],
                           BASE_COLOURS, "//"),
        title="ingest latency per run", ylabel="ms",
    )  # fmt: skip
    _grouped_bars(
        right, groups,
        [("HTTP accepted", [r.get("http_events_per_s") for r in runs], RTML_COLOURS["p50"], ""),
         ("end to end (applied)", [r.get("e2e_events_per_s") for r in runs], RTML_COLOURS["p99"], ""),
         ("baseline: producer -> broker", [r.get("baseline_kafka_events_per_s") for r in runs],
          BASE_COLOURS["p90"], "//")],
        title="throughput per run", ylabel="events/s",
    )  # fmt: skip


def _freshness(result: Mapping[str, Any], left: Axes, right: Axes) -> None:
    groups = ["send -> visible (probe)", "baseline: read floor", "server: accepted -> applied"]
    sources = [result.get("probe_send_to_visible", {}), result.get("baseline_read_floor", {}),
               result.get("server_freshness", {})]  # fmt: skip
    _grouped_bars(
        left, groups,
        [(p, [s.get(f"{p}_ms") for s in sources], RTML_COLOURS[p], "") for p in PERCENTILES],
        title="freshness latency", ylabel="ms",
    )  # fmt: skip
    load = result.get("load", {})
    _grouped_bars(
        right, ["background load"],
        [("target", [load.get("target_events_per_s")], BASE_COLOURS["p90"], "//"),
         ("achieved", [load.get("achieved_events_per_s")], RTML_COLOURS["p99"], "")],
        title="throughput", ylabel="events/s",
    )  # fmt: skip


def plot_bench(result: Mapping[str, Any], path: Path | None = None) -> bytes:
    """Draw one benchmark summary (predict, recommend, ingest or freshness) as a 1400x560 PNG; its bytes,
    also written to ``path`` when given. Raises RtmlError for other benchmarks (nothing to compare)."""
    kind = result.get("bench")
    draw = {"predict": _serving, "recommend": _serving, "ingest": _ingest, "freshness": _freshness}.get(str(kind))
    if draw is None:
        raise RtmlError(f"--plot draws {', '.join(PLOTTABLE)} benchmarks, not {kind}")
    fig = new_figure(WIDTH_PX, HEIGHT_PX)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    draw(result, left, right)
    m = result.get("machine", {})
    fig.suptitle(
        f"rtml bench {kind} — run {result.get('run_id', '?')}, client {result.get('client', 'n/a')}, "
        f"{m.get('cpus', '?')} CPUs, Python {m.get('python', '?')} ({m.get('loop', '?')})",
        fontsize=12,
    )
    return save_png(fig, path)
