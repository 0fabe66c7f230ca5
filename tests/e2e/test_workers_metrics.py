"""``rtml serve`` with 2 uvicorn workers, as real processes: /metrics counts every worker's requests exactly.

Each worker is made to answer a known share (the other one is SIGSTOPped meanwhile, so it cannot accept), then
every scrape, whichever worker answers it, must show the total; the gauges must be one series each (no ``pid``
label, no duplicates); a worker killed with SIGKILL is replaced and the totals do not go back. The consumer
lag of features run with 2 workers (one consumer-group member each) is one series per partition, 0 once done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, wait_http_ready

pytestmark = pytest.mark.e2e

ROUTE = "/v1/events"


def start(service: str, env: dict[str, str], workers: int, cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "rtml.cli.main", "serve", service, "--workers", str(workers)],
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=open(cwd / f"{service}.log", "ab"),  # noqa: SIM115
    )  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape(url: str) -> dict[str, list[Any]]:
    """family name -> samples, over a new connection (so any worker may answer)."""
    text = httpx.get(f"{url}/metrics", headers={"Connection": "close"}, timeout=5).text
    return {f.name: list(f.samples) for f in text_string_to_metric_families(text)}


def count_202(families: dict[str, list[Any]]) -> float:
    return sum(
        s.value
        for s in families["rtml_http_requests"]
        if s.name == "rtml_http_requests_total" and s.labels["route"] == ROUTE and s.labels["status"] == "202"
    )


def post(url: str, n: int, tag: str) -> None:
    for i in range(n):
        r = httpx.post(f"{url}{ROUTE}", json={"type": "click", "user_id": f"{tag}{i}"},
                       headers={"Connection": "close"}, timeout=10)  # fmt: skip
        assert r.status_code == 202, r.text


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def worker_pids(metrics_dir: Path) -> set[int]:
    return {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("counter_*.db")}


def assert_one_series_each(families: dict[str, list[Any]]) -> None:
    for name, samples in families.items():
        keys = Counter((s.name, tuple(sorted(s.labels.items()))) for s in samples)
        assert max(keys.values()) == 1, (name, keys.most_common(2))
        assert all("pid" not in s.labels for s in samples), name


@pytest.fixture
def env(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    unique = uuid.uuid4().hex[:8]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    yield {
        **os.environ,
        "RTML_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "RTML_REDIS_URL": redis_url,
        "RTML_TOPIC_PREFIX": f"w{unique}.",
        "RTML_REDIS_KEY_PREFIX": f"w{unique}:",
        "RTML_KAFKA_PARTITIONS": "4",
        "RTML_KAFKA_LAG_INTERVAL_S": "0.5",
        "RTML_CONFIG": str(Path(__file__).resolve().parents[2] / "services" / "rtml" / "demo" / "rtml.yaml"),
        "RTML_INGEST_PORT": str(free_port()),
        "RTML_FEATURES_PORT": str(free_port()),
        "TMPDIR": str(tmp),  # where rtml serve makes its per-run multiprocess directory
    }


def test_two_workers_count_every_request_once(env: dict[str, str], tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{env['RTML_INGEST_PORT']}"
    features_url = f"http://127.0.0.1:{env['RTML_FEATURES_PORT']}"
    tmp = Path(env["TMPDIR"])
    ingest = start("ingest", env, 2, tmp_path)
    features = start("features", env, 2, tmp_path)
    try:
        wait_http_ready(url, ingest, tmp_path / "ingest.log")
        (metrics_dir,) = tmp.glob("rtml-ingest-metrics-*")
        deadline = time.monotonic() + 30
        while len(worker_pids(metrics_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(worker_pids(metrics_dir)) == 2

        # each worker answers a known share: the other one is stopped and cannot accept meanwhile
        total = 0
        for turn, n in enumerate((7, 5, 4)):
            # two live workers to choose from: a worker stopped in an earlier turn may have been replaced
            deadline = time.monotonic() + 60
            while len(live := sorted(p for p in worker_pids(metrics_dir) if alive(p))) < 2:
                assert time.monotonic() < deadline, "uvicorn did not bring back a second worker"
                time.sleep(0.2)
            stopped = live[(turn + 1) % 2]
            try:
                os.kill(stopped, signal.SIGSTOP)
            except ProcessLookupError:  # gone between the check and the signal: its counts stay, stop the other
                stopped = live[turn % 2]
                os.kill(stopped, signal.SIGSTOP)
            try:
                post(url, n, f"s{stopped}-")
            finally:
                # uvicorn's supervisor pings its workers and replaces one that does not answer within its
                # health-check timeout: on a loaded machine the stopped one may be gone by now (its counts stay)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped, signal.SIGCONT)
            total += n
        for _ in range(12):  # whichever worker answers the scrape, it counts both
            families = scrape(url)
            assert count_202(families) == total
            assert [s.value for s in families["rtml_ingest_events"] if s.name == "rtml_ingest_events_total"] == [total]
            assert_one_series_each(families)
        assert "process_cpu_seconds" not in scrape(url)  # per-process collectors would be one worker's only

        # a worker killed outright is replaced; what it counted stays counted
        known = worker_pids(metrics_dir)
        first = next(pid for pid in sorted(known) if alive(pid))  # (a worker replaced above is not)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(worker_pids(metrics_dir)) < len(known) + 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(worker_pids(metrics_dir)) == len(known) + 1  # the dead worker's counters kept, a new worker
        assert not list(metrics_dir.glob(f"gauge_live*_{first}.db"))  # its live gauges no longer count
        post(url, 3, "after-")
        total += 3
        for _ in range(6):
            assert count_202(scrape(url)) == total

        # features with 2 workers: the group's partitions are spread over them, each lag reported once
        wait_http_ready(features_url, features, tmp_path / "features.log")

        def consumed() -> tuple[float, dict[str, float]]:
            families = scrape(features_url)
            assert_one_series_each(families)
            mine = [s for f in ("rtml_consumer_records", "rtml_consumer_lag_records") for s in families.get(f, [])
                    if s.labels.get("consumer") == "features"]  # fmt: skip
            records = sum(s.value for s in mine if s.name == "rtml_consumer_records_total")
            lag = {s.labels["partition"]: s.value for s in mine if s.name == "rtml_consumer_lag_records"}
            return records, lag

        deadline = time.monotonic() + 60
        while consumed() != (total, {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0}) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert consumed() == (total, {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0})
    finally:
        stop(ingest)
        stop(features)
    assert ingest.returncode == 0 and features.returncode == 0
    assert not list(tmp.glob("rtml-*-metrics-*"))  # the per-run directories are removed at exit


def test_one_worker_runs_in_process_without_a_multiprocess_directory(env: dict[str, str], tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{env['RTML_INGEST_PORT']}"
    ingest = start("ingest", env, 1, tmp_path)
    try:
        wait_http_ready(url, ingest, tmp_path / "ingest.log")
        post(url, 3, "one-")
        families = scrape(url)
        assert count_202(families) == 3
        assert "process_cpu_seconds" in families  # the ordinary single-process registry
        assert not list(Path(env["TMPDIR"]).glob("rtml-*-metrics-*"))
    finally:
        stop(ingest)
    assert ingest.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it handled
