"""The request path: features (one Redis round trip) -> one float32 matrix -> one ONNX call -> log.

Feature values come, in order of precedence, from the request, the online store, the model's declared
defaults, else 0.0. ``degraded`` is true only when the store could not be read (down, or slower than the
request's deadline); the answer is still given.

Everything that depends only on the model version (which entity supplies each input, the read plans, the
defaults row) is worked out once per loaded model (``_Inputs``), not per request.

Rollouts (``LiveModels.served[name].other`` set: a candidate in shadow or canary, or a guard). Both versions
score the same feature values: one read covers the union of their inputs (``_Pair.union``; the candidate may
order, add or drop inputs), each version's matrix is projected from it, and an input nobody supplied takes
that version's own declared default. Who answers:

- ``shadow``: live; ``canary``: the candidate for the users whose ``canary_point(rollout id, user)`` is below
  the share (user = entity ``user_id``, else the first entity value; a request without entities is drawn at
  random), live for the others; ``guard``: live (the version just promoted), the previous one in shadow.

The other version's score goes to the record's ``shadow`` (and ``SHADOW_PREDICTIONS``); the record's
``features`` are the answering version's inputs plus the other's inputs it lacks. Without a rollout the
request path is unchanged: one attribute test (``served.other is None``) more.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from rtml.core import metrics
from rtml.core.config import PlatformConfig
from rtml.core.errors import DependencyUnavailable, NotFound
from rtml.core.timeutil import now_ms
from rtml.core.values import as_float
from rtml.features.store import FeatureStore
from rtml.serving.inference.live import LiveModels, Served
from rtml.serving.inference.session import LoadedModel
from rtml.serving.predictlog import Logged, PredictionLog
from rtml.serving.registry import canary_point

Decoder = Callable[[bytes], Any]
# (entity, stored features to read, their columns, how to decode each raw value)
Source = tuple[str, tuple[str, ...], tuple[int, ...], tuple[Decoder, ...]]
Read = tuple[str, str, Sequence[str]]
Fill = tuple[Sequence[int], Sequence[Decoder]]
At = tuple[Source, int]  # a source and the position of its read
# recommend's plan: the shared row, the reads, the user's sources, each candidate's sources
ManyPlan = tuple[list[float], list[Read], list[At], list[list[At]]]


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


@dataclass(frozen=True, slots=True)
class _Side:
    """One version of a rollout pair: its inputs, its columns in the union row, its defaults."""

    inputs: _Inputs
    index: np.ndarray  # its input columns, as positions in the union row
    defaults: np.ndarray  # float64, its declared defaults (else 0.0) in its input order
    own: tuple[tuple[str, int], ...]  # inputs the OTHER version lacks: (name, its column here)
    shadow: Any  # SHADOW_PREDICTIONS child: its scores that were not returned

    def matrix(self, union: np.ndarray) -> np.ndarray:
        """Its float64 input matrix from the union rows; NaN (supplied by no one) -> its own default."""
        x = union[:, self.index]
        return np.where(np.isnan(x), self.defaults, x)


@dataclass(frozen=True, slots=True)
class _Pair:
    """What serving a rollout needs, worked out once per (live, other) pair of loaded versions."""

    live_model: LoadedModel
    other_model: LoadedModel
    union: _Inputs  # the union of both versions' inputs; template NaN = "not supplied"
    live: _Side
    other: _Side


class Predictor:
    def __init__(self, config: PlatformConfig, store: FeatureStore, live: LiveModels, log: PredictionLog) -> None:
        self.config = config
        self.store = store
        self.live = live
        self.log = log
        self._inputs: dict[str, _Inputs] = {}  # model name -> inputs of the version last seen
        self._pairs: dict[str, _Pair] = {}  # model name -> the rollout pair last seen

    def model(self, name: str) -> LoadedModel:
        served = self.live.served.get(name)
        if served is None:
            self._missing(name)
        return served.live

    def _missing(self, name: str) -> NoReturn:
        if not self.live.registry_reachable:  # nothing loaded yet and Redis down: 503, not "no live version"
            raise DependencyUnavailable("redis", "the model registry cannot be read yet")
        if name not in self.live.known:
            raise NotFound(f"unknown model {name!r}")
        raise NotFound(f"model {name!r} has no live version (promote one: POST /v1/models/{name}/promote)")

    def inputs(self, model: LoadedModel) -> _Inputs:
        cached = self._inputs.get(model.name)
        if cached is not None and cached.model is model:
            return cached
        template = tuple(model.defaults.get(name, 0.0) for name in model.features)
        inputs = self._inputs[model.name] = self._build(model, model.features, template)
        return inputs

    def _build(self, model: LoadedModel, features: Sequence[str], template: tuple[float, ...]) -> _Inputs:
        column = {name: i for i, name in enumerate(features)}
        by_entity: dict[str, list[str]] = {}
        for name in features:
            fd = self.config.features.get(name)
            if fd is not None:  # an input the platform does not compute comes from the request or defaults
                by_entity.setdefault(fd.entity, []).append(name)
        sources = tuple(
            (e, tuple(names), tuple(column[n] for n in names), self.store.decoders(e, names))
            for e, names in by_entity.items()
        )
        return _Inputs(
            model, column, template, sources, metrics.PREDICTIONS.labels(model.name, model.version),
            metrics.PREDICTIONS_DEGRADED.labels(model.name), metrics.INFERENCE_SECONDS.labels(model.name),
        )  # fmt: skip

    def pair(self, served: Served) -> _Pair:
        """The rollout pair of ``served`` (which has ``other``), built once per pair of loaded versions."""
        live, other = served.live, served.other
        assert other is not None
        cached = self._pairs.get(live.name)
        if cached is not None and cached.live_model is live and cached.other_model is other:
            return cached
        features = list(live.features) + [f for f in other.features if f not in live.features]
        union = self._build(live, features, tuple(math.nan for _ in features))
        sides = []
        for me, them in ((live, other), (other, live)):
            own = self.inputs(me) if me is live else self._build(
                me, me.features, tuple(me.defaults.get(f, 0.0) for f in me.features)
            )  # fmt: skip
            sides.append(_Side(
                own, np.array([union.column[f] for f in me.features], dtype=np.intp),
                np.array(own.template, dtype=np.float64),
                tuple((f, i) for i, f in enumerate(me.features) if f not in them.features),
                metrics.SHADOW_PREDICTIONS.labels(me.name, me.version),
            ))  # fmt: skip
        pair = self._pairs[live.name] = _Pair(live, other, union, sides[0], sides[1])
        return pair

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

    def _plan(self, inputs: _Inputs, entities: Mapping[str, str], overrides: Mapping[str, Any]
              ) -> tuple[list[float], list[Read], list[Fill]]:  # fmt: skip
        """One request's row (template + request overrides) and the reads that fill the rest."""
        row = list(inputs.template)
        given: set[str] = set()
        for key, value in overrides.items():
            col = inputs.column.get(key)
            x = None if col is None else as_float(value)
            if x is not None:
                row[col] = x  # type: ignore[index]
                given.add(key)
        reads: list[Read] = []
        fills: list[Fill] = []
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
        return row, reads, fills

    async def predict(self, name: str, entities: Mapping[str, str], overrides: Mapping[str, Any],
                      deadline: float | None = None) -> Scored:  # fmt: skip
        served = self.live.served.get(name)
        if served is None:
            self._missing(name)
        if served.other is not None:
            return await self._predict_rollout(served, entities, overrides, deadline)
        model = served.live
        inputs = self.inputs(model)
        row, reads, fills = self._plan(inputs, entities, overrides)
        raw, degraded = await self._read(model, reads, deadline)
        for (cols, decs), flat in zip(fills, raw, strict=True):
            self._fill(row, cols, decs, flat)
        [score] = self._infer(inputs, [row])
        pid = os.urandom(16).hex()
        self._count(inputs, 1, degraded)
        self.log.offer(Logged(pid, model, entities, row, score, degraded, now_ms(), entities.get("item_id")))
        return Scored(pid, model.name, model.version, [score], degraded)

    def _plan_many(self, inputs: _Inputs, user_id: str, items: list[str]) -> ManyPlan:
        """Recommend's reads: the user's features once, each candidate's item and pair features."""
        user = {"user_id": user_id}
        shared = list(inputs.template)  # what does not depend on the item: read once
        reads: list[Read] = []
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
        return shared, reads, per_user, item_reads

    def _rows_many(self, shared: list[float], per_user: list[At], item_reads: list[list[At]], raw: list[list[Any]]
                   ) -> list[list[float]]:  # fmt: skip
        for src, at in per_user:
            self._fill(shared, src[2], src[3], raw[at])
        rows: list[list[float]] = []
        for mine in item_reads:
            row = shared.copy()
            for src, at in mine:
                self._fill(row, src[2], src[3], raw[at])
            rows.append(row)
        return rows

    async def recommend(self, name: str, user_id: str, candidates: Sequence[str], k: int,
                        deadline: float | None = None) -> tuple[Scored, list[tuple[str, float]]]:  # fmt: skip
        """Score every candidate for ``user_id`` (one round trip, one ONNX call); the top ``k``, best first.

        Each returned item is logged as one prediction record sharing the response's prediction_id, with
        its own ``item_id``, features and score.
        """
        served = self.live.served.get(name)
        if served is None:
            self._missing(name)
        items = list(dict.fromkeys(candidates))
        if served.other is not None:
            return await self._recommend_rollout(served, user_id, items, k, deadline)
        model = served.live
        inputs = self.inputs(model)
        shared, reads, per_user, item_reads = self._plan_many(inputs, user_id, items)
        raw, degraded = await self._read(model, reads, deadline)
        rows = self._rows_many(shared, per_user, item_reads, raw)
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

    # -- rollouts ---------------------------------------------------------------------------------------------
    @staticmethod
    def _candidate_answers(served: Served, user: str | None) -> bool:
        """Whether the rollout's other version answers this user (canary only; sticky per user and rollout)."""
        if served.stage != "canary":
            return False
        if user is None:  # nothing to be sticky on: the request as a whole is drawn
            return random.random() < served.share  # noqa: S311  # a traffic split, not a secret
        return canary_point(served.rollout_id, user) < served.share

    @staticmethod
    def _score(side: _Side, x: np.ndarray) -> list[float]:
        started = time.perf_counter()
        scores = side.inputs.model.predict(x.astype(np.float32))
        side.inputs.inference_seconds.observe(time.perf_counter() - started)
        return [s if math.isfinite(s) else 0.0 for s in scores.tolist()]

    def _both(self, pair: _Pair, rows: list[list[float]], candidate: bool
              ) -> tuple[_Side, np.ndarray, list[float], _Side, np.ndarray, list[float]]:  # fmt: skip
        """(answering side, its inputs, its scores, other side, its inputs, its scores) for the union rows."""
        union = np.array(rows, dtype=np.float64)
        lx, ox = pair.live.matrix(union), pair.other.matrix(union)
        ls, os_ = self._score(pair.live, lx), self._score(pair.other, ox)
        if candidate:
            return pair.other, ox, os_, pair.live, lx, ls
        return pair.live, lx, ls, pair.other, ox, os_

    async def _predict_rollout(self, served: Served, entities: Mapping[str, str], overrides: Mapping[str, Any],
                               deadline: float | None) -> Scored:  # fmt: skip
        pair = self.pair(served)
        row, reads, fills = self._plan(pair.union, entities, overrides)
        raw, degraded = await self._read(served.live, reads, deadline)
        for (cols, decs), flat in zip(fills, raw, strict=True):
            self._fill(row, cols, decs, flat)
        user = entities.get("user_id") or next(iter(entities.values()), None)
        a, ax, [score], b, bx, [shadow] = self._both(pair, [row], self._candidate_answers(served, user))
        model = a.inputs.model
        pid = os.urandom(16).hex()
        self._count(a.inputs, 1, degraded)
        b.shadow.inc()
        extra = {f: float(bx[0, j]) for f, j in b.own} if b.own else None
        self.log.offer(Logged(pid, model, entities, ax[0].tolist(), score, degraded, now_ms(), entities.get("item_id"),
                              {b.inputs.model.version: shadow}, extra))  # fmt: skip
        return Scored(pid, model.name, model.version, [score], degraded)

    async def _recommend_rollout(self, served: Served, user_id: str, items: list[str], k: int,
                                 deadline: float | None) -> tuple[Scored, list[tuple[str, float]]]:  # fmt: skip
        """As ``recommend``, ranked by the answering version; every shown item logs both versions' scores."""
        pair = self.pair(served)
        shared, reads, per_user, item_reads = self._plan_many(pair.union, user_id, items)
        raw, degraded = await self._read(served.live, reads, deadline)
        rows = self._rows_many(shared, per_user, item_reads, raw)
        a, ax, scores, b, bx, shadows = self._both(pair, rows, self._candidate_answers(served, user_id))
        model, other = a.inputs.model, b.inputs.model.version
        order = sorted(range(len(items)), key=lambda i: -scores[i])[:k]
        pid = os.urandom(16).hex()
        self._count(a.inputs, len(items), degraded)
        b.shadow.inc(len(items))
        ts = now_ms()
        for i in order:
            extra = {f: float(bx[i, j]) for f, j in b.own} if b.own else None
            self.log.offer(Logged(pid, model, {"user_id": user_id, "item_id": items[i]}, ax[i].tolist(), scores[i],
                                  degraded, ts, items[i], {other: shadows[i]}, extra))  # fmt: skip
        top = [(items[i], scores[i]) for i in order]
        return Scored(pid, model.name, model.version, [s for _, s in top], degraded), top
