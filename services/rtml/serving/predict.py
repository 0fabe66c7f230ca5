"""The request path: features (one Redis round trip) -> one float32 matrix -> one ONNX call -> log.

Feature values come, in order of precedence, from the request, the online store, the model's declared
defaults, else 0.0. ``degraded`` is true only when the store could not be read (down, or slower than the
request's deadline); the answer is still given.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rtml.core import metrics
from rtml.core.config import PlatformConfig
from rtml.core.errors import DependencyUnavailable, NotFound
from rtml.core.schemas import PredictionLogged
from rtml.core.timeutil import now_ms
from rtml.core.values import as_float
from rtml.features.store import FeatureStore
from rtml.serving.admission import remaining_s
from rtml.serving.inference.live import LiveModels
from rtml.serving.inference.session import LoadedModel
from rtml.serving.predictlog import PredictionLog

EntityKey = tuple[str, str]  # (entity, entity id)


@dataclass(frozen=True, slots=True)
class Scored:
    prediction_id: str
    model: str
    version: str
    scores: list[float]
    degraded: bool


class Predictor:
    def __init__(self, config: PlatformConfig, store: FeatureStore, live: LiveModels, log: PredictionLog) -> None:
        self.config = config
        self.store = store
        self.live = live
        self.log = log

    def model(self, name: str) -> LoadedModel:
        model = self.live.get(name)
        if model is not None:
            return model
        if not self.live.registry_reachable:  # nothing loaded yet and Redis down: 503, not "no live version"
            raise DependencyUnavailable("redis", "the model registry cannot be read yet")
        if name not in self.live.known:
            raise NotFound(f"unknown model {name!r}")
        raise NotFound(f"model {name!r} has no live version (promote one: POST /v1/models/{name}/promote)")

    def _needs(self, model: LoadedModel, entities: Mapping[str, str], skip: Mapping[str, Any]
               ) -> list[tuple[str, EntityKey]]:  # fmt: skip
        """(feature, entity key) for each model feature the store must supply for these entities."""
        out = []
        for name in model.features:
            if name in skip:
                continue
            fd = self.config.features.get(name)
            if fd is None:
                continue
            entity_id = self.config.entity_id(fd.entity, dict(entities))
            if entity_id is not None:
                out.append((name, (fd.entity, entity_id)))
        return out

    async def _read(self, model: LoadedModel, needs: Sequence[tuple[str, EntityKey]]
                    ) -> tuple[dict[EntityKey, dict[str, Any]], bool]:  # fmt: skip
        """Stored values per entity key, in one round trip; (empty, True) when the store is down or does not
        answer before the request's deadline (see ``admission``)."""
        wanted: dict[EntityKey, list[str]] = {}
        for name, key in needs:
            names = wanted.setdefault(key, [])
            if name not in names:
                names.append(name)
        if not wanted:
            return {}, False
        keys = list(wanted)
        budget = remaining_s()
        if budget is not None and budget <= 0:
            metrics.SERVING_DEADLINE_EXCEEDED.labels(model=model.name).inc()
            return {}, True
        try:
            async with asyncio.timeout(budget):
                rows = await self.store.read_many([(e, i, wanted[(e, i)]) for e, i in keys])
        except DependencyUnavailable:
            return {}, True
        except TimeoutError:
            metrics.SERVING_DEADLINE_EXCEEDED.labels(model=model.name).inc()
            return {}, True
        return dict(zip(keys, rows, strict=True)), False

    @staticmethod
    def _row(model: LoadedModel, overrides: Mapping[str, Any], stored: Mapping[str, Any]) -> dict[str, float]:
        row: dict[str, float] = {}
        for name in model.features:
            value = as_float(overrides[name]) if name in overrides else None
            if value is None:
                value = as_float(stored.get(name))
            if value is None:
                value = model.defaults.get(name, 0.0)
            row[name] = value
        return row

    def _infer(self, model: LoadedModel, rows: list[dict[str, float]]) -> list[float]:
        x = np.array([list(r.values()) for r in rows], dtype=np.float32)
        started = time.perf_counter()
        scores = model.predict(x)
        metrics.INFERENCE_SECONDS.labels(model.name).observe(time.perf_counter() - started)
        return [float(s) if math.isfinite(s) else 0.0 for s in scores.tolist()]

    def _count(self, model: LoadedModel, n: int, degraded: bool) -> None:
        metrics.PREDICTIONS.labels(model.name, model.version).inc(n)
        if degraded:
            metrics.PREDICTIONS_DEGRADED.labels(model.name).inc(n)

    async def predict(self, name: str, entities: Mapping[str, str], overrides: Mapping[str, Any]) -> Scored:
        model = self.model(name)
        overrides = {k: v for k, v in overrides.items() if as_float(v) is not None}
        needs = self._needs(model, entities, overrides)
        by_key, degraded = await self._read(model, needs)
        stored = {n: by_key.get(key, {}).get(n) for n, key in needs}
        row = self._row(model, overrides, stored)
        [score] = self._infer(model, [row])
        pid = uuid.uuid4().hex
        self._count(model, 1, degraded)
        self.log.offer(PredictionLogged.model_construct(
            prediction_id=pid, model=model.name, version=model.version, entities=dict(entities),
            features=dict(row), score=score, degraded=degraded, ts=now_ms(), item_id=entities.get("item_id"),
        ))  # fmt: skip
        return Scored(pid, model.name, model.version, [score], degraded)

    async def recommend(self, name: str, user_id: str, candidates: Sequence[str], k: int
                        ) -> tuple[Scored, list[tuple[str, float]]]:  # fmt: skip
        """Score every candidate for ``user_id`` (one round trip, one ONNX call); the top ``k``, best first.

        Each returned item is logged as one prediction record sharing the response's prediction_id, with
        its own ``item_id``, features and score.
        """
        model = self.model(name)
        items = list(dict.fromkeys(candidates))
        per_item = [self._needs(model, {"user_id": user_id, "item_id": c}, {}) for c in items]
        by_key, degraded = await self._read(model, [n for needs in per_item for n in needs])
        rows = [self._row(model, {}, {n: by_key.get(key, {}).get(n) for n, key in needs}) for needs in per_item]
        scores = self._infer(model, rows) if rows else []
        order = sorted(range(len(items)), key=lambda i: -scores[i])[:k]
        pid = uuid.uuid4().hex
        self._count(model, len(items), degraded)
        ts = now_ms()
        for i in order:
            self.log.offer(PredictionLogged.model_construct(
                prediction_id=pid, model=model.name, version=model.version,
                entities={"user_id": user_id, "item_id": items[i]}, features=dict(rows[i]), score=scores[i],
                degraded=degraded, ts=ts, item_id=items[i],
            ))  # fmt: skip
        top = [(items[i], scores[i]) for i in order]
        return Scored(pid, model.name, model.version, [s for _, s in top], degraded), top
