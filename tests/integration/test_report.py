"""``rtml report`` from a history recorded by the sampler against real services.

In-process: ingest, features and serving under uvicorn on the session's broker and Redis, sampled every
0.25 s while events and predictions flow; the recorded increases must equal what was sent. E2E: ``rtml up``
starts the sampler itself, and ``rtml report`` draws from its run directory.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from rtml.cli.main import app as cli
from rtml.core.settings import Settings
from rtml.features.app import create_app as create_features
from rtml.ingest.app import create_app as create_ingest
from rtml.report.history import Sampler, load_history
from rtml.report.render import build_report, owned_snapshots
from rtml.report.series import sum_buckets_by, sum_by, total_buckets, total_increase
from tests.e2e.conftest import running_platform
from tests.helpers import eventually, free_port, png_size, served

pytestmark = pytest.mark.integration


async def test_report_from_a_recorded_history(serving: Settings, tmp_path: Path) -> None:
    s = serving.model_copy(update={"ingest_port": free_port(), "features_port": free_port()})
    history = tmp_path / "metrics"
    async with (
        served(create_ingest(s), s.ingest_port, s.host) as ingest,
        served(create_features(s), s.features_port, s.host) as features,
    ):
        targets = {"ingest": ingest, "features": features, "serving": f"http://{s.host}:{s.serving_port}"}
        sampler = Sampler(targets, history, interval_s=0.25)
        with httpx.Client(timeout=5) as c:
            assert await asyncio.to_thread(sampler.sample_once, c) == dict.fromkeys(targets, True)
        sampler.start()
        async with httpx.AsyncClient(timeout=10) as client:
            for b in range(3):
                events = [{"type": "view", "user_id": f"rep-u{b}", "item_id": f"t{i}"} for i in range(10)]
                r = await client.post(f"{ingest}/v1/events", json={"events": events})
                assert r.status_code == 202, r.text
            for i in range(40):
                entities = {"user_id": f"rep-u{i % 3}", "item_id": f"t{i % 10}"}
                r = await client.post(f"{targets['serving']}/v1/predict", json={"entities": entities})
                assert r.status_code == 200, r.text

            async def applied() -> None:
                body = {"entity": "user", "ids": ["rep-u0", "rep-u1", "rep-u2"], "features": ["user_views_total"]}
                rows = (await client.post(f"{features}/v1/features:batch", json=body)).json()
                assert sum(row["features"]["user_views_total"] for row in rows) == 30

            await eventually(applied)
            await asyncio.sleep(0.6)  # a few more snapshots after everything was applied
        sampler.stop()
        # the same sampler from the command line, as for a platform not started by `rtml up`
        env = {**os.environ, "RTML_INGEST_PORT": str(s.ingest_port), "RTML_FEATURES_PORT": str(s.features_port),
               "RTML_SERVING_PORT": str(s.serving_port), "RTML_FEEDBACK_PORT": str(free_port())}  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rtml.cli.main", "report", "--record", "--interval", "0.2", "--duration", "2",
            "--history", str(tmp_path / "recorded"), env=env, cwd=tmp_path, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        said = " ".join(err.decode().split())  # rich wraps long lines
        assert "recording every 0.2 s" in said and "(ingest, features, serving)" in said
        recorded = load_history(tmp_path / "recorded")
        assert set(recorded.snapshots) == {"ingest", "features", "serving"}  # feedback is not running
        assert all(len(v) >= 2 for v in recorded.snapshots.values())  # a rate needs two; scrapes are slow under load
        with httpx.Client(timeout=5) as c:
            await asyncio.to_thread(sampler.sample_once, c)

    hist = load_history(history, since=time.time() - 300)
    assert set(hist.snapshots) == {"ingest", "features", "serving"} and hist.unreadable == 0
    assert all(len(v) >= 4 for v in hist.snapshots.values())
    owned = owned_snapshots(hist)  # one process: every /metrics shows all three apps; each series counted once

    def increase(name: str, match: dict[str, str]) -> float:
        group = lambda lb: "x" if all(lb.get(k) == v for k, v in match.items()) else None  # noqa: E731
        return sum(total_increase(pts, max_gap_s=60) for snaps in owned.values()
                   for pts in sum_by(snaps, name, group).values())  # fmt: skip

    # the requests made between the first and the last snapshot, exactly (the session's earlier tests are before)
    assert increase("rtml_http_requests_total", {"service": "serving", "route": "/v1/predict", "status": "200"}) == 40
    assert increase("rtml_http_requests_total", {"service": "ingest", "route": "/v1/events", "status": "202"}) == 3
    assert increase("rtml_ingest_events_total", {}) == 30
    fresh = [
        total_buckets(pts, max_gap_s=60)
        for snaps in owned.values()
        for pts in sum_buckets_by(snaps, "rtml_features_freshness_seconds_bucket", lambda _: "x").values()
    ]
    assert sum(b.get(math.inf, 0.0) for b in fresh) >= 30
    assert not any(r in str(x[1]) for snaps in hist.snapshots.values() for snap in snaps for x in snap.samples
                   for r in ("/healthz", "/readyz", "'/metrics'"))  # fmt: skip

    span = hist.span()
    assert span is not None
    rep = build_report(hist, span[0], span[1])
    traffic, latency = rep.panels[0], rep.panels[1]
    by_label = {line.label: line for line in traffic.lines}
    assert {"serving requests/s", "ingest requests/s", "ingest events/s"} <= set(by_label)
    assert (by_label["serving requests/s"].over_range or 0) > 0
    predict = next(line for line in latency.lines if line.label == "serving POST /v1/predict")
    assert predict.over_range is not None and 0 < predict.over_range < 2500

    png, page = tmp_path / "r.png", tmp_path / "r.html"
    result = CliRunner().invoke(cli, ["report", "--since", "5m", "--history", str(history), "--out", str(png),
                                      "--out", str(page)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert png_size(png.read_bytes()) == (1600, 1200)
    assert "serving requests/s" in page.read_text() and "data:image/png;base64," in page.read_text()


@pytest.mark.e2e
def test_rtml_up_records_a_history_that_rtml_report_draws(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> None:
    with running_platform(kafka_bootstrap, redis_url, tmp_path) as platform:
        files = [tmp_path / "metrics" / f"{s}.jsonl" for s in ("ingest", "features", "serving", "feedback")]
        deadline = time.monotonic() + 40  # the first scrape right away, the second 10 s later
        while time.monotonic() < deadline and not all(f.is_file() and len(f.read_bytes().splitlines()) >= 2
                                                      for f in files):  # fmt: skip
            time.sleep(0.5)
        assert all(f.is_file() and len(f.read_bytes().splitlines()) >= 2 for f in files), [
            (f.name, f.is_file() and len(f.read_bytes().splitlines())) for f in files
        ]
        report = subprocess.run(  # up --run-dir . keeps it in ./metrics
            [sys.executable, "-m", "rtml.cli.main", "report", "--since", "10m", "--history", "metrics",
             "--out", "r.png"],
            cwd=tmp_path, env=platform.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert report.returncode == 0, report.stderr
        assert report.stdout.strip() == "r.png" and png_size((tmp_path / "r.png").read_bytes()) == (1600, 1200)
        platform.proc.send_signal(signal.SIGINT)
        assert platform.proc.wait(15) == 0  # the sampler never holds up a clean stop
