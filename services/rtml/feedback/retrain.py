"""Retraining from the examples: what ``rtml train --from-examples|--from-topic`` and the retrain policy run.

The examples are the exact feature values each prediction was served with, joined with its label
(``rtml.feedback.examples``), so the model trains on what serving will show it: no training/serving skew.
Training is time-ordered (``rtml.serving.train.train_time_ordered``): the newest fifth is the holdout, and
the live version is scored on the same holdout. The new version is registered with both sets of numbers
and, by default, starts as a shadow candidate: online quality decides whether it goes live
(``rtml.feedback.learning``), not the offline holdout alone.

The examples come from an ``ExampleSource``: the Parquet examples store (``StoreSource``, the default) or
the ``examples`` topic itself (``TopicSource``). Both give the same ``ExampleTable`` (one row per prediction
and item, ordered by prediction time), so the rest is one training path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from rtml.core.config import PlatformConfig, load_config
from rtml.core.errors import InvalidInput, NotFound
from rtml.core.kafka import Producer
from rtml.core.redis import Keys, Redis
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.feedback.examples import TOPIC_IDLE_S, ExampleTable, TopicRead, read_examples, read_topic_examples
from rtml.serving.inference.session import build_model
from rtml.serving.registry import ModelRegistry, Rollout
from rtml.serving.train import Scorer, train_time_ordered

Then = Literal["shadow", "promote", "none"]


class ExampleSource(Protocol):
    """Where retraining reads a model's examples."""

    @property
    def name(self) -> str:
        """Names the source in the version's metadata (``source``) and in messages."""
        ...

    async def read(self, model: str, since_ms: int | None) -> ExampleTable:
        """The model's examples predicted at or after ``since_ms`` (all when None), deduplicated and ordered by
        prediction time; ``InvalidInput`` when there is none."""
        ...


@dataclass(frozen=True, slots=True)
class StoreSource:
    """The Parquet examples store under ``root`` (``RTML_EXAMPLES_DIR``)."""

    root: Path

    @property
    def name(self) -> str:
        return f"examples store {self.root}"

    async def read(self, model: str, since_ms: int | None) -> ExampleTable:
        return await asyncio.to_thread(read_examples, self.root, model, since_ms=since_ms)


@dataclass(slots=True)
class TopicSource:
    """The ``examples`` topic, read from its beginning to where it has been idle for ``idle_s`` seconds
    (``rtml.feedback.examples.read_topic_examples``). ``found`` tells what the last read saw (records, the
    malformed ones); ``progress(records_read)`` is called as it reads."""

    settings: Settings
    idle_s: float = TOPIC_IDLE_S
    progress: Callable[[int], None] | None = None
    found: TopicRead | None = field(default=None, init=False)

    @property
    def name(self) -> str:
        return f"topic {self.settings.topic('examples')}"

    async def read(self, model: str, since_ms: int | None) -> ExampleTable:
        table, self.found = await read_topic_examples(
            self.settings, model, since_ms=since_ms, idle_s=self.idle_s, progress=self.progress
        )
        return table


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
    source: ExampleSource | None = None,
) -> Retrained:
    """Train ``model`` on its examples from ``source`` (default: the examples store ``settings.examples_dir``)
    predicted at or after ``since_ms`` (default: the policy's ``train_window``), register the version, then
    start it in shadow (``then="shadow"``), make it live (``"promote"``) or leave it registered (``"none"``).
    A model with no live version is promoted: there is nothing to shadow. ``InvalidInput`` when the source has
    too few examples (fewer than ``min_examples``, or than training needs) or one label only."""
    config = config or load_config(settings.platform_config_path())
    if model not in config.models:
        raise NotFound(f"unknown model {model!r}: not in the platform config")
    mdef = config.models[model]
    since = since_ms if since_ms is not None else train_since(config, model, now_ms())
    source = source or StoreSource(settings.examples_dir)
    table = await source.read(model, since)
    if len(table) < min_examples:
        raise InvalidInput(f"{model}: {len(table)} examples in the {source.name}, the retrain policy needs "
                           f"{min_examples}")  # fmt: skip
    registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
    live = await live_scorer(registry, model)
    y = (table.labels >= 0.5).astype(np.int64)
    described = f"{source.name} ({len(table)} examples" + (f" predicted since {since})" if since is not None else ")")
    trained = await asyncio.to_thread(
        train_time_ordered, model, list(mdef.features), dict(mdef.defaults), table.matrix, y, table.predicted_at,
        live=live, source=described, created_by=by,
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
