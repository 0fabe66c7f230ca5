"""The learning loop closed on real processes: drift -> quality drops -> retrain -> shadow -> promote -> recovery.

``rtml up`` (the four services as processes, on the session's broker and redis-server) with the demo config,
where the ``fraud`` model gets a shortened label rule and a retrain and rollout policy; ``rtml simulate``
sends a clickstream whose fraudsters change pattern (``--drift fraud``) part-way through, and has serving
score every purchase. Nothing in the loop is driven by the test: the label rule labels the purchases from
the chargebacks, feedback keeps the windowed quality, the policy retrains version 1 when its AUC falls,
the candidate serves in shadow and is promoted on its online quality. The test only watches
``/v1/models/fraud/quality`` and ``/v1/models/fraud/decisions``, and asserts on their numbers.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.conftest import DEMO_CONFIG, Platform, running_platform

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MIN_AUC = 0.65  # the retrain trigger (version 1 starts near 0.7-0.8: every window is empty at start-up)
MIN_LABELS = 200  # ... on at least this many labels in the window
MIN_GAIN = 0.02  # what the candidate must win by in shadow
SHADOW_LABELS = 80  # ... over this many labels
DRIFT_AT_S = 70  # seconds into the simulation
DEADLINE_S = 420  # the loop must close by then (measured: ~4 min on 2 busy cores)


def loop_config(path: Path) -> Path:
    """The demo config with a fraud label rule, quality window and policies sized for minutes, not days."""
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    fraud = config["models"]["fraud"]
    fraud["label"]["within"] = "10s"  # the simulator charges fraud back 2 s after the purchase
    fraud["quality"] = {"window": "60s"}
    fraud["retrain"] = {"min_auc": MIN_AUC, "min_labels": MIN_LABELS, "min_examples": 200, "cooldown": "30s",
                        "train_window": "100s"}  # fmt: skip
    fraud["rollout"] = {"shadow_labels": SHADOW_LABELS, "min_gain": MIN_GAIN, "guard_labels": 0}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Watch:
    """What the test saw of fraud's quality, every second: (seconds since the simulation started, live
    version, {version: quality})."""

    def __init__(self, platform: Platform) -> None:
        self.feedback = platform.urls["feedback"]
        self.serving = platform.urls["serving"]
        self.seen: list[tuple[float, str | None, dict[str, dict[str, Any]]]] = []

    async def sample(self, http: httpx.AsyncClient, t: float) -> None:
        q = (await http.get(f"{self.feedback}/v1/models/fraud/quality")).json()
        models = (await http.get(f"{self.serving}/v1/models")).json()
        live = next((m["live_version"] for m in models["models"] if m["name"] == "fraud"), None)
        self.seen.append((t, live, {v["version"]: v for v in q["versions"]}))

    async def decisions(self, http: httpx.AsyncClient) -> list[dict[str, Any]]:
        r = await http.get(f"{self.feedback}/v1/models/fraud/decisions")
        assert r.status_code == 200, r.text
        return list(reversed(r.json()["decisions"]))  # oldest first

    def auc(self, version: str, start: float, end: float, min_count: int = MIN_LABELS) -> list[float]:
        """The windowed AUCs of ``version`` sampled between ``start`` and ``end`` on enough labels."""
        return [q[version]["auc"] for t, _, q in self.seen if start <= t <= end and version in q
                and q[version]["auc"] is not None and q[version]["count"] >= min_count]  # fmt: skip

    def trace(self) -> str:
        rows = [f"{t:6.1f}s live={live} " + " ".join(f"v{v}:n={q['count']},auc={q['auc']}" for v, q in qs.items())
                for t, live, qs in self.seen[::5]]  # fmt: skip
        return "\n".join(rows)


async def test_drift_drops_quality_then_the_loop_retrains_shadows_promotes_and_recovers(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    env = {
        "RTML_CONFIG": str(loop_config(tmp_path / "rtml.yaml")),
        "RTML_LABEL_GRACE": "1s",
        "RTML_EXAMPLES_FLUSH_S": "2",
        "RTML_LEARNING_INTERVAL_S": "1",
        "RTML_EXAMPLES_DIR": str(tmp_path / "examples"),
    }
    with running_platform(kafka_bootstrap, redis_url, tmp_path, env=env) as platform:
        sim = subprocess.Popen(
            [sys.executable, "-m", "rtml.cli.main", "simulate", "--rate", "300", "--users", "20000",
             "--duration", str(DEADLINE_S), "--drift-at", str(DRIFT_AT_S), "--drift", "fraud",
             # scored 1 s after it is sent: the features include the purchase, as in training, on a busy box
             "--score-purchases", "--score-delay", "1s", "--chargeback-delay", "2s"],
            env=platform.env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        started, started_ms = time.monotonic(), time.time() * 1000
        watch = Watch(platform)
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                promoted_at = None
                while (t := time.monotonic() - started) < DEADLINE_S:
                    assert sim.poll() is None, sim.stderr.read().decode() if sim.stderr else "simulator exited"
                    await watch.sample(http, t)
                    live = watch.seen[-1][1]
                    if live not in (None, "1") and promoted_at is None:
                        promoted_at = t
                    if promoted_at is not None and t - promoted_at >= 10:  # its window holds its shadow labels too
                        break
                    await asyncio.sleep(1)
                decisions = await watch.decisions(http)
        finally:
            sim.terminate()
            sim.wait(timeout=10)
    trace = watch.trace() + "\n" + "\n".join(f"{d['decision']}: {d['reason']} {d['numbers']}" for d in decisions)
    assert promoted_at is not None, f"no version was promoted within {DEADLINE_S} s:\n{trace}"

    # 1. version 1 ranks purchases well until the drift ...
    retrains = [d for d in decisions if d["decision"] == "retrained"]
    assert retrains, trace
    first_ts = (retrains[0]["ts"] - started_ms) / 1000
    peak = max(watch.auc("1", 0, first_ts))
    assert peak >= MIN_AUC + 0.1, trace

    # 2. ... then its windowed AUC measurably drops, and that is what triggers the retraining
    first = retrains[0]["numbers"]
    assert first["trigger"] == "min_auc" and first["live_version"] == "1", trace
    assert first_ts >= DRIFT_AT_S, trace
    assert first["window_auc"] < MIN_AUC and first["window_count"] >= MIN_LABELS, trace
    dropped = watch.auc("1", DRIFT_AT_S, promoted_at)
    assert min(dropped) < MIN_AUC and min(dropped) <= peak - 0.1, trace

    # 3. a candidate served in shadow and was promoted on better online quality over the same labels
    promotions = [d for d in decisions if d["decision"] == "promote"]
    assert len(promotions) == 1, trace
    p = promotions[0]["numbers"]
    assert p["stage"] == "shadow" and p["live_version"] == "1" and p["labels"] >= SHADOW_LABELS, trace
    assert p["other"] > p["live"] + MIN_GAIN and p["gain"] == pytest.approx(p["other"] - p["live"]), trace
    new = promotions[0]["numbers"]["other_version"]
    assert new in {d["numbers"]["version"] for d in retrains}, trace
    assert watch.seen[-1][1] == new, trace

    # 4. quality recovers: the new version's windowed AUC (its shadow labels and the live ones since) is back
    # above the trigger and well above what version 1 fell to
    after = watch.auc(new, promoted_at, DEADLINE_S, min_count=SHADOW_LABELS)
    assert after, trace
    assert min(after) >= MIN_AUC and min(after) >= min(dropped) + 0.1, trace
