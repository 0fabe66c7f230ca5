"""Retraining from the examples store on the real Redis registry: time-ordered holdout, the live version
scored on the same holdout, the candidate registered with those numbers and started in shadow."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from rtml.core.errors import InvalidInput
from rtml.core.kafka import create_topics
from rtml.core.redis import Keys, Redis, connect
from rtml.core.schemas import Example
from rtml.core.settings import Settings
from rtml.feedback.examples import Stored, read_examples, write_stored
from rtml.feedback.retrain import retrain_from_examples
from rtml.serving.inference.session import build_model
from rtml.serving.registry import ModelRegistry, train_and_register

pytestmark = pytest.mark.integration

FEATURES = ("user_clicks_5m", "item_ctr_1h", "user_items_24h")


def examples(n: int, start: int, seed: int, flip: bool = False) -> list[Example]:
    """Labels driven by user_items_24h (more variety, more clicks; ``flip``: fewer)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        variety = rng.randrange(0, 40)
        p = 1 / (1 + np.exp(-(variety - 20) / 4 * (-1 if flip else 1)))
        out.append(Example(
            prediction_id=f"p{seed}-{i}", model="ctr", version="1", entities={"user_id": f"u{i % 50}"},
            features={"user_clicks_5m": float(rng.randrange(0, 5)), "item_ctr_1h": rng.random() * 0.2,
                      "user_items_24h": float(variety)},
            score=0.5, label=float(rng.random() < p), predicted_at=start + i * 1000,
            labelled_at=start + i * 1000 + 500,
        ))  # fmt: skip
    return out


@pytest.fixture
async def rsettings(make_settings: Any, tmp_path: Path) -> AsyncIterator[Settings]:
    s: Settings = make_settings(examples_dir=tmp_path / "examples")
    await create_topics(s)
    yield s


@pytest.fixture
async def redis(rsettings: Settings) -> AsyncIterator[Redis]:
    r = connect(rsettings)
    yield r
    await r.aclose()


async def test_retrain_registers_a_time_ordered_candidate_and_starts_it_in_shadow(
    rsettings: Settings, redis: Redis
) -> None:
    live_version = await train_and_register(rsettings, "ctr")
    rows = examples(1000, 1_700_000_000_000, seed=1)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)  # stored in any order: training orders by prediction time
    write_stored(rsettings.examples_dir, [Stored(0, i, ex) for i, ex in enumerate(shuffled)])

    done = await retrain_from_examples(rsettings, redis, "ctr", by="test")

    registry = ModelRegistry(redis, Keys(rsettings.redis.key_prefix))
    assert done.compared_with == live_version and not done.promoted
    assert await registry.live_version("ctr") == live_version, "a shadow candidate is not live"
    rollout = await registry.rollout("ctr")
    assert rollout is not None and (rollout.version, rollout.stage) == (done.version, "shadow")

    onnx_bytes, metadata = await registry.get("ctr", done.version)
    m = metadata["metrics"]
    assert (m["n_train"], m["n_holdout"]) == (800, 200)
    assert m["holdout_from"] == rows[800].predicted_at, "the holdout is the newest fifth"
    # the numbers are those of the registered model and of the live one on exactly that holdout
    table = read_examples(rsettings.examples_dir, "ctr")
    y = (table.labels >= 0.5).astype(int)[800:]
    candidate = build_model("ctr", done.version, onnx_bytes, metadata)
    assert m["auc"] == pytest.approx(roc_auc_score(y, candidate.predict(table.matrix(FEATURES)[800:])), abs=1e-3)
    live_bytes, live_md = await registry.get("ctr", live_version)
    live = build_model("ctr", live_version, live_bytes, live_md)
    live_auc = roc_auc_score(y, live.predict(table.matrix(live.features, live.defaults)[800:]))
    assert m["live_auc"] == pytest.approx(live_auc, abs=1e-3)
    assert m["auc"] > 0.8 > m["live_auc"], "trained on the served features, it learns what the live one cannot"
    assert metadata["reference"]["features"].keys() == set(FEATURES)
    assert metadata["compared_with"] == live_version and metadata["created_by"] == "test"


async def test_train_window_keeps_only_recent_examples(rsettings: Settings, redis: Redis) -> None:
    await train_and_register(rsettings, "ctr")
    old = examples(600, 1_700_000_000_000, seed=2)
    new = examples(600, 1_700_001_000_000, seed=3, flip=True)  # the world changed
    write_stored(rsettings.examples_dir, [Stored(0, i, ex) for i, ex in enumerate(old + new)])

    done = await retrain_from_examples(rsettings, redis, "ctr", then="none", since_ms=new[0].predicted_at)
    assert done.metrics["n_train"] + done.metrics["n_holdout"] == 600
    assert done.metrics["auc"] > 0.8, "trained on the new world only"
    assert done.rollout is None and not done.promoted


async def test_too_few_examples_or_one_label_is_a_clear_error(rsettings: Settings, redis: Redis) -> None:
    await train_and_register(rsettings, "ctr")
    few = examples(30, 1_700_000_000_000, seed=4)
    write_stored(rsettings.examples_dir, [Stored(0, i, ex) for i, ex in enumerate(few)])
    with pytest.raises(InvalidInput, match="at least"):
        await retrain_from_examples(rsettings, redis, "ctr")
    same = [ex.model_copy(update={"prediction_id": f"s{i}", "label": 0.0, "predicted_at": ex.predicted_at + 10**6})
            for i, ex in enumerate(examples(300, 1_700_000_000_000, seed=5))]  # fmt: skip
    write_stored(rsettings.examples_dir, [Stored(1, i, ex) for i, ex in enumerate(same)])
    with pytest.raises(InvalidInput, match="one label"):
        await retrain_from_examples(rsettings, redis, "ctr", since_ms=same[0].predicted_at)
