"""``rtml report``: a one-page PNG/HTML of what Grafana would show, for users without Grafana.

Where the history comes from: the services' ``/metrics`` only show current values, so ``rtml up`` runs a
sampler that appends every service's scrape (only the series drawn here) every 10 s to bounded, rotating
files in ``RUN_DIR/metrics`` (default ``.rtml/metrics``; at most 2 x 4 MiB per service, several hours).
Against a platform started some other way, ``rtml report --record`` is that sampler in the foreground.
``rtml report`` then turns counters into rates and histograms into quantiles over that history
(:mod:`rtml.report`). With Prometheus and Grafana deployed, their dashboards are the better view.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from rtml.cli.common import CliError, err, load_client_settings
from rtml.core.timeutil import parse_duration_ms
from rtml.report.history import INTERVAL_S, MAX_BYTES, Sampler, load_history
from rtml.report.mpl import PlotUnavailable, require_matplotlib

DEFAULT_DIR = Path(".rtml") / "metrics"


def report(
    since: str = typer.Option("1h", help="how far back: 30m, 1h, 6h, 1d"),
    out: list[Path] | None = typer.Option(  # noqa: B008
        None,
        metavar="FILE",
        help="report.png and/or report.html (the PNG embedded); repeat for both [default: report.png]",
    ),
    history: Path = typer.Option(  # noqa: B008
        DEFAULT_DIR, help="the metrics history: RUN_DIR/metrics of `rtml up` (default run dir .rtml)"
    ),
    record: bool = typer.Option(
        False, "--record", help="record the history instead: scrape every service's /metrics into --history"
    ),
    interval: float = typer.Option(INTERVAL_S, min=0.1, help="--record: seconds between scrapes"),
    duration: float | None = typer.Option(None, min=0.1, help="--record: stop after this many seconds (else Ctrl-C)"),
) -> None:
    """A one-page PNG or HTML report of traffic, p99 latency, freshness, consumer lag and model quality.

    History: /metrics shows only current values, so `rtml up` records every service's metrics every 10 s
    into RUN_DIR/metrics (bounded: at most 8 MiB per service, older data rotated away). For a platform not
    started by `rtml up`, run `rtml report --record` next to it (same files, Ctrl-C to stop).
    Rates and quantiles are computed from that history as Prometheus would; with Prometheus and Grafana
    deployed (deploy/), their dashboards show the same and more.
    """
    if record:
        _record(history, interval, duration)
        return
    try:
        since_s = parse_duration_ms(since) / 1000
    except ValueError as exc:
        raise CliError(f"--since: {exc}", exit_code=2) from None
    outs = out or [Path("report.png")]
    for path in outs:
        if path.suffix.lower() not in (".png", ".html"):
            raise CliError(f"--out writes .png or .html files, not {path.name}", exit_code=2)
        if not path.parent.is_dir():
            raise CliError(f"--out: the directory {path.parent} does not exist")
    try:
        require_matplotlib("rtml report")
    except PlotUnavailable as exc:
        raise CliError(exc.message) from None
    from rtml.report.render import build_report, render_html, render_png

    until = time.time()
    hist = load_history(history, since=until - since_s, until=until)
    if max((len(s) for s in hist.snapshots.values()), default=0) < 2:
        raise CliError(
            f"no metrics history for the last {since} in {history} ({len(hist)} snapshots): `rtml up` records one "
            "every 10 s; for another platform run `rtml report --record` beside it first"
        )
    if hist.unreadable:
        err.print(f"{hist.unreadable} unreadable lines in {history} skipped (a write cut short)")
    rep = build_report(hist, until - since_s, until)
    png = render_png(rep)
    for path in outs:
        if path.suffix.lower() == ".png":
            path.write_bytes(png)
        else:
            path.write_text(render_html(rep, png))
        print(path)


def _record(directory: Path, interval: float, duration: float | None) -> None:
    settings = load_client_settings()
    sampler = Sampler.for_settings(settings, directory, interval_s=interval, max_bytes=MAX_BYTES)
    import httpx

    with httpx.Client(timeout=sampler.timeout_s) as client:
        first = sampler.sample_once(client)
    if not any(first.values()):
        urls = ", ".join(sampler.targets.values())
        raise CliError(f"no service answered GET /metrics ({urls}); is the platform running?")
    err.print(f"recording every {interval:g} s into {directory} ({', '.join(s for s, ok in first.items() if ok)})")
    deadline = None if duration is None else time.monotonic() + duration
    sampler.start()
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())) if deadline is not None else 0.2)
    except KeyboardInterrupt:
        pass
    finally:
        sampler.stop()
    err.print("stopped recording")
