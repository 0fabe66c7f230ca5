"""PNG and HTML output of ``rtml report`` and ``rtml bench --plot`` from synthetic data (no services).

The PNGs are checked from their IHDR chunk (width and height as set by figsize x dpi) and decoded to make sure
something was drawn; the CLI's failures are one line and a non-zero exit.
"""

from __future__ import annotations

import base64
import importlib.util
import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from rtml.cli.main import app
from rtml.report import bench_plot, mpl
from rtml.report.bench_plot import plot_bench
from rtml.report.history import load_history
from rtml.report.render import build_report, render_html, render_png
from tests.helpers import png_size

runner = CliRunner()


def colours(data: bytes) -> int:
    """How many distinct colours the image has: a blank canvas has one."""
    import io

    from matplotlib.image import imread

    pixels = imread(io.BytesIO(data), format="png")
    return len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::97].tolist()})


def write_history(directory: Path, now: float, steps: int = 6) -> None:
    """A plausible history in the sampler's file format: serving and features, every 10 s up to ``now``."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = ["0.001", "0.002", "0.005", "+Inf"]
    with (directory / "serving.jsonl").open("wb") as f:
        for k in range(steps):
            t = now - 10 * (steps - 1 - k)
            n = 50.0 * k
            samples: list[Any] = [
                ["rtml_http_requests_total", {"service": "serving", "route": "/v1/predict", "method": "POST",
                                              "status": "200"}, n],
                *[["rtml_http_request_duration_seconds_bucket", {"service": "serving", "route": "/v1/predict",
                                                                 "method": "POST", "le": le}, n * (j + 1) / 4]
                  for j, le in enumerate(bounds[:-1])],
                ["rtml_http_request_duration_seconds_bucket", {"service": "serving", "route": "/v1/predict",
                                                               "method": "POST", "le": "+Inf"}, n],
            ]  # fmt: skip
            f.write(orjson.dumps({"t": t, "service": "serving", "s": samples}) + b"\n")
        f.write(b'{"t": 12, "service": "serv')  # a write cut short: skipped and counted
    with (directory / "feedback.jsonl").open("wb") as f:
        for k in range(steps):
            t = now - 10 * (steps - 1 - k) + 1
            s = [["rtml_model_quality", {"model": "ctr", "version": "3", "metric": "auc"}, 0.6 + k / 50]]
            f.write(orjson.dumps({"t": t, "service": "feedback", "s": s}) + b"\n")


def test_report_png_and_html(tmp_path: Path) -> None:
    now = time.time()
    write_history(tmp_path / "m", now)
    history = load_history(tmp_path / "m", since=now - 3600)
    assert history.unreadable == 1 and len(history) == 12
    rep = build_report(history, now - 3600, now)
    png = render_png(rep, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes() == png
    assert png_size(png) == (1600, 1200) and colours(png) > 10
    page = render_html(rep, png)
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded is not None and base64.b64decode(embedded.group(1)) == png
    assert "<td>serving requests/s</td><td>5</td>" in page  # 250 requests over 50 s
    assert "<td>ctr v3</td><td>0.7</td>" in page


def test_cli_report_writes_png_and_html(tmp_path: Path) -> None:
    write_history(tmp_path / "m", time.time())
    png, page = tmp_path / "out.png", tmp_path / "out.html"
    result = runner.invoke(
        app, ["report", "--since", "30m", "--history", str(tmp_path / "m"), "--out", str(png), "--out", str(page)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(png), str(page)]
    assert png_size(png.read_bytes()) == (1600, 1200)
    assert page.read_text().startswith("<!doctype html>")


def test_cli_report_without_history_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", "--history", str(tmp_path / "none"), "--out", str(tmp_path / "r.png")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no metrics history for the last 1h" in lines[0] and "rtml report --record" in lines[0]
    assert not (tmp_path / "r.png").exists()
    # history older than --since is no history either
    write_history(tmp_path / "old", time.time() - 7200)
    result = runner.invoke(app, ["report", "--since", "1h", "--history", str(tmp_path / "old")])
    assert result.exit_code == 1 and "0 snapshots" in result.stderr


def test_cli_report_rejects_bad_arguments(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", "--since", "soon"])
    assert result.exit_code == 2 and "--since" in result.stderr
    result = runner.invoke(app, ["report", "--out", str(tmp_path / "r.pdf")])
    assert result.exit_code == 2 and ".png or .html" in result.stderr


def _level(c: int, scale: float) -> dict[str, Any]:
    side = {"req_per_s": 1000.0 / scale, "p50_ms": 0.4 * scale, "p90_ms": 0.6 * scale, "p99_ms": 1.1 * scale}
    base = {k: v * 3 if k != "req_per_s" else v / 3 for k, v in side.items()}
    return {"concurrency": c, "rtml": side, "baseline": base}


SUMMARIES: dict[str, dict[str, Any]] = {
    "predict": {"bench": "predict", "run_id": "ab12", "client": "wrk", "levels": [_level(1, 1), _level(16, 4)]},
    "recommend": {"bench": "recommend", "levels": [_level(1, 2)]},
    "ingest": {
        "bench": "ingest",
        "runs": [
            {
                "request_latency": {"p50_ms": 5, "p90_ms": 9, "p99_ms": 20},
                "server_freshness": {"p50_ms": 3, "p90_ms": 8, "p99_ms": None},
                "http_events_per_s": 30000,
                "e2e_events_per_s": 21000,
                "baseline_kafka_events_per_s": 90000,
            }
        ],
    },  # fmt: skip
    "freshness": {
        "bench": "freshness",
        "probe_send_to_visible": {"p50_ms": 4, "p90_ms": 7, "p99_ms": 12},
        "baseline_read_floor": {"p50_ms": 0.3, "p90_ms": 0.5, "p99_ms": 0.9},
        "server_freshness": {"p50_ms": 2, "p90_ms": 4, "p99_ms": 9},
        "load": {"target_events_per_s": 2000, "achieved_events_per_s": 1990.5},
    },  # fmt: skip
}


@pytest.mark.parametrize("kind", sorted(SUMMARIES))
def test_plot_bench_every_kind(kind: str, tmp_path: Path) -> None:
    png = plot_bench(SUMMARIES[kind], tmp_path / "b.png")
    assert png_size((tmp_path / "b.png").read_bytes()) == (bench_plot.WIDTH_PX, bench_plot.HEIGHT_PX) == (1400, 560)
    assert colours(png) > 10


def test_plot_bench_refuses_what_it_cannot_draw() -> None:
    with pytest.raises(Exception, match="--plot draws predict, recommend, ingest, freshness"):
        plot_bench({"bench": "memory"})


def test_bench_plot_without_matplotlib_fails_before_the_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    hidden = lambda name, *a: None if name == "matplotlib" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(mpl.importlib.util, "find_spec", hidden)

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the benchmark ran although --plot cannot work")

    monkeypatch.setattr("rtml.bench.runner.run_bench", never)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["bench", "predict", "--duration", "1", "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "rtml: --plot needs matplotlib, an optional extra: pip install 'rtml[plot]'"
    result = runner.invoke(app, ["report", "--history", str(tmp_path)])
    assert result.exit_code == 1 and "pip install 'rtml[plot]'" in result.stderr


def test_bench_plot_option_checks(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "read", "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "--plot applies to predict, recommend, ingest, freshness, not read" in result.stderr
    result = runner.invoke(app, ["bench", "predict", "--plot", str(tmp_path / "x.svg")])
    assert result.exit_code == 2 and "ending in .png" in result.stderr
    result = runner.invoke(app, ["bench", "predict", "--swap", "--client", "raw", "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "--swap" in result.stderr


def test_record_with_nothing_running_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import free_port

    monkeypatch.chdir(tmp_path)
    for service in ("INGEST", "FEATURES", "SERVING", "FEEDBACK"):
        monkeypatch.setenv(f"RTML_{service}_PORT", str(free_port()))
    result = runner.invoke(app, ["report", "--record", "--duration", "1", "--history", str(tmp_path / "h")])
    assert result.exit_code == 1
    assert result.stderr.startswith("rtml: no service answered GET /metrics (http://127.0.0.1:")
    assert "is the platform running?" in result.stderr and len(result.stderr.strip().splitlines()) == 1
