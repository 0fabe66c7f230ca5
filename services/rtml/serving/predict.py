"""The request path: features (one Redis round trip) -> one float32 matrix -> one ONNX call -> log.

Feature values come, in order of precedence, from the request, the online store, the model's declared
defaults, else 0.0. ``degraded`` is true only when the store could not be read (down, or slower than the
request's deadline); the answer is still given.

Everything that depends only on the model version (which entity supplies each input, the read plans, the
defaults row) is worked out once per loaded model (``_Inputs``), not per request.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rtml.core import metrics
from rtml.core.config import PlatformConfig
from rtml.core.errors import DependencyUnavailable, NotFound
from rtml.core.timeutil import now_ms
from rtml.core.values import as_float
from rtml.features.store import FeatureStore
from rtml.serving.inference.live import LiveModels
from rtml.serving.inference.session import LoadedModel
from rtml.serving.predictlog import Logged, PredictionLog

Decoder = Callable[[bytes], Any]
# (entity, stored features to read, their columns, how to decode each raw value)
Source = tuple[str, tuple[str, ...], tuple[int, ...], tuple[Decoder, ...]]


@dataclass(frozen=True, slots=True)
class Scored:
    prediction_id: str
    model: str
    version: str
    scores: list[float]
    degraded: bool


@dataclass(frozen=True, slots=True)
class _Inputs:
    """Where each input column of one model version comes from."""

    model: LoadedModel
    column: dict[str, int]  # feature -> column
    template: tuple[float, ...]  # declared defaults, else 0.0, in column order
    sources: tuple[Source, ...]  # stored features grouped by the entity that holds them
    predictions: Any  # its metric children, bound once
    degraded: Any
    inference_seconds: Any


class Predictor:
    def __init__(self, config: PlatformConfig, store: FeatureStore, live: LiveModels, log: PredictionLog) -> None:
        self.config = config
        self.store = store
        self.live = live
        self.log = log
        self._inputs: dict[str, _Inputs] = {}  # model name -> inputs of the version last seen

    def model(self, name: str) -> LoadedModel:
        model = self.live.get(name)
        if model is not None:
            return model
        if not self.live.registry_reachable:  # nothing loaded yet and Redis down: 503, not "no live version"
            raise DependencyUnavailable("redis", "the model registry cannot be read yet")
        if name not in self.live.known:
            raise NotFound(f"unknown model {name!r}")
        raise NotFound(f"model {name!r} has no live version (promote one: POST /v1/models/{name}/promote)")

    def inputs(self, model: LoadedModel) -> _Inputs:
        cached = self._inputs.get(model.name)
        if cached is not None and cached.model is model:
            return cached
        column = {name: i for i, name in enumerate(model.features)}
        by_entity: dict[str, list[str]] = {}
        for name in model.features:
            fd = self.config.features.get(name)
            if fd is not None:  # an input the platform does not compute comes from the request or defaults
                by_entity.setdefault(fd.entity, []).append(name)
        sources = tuple(
            (e, tuple(names), tuple(column[n] for n in names), self.store.decoders(e, names))
            for e, names in by_entity.items()
        )
        template = tuple(model.defaults.get(name, 0.0) for name in model.features)
        inputs = self._inputs[model.name] = _Inputs(
            model, column, template, sources, metrics.PREDICTIONS.labels(model.name, model.version),
            metrics.PREDICTIONS_DEGRADED.labels(model.name), metrics.INFERENCE_SECONDS.labels(model.name),
        )  # fmt: skip
        return inputs

    async def _read(self, model: LoadedModel, requests: list[tuple[str, str, Sequence[str]]], deadline: float | None
                    ) -> tuple[list[list[Any]], bool]:  # fmt: skip
        """Raw stored values per request, in one round trip; (empty rows, True) when the store is down or
        does not answer before ``deadline`` (loop time)."""
        if not requests:
            return [], False
        try:
            if deadline is None:
                return await self.store.read_raw(requests, updated_at=False), False
            budget = deadline - asyncio.get_running_loop().time()
            if budget <= 0:
                raise TimeoutError
            async with asyncio.timeout(budget):
                return await self.store.read_raw(requests, updated_at=False), False
        except DependencyUnavailable:
            return [[] for _ in requests], True
        except TimeoutError:
            metrics.SERVING_DEADLINE_EXCEEDED.labels(model=model.name).inc()
            return [[] for _ in requests], True

    @staticmethod
    def _fill(row: list[float], columns: Sequence[int], decoders: Sequence[Decoder], flat: list[Any]) -> None:
        """Put one entity's stored values (raw, as read) into their columns; missing ones keep the default."""
        for col, dec, raw in zip(columns, decoders, flat, strict=False):  # flat is empty when degraded
            if raw is not None:
                value = as_float(dec(raw))
                if value is not None:
                    row[col] = value

    @staticmethod
    def _infer(inputs: _Inputs, rows: list[list[float]]) -> list[float]:
        x = np.array(rows, dtype=np.float32)
        started = time.perf_counter()
        scores = inputs.model.predict(x)
        inputs.inference_seconds.observe(time.perf_counter() - started)
        return [s if math.isfinite(s) else 0.0 for s in scores.tolist()]

    @staticmethod
    def _count(inputs: _Inputs, n: int, degraded: bool) -> None:
        inputs.predictions.inc(n)
        if degraded:
            inputs.degraded.inc(n)

    async def predict(self, name: str, entities: Mapping[str, str], overrides: Mapping[str, Any],
                      deadline: float | None = None) -> Scored:  # fmt: skip
        model = self.model(name)
        inputs = self.inputs(model)
        row = list(inputs.template)
        given: set[str] = set()
        for key, value in overrides.items():
            col = inputs.column.get(key)
            x = None if col is None else as_float(value)
            if x is not None:
                row[col] = x  # type: ignore[index]
                given.add(key)
        reads: list[tuple[str, str, Sequence[str]]] = []
        fills: list[tuple[Sequence[int], Sequence[Decoder]]] = []
        for entity, names, columns, decoders in inputs.sources:
            entity_id = self.config.entity_id(entity, entities)
            if entity_id is None:
                continue
            if given:
                keep = [i for i, n in enumerate(names) if n not in given]
                if not keep:
                    continue
                if len(keep) < len(names):
                    names = tuple(names[i] for i in keep)
                    columns = tuple(columns[i] for i in keep)
                    decoders = tuple(decoders[i] for i in keep)
            reads.append((entity, entity_id, names))
            fills.append((columns, decoders))
        raw, degraded = await self._read(model, reads, deadline)
        for (cols, decs), flat in zip(fills, raw, strict=True):
            self._fill(row, cols, decs, flat)
        [score] = self._infer(inputs, [row])
        pid = os.urandom(16).hex()
        self._count(inputs, 1, degraded)
        self.log.offer(Logged(pid, model, entities, row, score, degraded, now_ms(), entities.get("item_id")))
        return Scored(pid, model.name, model.version, [score], degraded)

    async def recommend(self, name: str, user_id: str, candidates: Sequence[str], k: int,
                        deadline: float | None = None) -> tuple[Scored, list[tuple[str, float]]]:  # fmt: skip
        """Score every candidate for ``user_id`` (one round trip, one ONNX call); the top ``k``, best first.

        Each returned item is logged as one prediction record sharing the response's prediction_id, with
        its own ``item_id``, features and score.
        """
        model = self.model(name)
        inputs = self.inputs(model)
        items = list(dict.fromkeys(candidates))
        user = {"user_id": user_id}
        shared = list(inputs.template)  # what does not depend on the item: read once
        reads: list[tuple[str, str, Sequence[str]]] = []
        per_user: list[tuple[Source, int]] = []
        per_item: list[Source] = []
        for src in inputs.sources:
            entity_id = self.config.entity_id(src[0], user)
            if entity_id is not None:
                per_user.append((src, len(reads)))
                reads.append((src[0], entity_id, src[1]))
            else:
                per_item.append(src)
        # item and pair entities: their ids from (user_id, item_id) as config.entity_id joins them, without a
        # dict per candidate; an entity keyed by anything else is not known for a candidate
        keyed = [(src, self.config.entities[src[0]].key_fields) for src in per_item]
        keyed = [(src, fields) for src, fields in keyed if set(fields) <= {"user_id", "item_id"}]
        item_reads: list[list[tuple[Source, int]]] = []  # per item: (source, position in reads)
        for item in items:
            mine = []
            for src, fields in keyed:
                entity_id = item if fields == ("item_id",) else "|".join(
                    user_id if f == "user_id" else item for f in fields
                )  # fmt: skip
                mine.append((src, len(reads)))
                reads.append((src[0], entity_id, src[1]))
            item_reads.append(mine)
        raw, degraded = await self._read(model, reads, deadline)
        for src, at in per_user:
            self._fill(shared, src[2], src[3], raw[at])
        rows: list[list[float]] = []
        for mine in item_reads:
            row = shared.copy()
            for src, at in mine:
                self._fill(row, src[2], src[3], raw[at])
            rows.append(row)
        scores = self._infer(inputs, rows) if rows else []
        order = sorted(range(len(items)), key=lambda i: -scores[i])[:k]
        pid = os.urandom(16).hex()
        self._count(inputs, len(items), degraded)
        ts = now_ms()
        for i in order:
            self.log.offer(Logged(pid, model, {"user_id": user_id, "item_id": items[i]}, rows[i], scores[i], degraded,
                                  ts, items[i]))  # fmt: skip
        top = [(items[i], scores[i]) for i in order]
        return Scored(pid, model.name, model.version, [s for _, s in top], degraded), top
