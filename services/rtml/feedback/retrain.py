"""Retraining from the examples store: what ``rtml train --from-examples`` and the retrain policy run.

The examples are the exact feature values each prediction was served with, joined with its label
(``rtml.feedback.examples``), so the model trains on what serving will show it: no training/serving skew.
Training is time-ordered (``rtml.serving.train.train_time_ordered``): the newest fifth is the holdout, and
the live version is scored on the same holdout. The new version is registered with both sets of numbers
and, by default, starts as a shadow candidate: online quality decides whether it goes live
(``rtml.feedback.learning``), not the offline holdout alone.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from rtml.core.config import PlatformConfig, load_config
from rtml.core.errors import InvalidInput, NotFound
from rtml.core.kafka import Producer
from rtml.core.redis import Keys, Redis
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.feedback.examples import read_examples
from rtml.serving.inference.session import build_model
from rtml.serving.registry import ModelRegistry, Rollout
from rtml.serving.train import Scorer, train_time_ordered

Then = Literal["shadow", "promote", "none"]


@dataclass(frozen=True, slots=True)
class Retrained:
    model: str
    version: str
    metrics: dict[str, Any]
    compared_with: str | None  # the live version scored on the same holdout
    rollout: Rollout | None  # the shadow rollout started, if any
    promoted: bool


def train_since(config: PlatformConfig, model: str, now: int) -> int | None:
    """The oldest prediction time to train on: the model's ``retrain.train_window`` back from ``now``."""
    policy = config.models[model].retrain
    if policy is None or policy.train_window_ms is None:
        return None
    return now - policy.train_window_ms


async def live_scorer(registry: ModelRegistry, model: str) -> Scorer | None:
    version = await registry.live_version(model)
    if version is None:
        return None
    onnx_bytes, metadata = await registry.get(model, version)
    loaded = await asyncio.to_thread(build_model, model, version, onnx_bytes, metadata)
    return Scorer(version, loaded.features, loaded.defaults, loaded.predict)


async def retrain_from_examples(
    settings: Settings,
    redis: Redis,
    model: str,
    *,
    then: Then = "shadow",
    since_ms: int | None = None,
    producer: Producer | None = None,
    by: str | None = None,
    config: PlatformConfig | None = None,
    min_examples: int = 0,
) -> Retrained:
    """Train ``model`` on its stored examples (predicted at or after ``since_ms``; default: the policy's
    ``train_window``), register the version, then start it in shadow (``then="shadow"``), make it live
    (``"promote"``) or leave it registered (``"none"``). A model with no live version is promoted: there
    is nothing to shadow. ``InvalidInput`` when the store has too few examples (fewer than ``min_examples``,
    or than training needs) or one label only."""
    config = config or load_config(settings.platform_config_path())
    if model not in config.models:
        raise NotFound(f"unknown model {model!r}: not in the platform config")
    mdef = config.models[model]
    since = since_ms if since_ms is not None else train_since(config, model, now_ms())
    table = await asyncio.to_thread(read_examples, settings.examples_dir, model, since_ms=since)
    if len(table) < min_examples:
        raise InvalidInput(f"{model}: {len(table)} stored examples, the retrain policy needs {min_examples}")
    registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
    live = await live_scorer(registry, model)
    y = (table.labels >= 0.5).astype(np.int64)
    source = f"examples store {settings.examples_dir} ({len(table)} examples" + (
        f" predicted since {since})" if since is not None else ")"
    )
    trained = await asyncio.to_thread(
        train_time_ordered, model, list(mdef.features), dict(mdef.defaults), table.matrix, y, table.predicted_at,
        live=live, source=source, created_by=by,
    )  # fmt: skip
    version = await registry.register(model, trained.onnx_bytes, trained.metadata, config, created_by=by)
    rollout = None
    promoted = False
    if then == "promote" or (then == "shadow" and live is None):
        await registry.promote(model, version, producer, by)
        promoted = True
    elif then == "shadow":
        rollout = await registry.start_rollout(model, version, "shadow", by=by, producer=producer)
    return Retrained(model, version, dict(trained.metadata["metrics"]), live.version if live else None, rollout,
                     promoted)  # fmt: skip
