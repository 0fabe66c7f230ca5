"""The learning-loop controller on the real Redis registry: rollouts carried through their stages from the
paired online quality, and retraining fired by the policy, each decision logged with its numbers."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rtml.core.config import load_config
from rtml.core.kafka import Producer, create_topics
from rtml.core.redis import Keys, Redis, connect
from rtml.core.schemas import Example
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.feedback.examples import Stored, write_stored
from rtml.feedback.learning import Learning
from rtml.feedback.quality import QualityStore
from rtml.serving.registry import ModelRegistry, train_and_register

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def lsettings(make_settings: Any, tmp_path: Path) -> AsyncIterator[Settings]:
    demo = yaml.safe_load((ROOT / "services/rtml/demo/rtml.yaml").read_text())
    demo["models"]["ctr"]["rollout"] = {"shadow_labels": 100, "min_gain": 0.02, "guard_labels": 100, "max_loss": 0.02}
    demo["models"]["ctr"]["retrain"] = {"min_auc": 0.7, "min_labels": 50, "min_examples": 200, "cooldown": "1h"}
    demo["models"]["ctr"]["quality"] = {"window": "10m"}
    path = tmp_path / "rtml.yaml"
    path.write_text(yaml.safe_dump(demo))
    s: Settings = make_settings(config=path, examples_dir=tmp_path / "examples", learning_interval_s=0.5)
    await create_topics(s)
    yield s


@pytest.fixture
async def parts(lsettings: Settings) -> AsyncIterator[tuple[Learning, QualityStore, ModelRegistry, Redis]]:
    redis = connect(lsettings)
    config = load_config(lsettings.platform_config_path())
    keys = Keys(lsettings.redis.key_prefix)
    quality = QualityStore(redis, keys, config)
    async with Producer(lsettings) as producer:
        yield Learning(lsettings, config, redis, producer, quality), quality, ModelRegistry(redis, keys), redis
    await redis.aclose()


def labelled(n: int, served: str, good: str | None, bad: str | None, seed: int, start: int) -> list[Example]:
    """Examples served by ``served``; version ``good`` scores them well (AUC ~0.9), ``bad`` at random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        y = float(rng.random() < 0.4)
        scores = {}
        if good is not None:
            scores[good] = min(max(rng.gauss(0.65 if y else 0.35, 0.15), 0.0), 1.0)
        if bad is not None:
            scores[bad] = rng.random()
        score = scores.pop(served)
        out.append(Example(
            prediction_id=f"p{seed}-{i}", model="ctr", version=served, entities={"user_id": "u"},
            features={"user_clicks_5m": 1.0, "item_ctr_1h": 0.1, "user_items_24h": 3.0}, score=score, label=y,
            predicted_at=start + i, labelled_at=start + i, shadow=scores,
        ))  # fmt: skip
    return out


async def test_shadow_candidate_is_promoted_then_rolled_back_when_it_degrades(
    parts: tuple[Learning, QualityStore, ModelRegistry, Redis], lsettings: Settings
) -> None:
    learning, quality, registry, _ = parts
    v1 = await train_and_register(lsettings, "ctr")
    v2 = await train_and_register(lsettings, "ctr", promote=False)
    rollout = await registry.start_rollout("ctr", v2, "shadow")
    now = now_ms()
    # labels from before the rollout entered its stage do not count for it
    await quality.record(labelled(300, v1, good=v1, bad=v2, seed=1, start=now - 1000))
    assert await learning.step(["ctr"]) == []  # snapshot taken: 0 labels in this stage yet
    await quality.record(labelled(60, v1, good=v2, bad=v1, seed=2, start=now))
    assert await learning.step(["ctr"]) == [], "60 of 100 labels: wait"
    await quality.record(labelled(60, v1, good=v2, bad=v1, seed=3, start=now))
    [d] = await learning.step(["ctr"])
    assert d["decision"] == "promote" and d["numbers"]["labels"] == 120
    assert d["numbers"]["other"] > d["numbers"]["live"] + 0.2, "the candidate's AUC, on the stage's labels only"
    assert await registry.live_version("ctr") == v2
    guard = await registry.rollout("ctr")
    assert guard is not None and (guard.stage, guard.version, guard.id) == ("guard", v1, rollout.id)

    # after the promotion the new version turns out worse than the one it replaced: rollback
    await learning.step(["ctr"])  # the guard stage's snapshot
    await quality.record(labelled(120, v2, good=v1, bad=v2, seed=4, start=now))
    [d] = await learning.step(["ctr"])
    assert d["decision"] == "rollback" and d["numbers"]["loss"] > 0.02
    assert await registry.live_version("ctr") == v1
    assert await registry.rollout("ctr") is None
    log = await learning.decisions("ctr")
    assert [x["decision"] for x in log] == ["rollback", "promote"]
    assert log[1]["numbers"]["rollout_id"] == rollout.id and log[1]["numbers"]["other_version"] == v2


