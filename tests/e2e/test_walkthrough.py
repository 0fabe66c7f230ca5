"""The whole loop over HTTP against ``rtml up`` as real processes, then a clean SIGTERM shutdown.

events -> features visible -> predict uses them (the logged prediction carries those exact values)
-> outcome -> joined example on rtml.examples.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rtml.core.kafka import Consumed, ConsumerLoop, Producer, decode_json
from rtml.core.settings import SERVICES, Settings
from tests.e2e.conftest import Platform
from tests.helpers import free_port

pytestmark = pytest.mark.e2e


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc; empty elsewhere). Zombies count as gone."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    gone: set[int] = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            gone.add(p)
            continue
        if state == "Z":
            gone.add(p)
    return pids - gone


async def consume_until(settings: Settings, topic: str, want: Any, timeout: float = 30) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    async def handle(batch: list[Consumed[Any]]) -> None:
        found.extend(c.value for c in batch if want(c.value))
        if found:
            await loop.stop()

    async with Producer(settings) as producer:
        loop: ConsumerLoop[Any] = ConsumerLoop(
            settings, name=f"e2e-{topic}", topics=[topic], group_id=f"e2e-{uuid.uuid4().hex[:6]}",
            decode=decode_json, handle=handle, producer=producer,
        )  # fmt: skip
        async with loop:
            await loop.run(timeout=timeout)
    assert found, f"nothing matching on {topic} within {timeout} s"
    return found[0]


async def test_the_whole_loop_over_http(platform: Platform) -> None:
    u = platform.urls
    user, item = f"u-{uuid.uuid4().hex[:6]}", "t9"
    async with httpx.AsyncClient(timeout=10) as http:
        events = [
            {"type": "view", "user_id": user, "item_id": item},
            {"type": "click", "user_id": user, "item_id": item},
            {"type": "view", "user_id": user, "item_id": "t4"},
            {"type": "view", "user_id": "other", "item_id": item},
        ]
        r = await http.post(f"{u['ingest']}/v1/events", json={"events": events})
        assert r.status_code == 202 and r.json() == {"accepted": 4}

        deadline = time.monotonic() + 15
        while True:
            ru = await http.get(f"{u['features']}/v1/features/user/{user}")
            ri = await http.get(f"{u['features']}/v1/features/item/{item}")
            assert ru.status_code == ri.status_code == 200, (ru.text, ri.text)
            user_f, item_f = ru.json()["features"], ri.json()["features"]
            # the other user's view sits on another partition: wait until every event is applied
            ctr = item_f["item_ctr_1h"]
            if user_f["user_clicks_5m"] == 1 and ctr is not None and abs(ctr - 0.5) < 1e-9:
                break
            assert time.monotonic() < deadline, (user_f, item_f)
            await asyncio.sleep(0.05)
        assert user_f["user_items_24h"] == 2
        assert item_f["item_ctr_1h"] == pytest.approx(0.5)

        # values, not latency, are checked here: a generous deadline so a stall of this busy machine cannot
        # turn the answer degraded (the deadline itself: test_serving_admission.py)
        r = await http.post(f"{u['serving']}/v1/predict", json={"entities": {"user_id": user, "item_id": item}},
                            headers={"X-Request-Timeout-Ms": "5000"})  # fmt: skip
        assert r.status_code == 200, r.text
        pred = r.json()
        assert pred["model"] == "ctr" and pred["degraded"] is False and 0.0 <= pred["score"] <= 1.0

        logged = await consume_until(
            platform.settings(), "predictions", lambda v: v["prediction_id"] == pred["prediction_id"]
        )
        assert logged["features"] == {
            "user_clicks_5m": pytest.approx(user_f["user_clicks_5m"]),
            "item_ctr_1h": pytest.approx(item_f["item_ctr_1h"]),
            "user_items_24h": pytest.approx(user_f["user_items_24h"]),
        }
        assert logged["score"] == pytest.approx(pred["score"])

        r = await http.post(f"{u['feedback']}/v1/outcomes", json={"prediction_id": pred["prediction_id"], "label": 1})
        assert r.status_code == 202

        example = await consume_until(
            platform.settings(), "examples", lambda v: v["prediction_id"] == pred["prediction_id"]
        )
        assert example["label"] == 1.0 and example["features"] == logged["features"]
        assert example["version"] == pred["version"]

        for name, url in u.items():
            assert (await http.get(f"{url}/readyz")).status_code == 200, name
            metrics_text = (await http.get(f"{url}/metrics")).text
            buckets = {
                s.labels["le"]
                for family in text_string_to_metric_families(metrics_text)
                for s in family.samples
                if s.name == "rtml_http_request_duration_seconds_bucket"
                and s.labels.get("service") == name
                and s.labels.get("route") == "/readyz"
            }
            assert {"0.00025", "2.5"} <= buckets, (name, buckets)

    # a clean shutdown within 10 s, nothing left behind
    children = descendants(platform.proc.pid)
    if sys.platform == "linux":
        assert len(children) >= 4, children  # the four services (the broker and redis are the session's)
    started = time.monotonic()
    platform.proc.send_signal(signal.SIGTERM)
    platform.proc.wait(timeout=10)
    assert time.monotonic() - started < 10
    assert platform.proc.returncode == 0, platform.proc.stderr.read().decode() if platform.proc.stderr else ""
    assert not alive(children), f"left running after rtml up exited: {alive(children)}"
    async with httpx.AsyncClient(timeout=1) as http:
        for url in u.values():
            with pytest.raises(httpx.HTTPError):
                await http.get(f"{url}/healthz")


def test_up_starts_its_own_broker_and_redis_and_stops_them(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RTML_KAFKA_BOOTSTRAP", "RTML_REDIS_URL")}
    env.update({f"RTML_{s.upper()}_PORT": str(free_port()) for s in SERVICES})
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtml.cli.main", "up", "--run-dir", str(tmp_path)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = {}
        while "logs" not in lines:
            line = proc.stdout.readline().decode()
            assert line, proc.stderr.read().decode() if proc.stderr else "no output"
            name, _, value = line.strip().partition(" ")
            lines[name] = value.strip()
        assert lines["kafka"].endswith("(embedded)") and lines["redis"].endswith("(embedded)")
        r = httpx.post(f"{lines['ingest']}/v1/events", json={"type": "view", "user_id": "u1"})
        assert r.status_code == 202
        children = descendants(proc.pid)
        if sys.platform == "linux":
            assert len(children) >= 6, children  # four services, the broker and redis-server
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert not alive(children), f"left running after rtml up exited: {alive(children)}"
        broker_port = int(lines["kafka"].split()[0].rsplit(":", 1)[1])
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", broker_port), timeout=0.5):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def readme_walkthrough() -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Walk-through", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_the_readme_walkthrough_runs_verbatim(platform: Platform, tmp_path: Path) -> None:
    """The README's curl block, only with this test's ports, each call failing on an HTTP error."""
    script = readme_walkthrough()
    for name, default in (("ingest", 8001), ("features", 8002), ("serving", 8003), ("feedback", 8004)):
        script = script.replace(f"localhost:{default}", platform.urls[name].removeprefix("http://"))
    script = script.replace("curl -s ", "curl -sS --fail-with-body ")
    script = script.replace("# 2. read", "sleep 0.5\n# 2. read")  # "a few milliseconds later", with slack for CI
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert '{"accepted":3}' in out and '{"accepted":1}' in out
    assert '"user_clicks_5m":1' in out and '"item_ctr_1h":0.5' in out
    assert '"degraded":false' in out and 'rtml_predictions_total{model="ctr"' in out