async def test_a_candidate_no_better_than_live_is_rejected(
    parts: tuple[Learning, QualityStore, ModelRegistry, Redis], lsettings: Settings
) -> None:
    learning, quality, registry, _ = parts
    v1 = await train_and_register(lsettings, "ctr")
    v2 = await train_and_register(lsettings, "ctr", promote=False)
    await registry.start_rollout("ctr", v2, "shadow")
    await learning.step(["ctr"])
    await quality.record(labelled(150, v1, good=v1, bad=v2, seed=5, start=now_ms()))
    [d] = await learning.step(["ctr"])
    assert d["decision"] == "reject" and d["numbers"]["gain"] < 0
    assert await registry.live_version("ctr") == v1 and await registry.rollout("ctr") is None


async def test_low_live_auc_retrains_from_the_store_and_starts_the_candidate_in_shadow(
    parts: tuple[Learning, QualityStore, ModelRegistry, Redis], lsettings: Settings
) -> None:
    learning, quality, registry, _ = parts
    v1 = await train_and_register(lsettings, "ctr")
    now = now_ms()
    bad_days = labelled(40, v1, good=None, bad=v1, seed=6, start=now)
    await quality.record(bad_days)
    assert await learning.step(["ctr"]) == [], "40 labels: below min_labels, no trigger"

    await quality.record(labelled(40, v1, good=None, bad=v1, seed=7, start=now))
    [d] = await learning.step(["ctr"])
    assert d["decision"] == "retrain_skipped" and "no stored examples" in d["reason"], "the store is still empty"
    assert d["numbers"]["trigger"] == "min_auc" and d["numbers"]["window_auc"] < 0.7

    # the store fills: examples whose label follows user_items_24h
    rng = random.Random(8)
    rows = []
    for i in range(400):
        variety = rng.randrange(0, 40)
        rows.append(Example(
            prediction_id=f"s{i}", model="ctr", version=v1, entities={"user_id": "u"},
            features={"user_clicks_5m": 1.0, "item_ctr_1h": 0.1, "user_items_24h": float(variety)}, score=0.5,
            label=float(variety > 20), predicted_at=now + i, labelled_at=now + i,
        ))  # fmt: skip
    write_stored(lsettings.examples_dir, [Stored(0, i, ex) for i, ex in enumerate(rows)])
    assert await learning.step(["ctr"], now=now + 30_000) == [], "a skipped training waits a minute"
    [d] = await learning.step(["ctr"], now=now + 61_000)
    assert d["decision"] == "retrained" and d["numbers"]["trigger"] == "min_auc"
    assert d["numbers"]["auc"] > 0.9 and d["numbers"]["compared_with"] == v1, "the holdout's auc"
    assert d["numbers"]["window_auc"] < 0.7, "next to the live version's windowed auc that triggered it"
    rollout = await registry.rollout("ctr")
    assert rollout is not None and (rollout.stage, rollout.version) == ("shadow", d["numbers"]["version"])
    assert await registry.live_version("ctr") == v1
