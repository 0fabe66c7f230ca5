"""The online feature store: applies planned updates and reads features, each in one Redis round trip.

Layout (per entity, all keys in the entity's hash slot):
- ``{entity:id}:f:<feature>`` a hash of tiles -> partial aggregate (field names in apply.lua), TTL of the
  window plus the future-timestamp allowance; tiles that slid out are pruned once per tile advance;
- ``{entity:id}:seen`` a sorted set event_id -> arrival time, trimmed to the dedup horizon.

Every event is applied to each entity at most once (the seen-set check and the tile updates happen in the
same Lua call), so redelivered Kafka records and duplicate event_ids never double-count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from redis.exceptions import NoScriptError

from rtml.core import metrics
from rtml.core.config import FeatureDef, PlatformConfig
from rtml.core.errors import InvalidInput, NotFound
from rtml.core.redis import Keys, Redis, guarded
from rtml.core.schemas import Event
from rtml.core.timeutil import now_ms
from rtml.features.plan import EntityPlan, plan_batch
from rtml.features.windows import tile_range

FeatureValue = float | int | str | bool | None
Call = tuple[str, list[str], list[Any]]  # ("apply" | "read", KEYS, ARGV)
_KIND = {"count": "c", "sum": "s", "mean": "m", "min": "n", "max": "x", "last": "l",
         "distinct_count": "d", "ratio": "r"}  # fmt: skip


def kind_of(f: FeatureDef) -> str:
    """The one-letter aggregation kind the Lua scripts dispatch on."""
    return "h" if f.approx else _KIND[f.agg]


def _script(name: str) -> str:
    return resources.files("rtml.features").joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class FeatureRow:
    values: dict[str, FeatureValue]
    updated_at: int | None  # epoch ms of the last update of any of these features; None if never


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int
    duplicates: int
    late: int


class FeatureStore:
    """Apply and read windowed features. ``max_future_ms`` keeps future-dated tiles alive long enough."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        config: PlatformConfig,
        *,
        dedup_horizon_ms: int = 24 * 3600 * 1000,
        max_future_ms: int = 300_000,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self.dedup_horizon_ms = max(dedup_horizon_ms, config.longest_window_ms)
        self.max_future_ms = max_future_ms
        self._apply_src = _script("apply.lua")
        self._read_src = _script("read.lua")
        self._apply_sha: str | None = None
        self._read_sha: str | None = None

    async def load_scripts(self) -> None:
        self._apply_sha = await guarded(self.redis.script_load(self._apply_src), "SCRIPT LOAD")
        self._read_sha = await guarded(self.redis.script_load(self._read_src), "SCRIPT LOAD")

    # -- write path ---------------------------------------------------------------------------------
    def _apply_call(self, ep: EntityPlan, now: int) -> tuple[list[str], list[Any]]:
        keys = [self.keys.seen(ep.entity, ep.entity_id)]
        args: list[Any] = [now, self.dedup_horizon_ms, len(ep.features)]
        index = {}
        for i, name in enumerate(ep.features):
            f = self.config.features[name]
            keys.append(self.keys.feature(ep.entity, ep.entity_id, name))
            index[name] = str(i + 1)
            if f.lifetime:
                args += [0, 0, kind_of(f)]
            else:
                args += [f.window_ms + f.tile_ms + self.max_future_ms, tile_range(now, f)[0], kind_of(f)]
        args.append(len(ep.events))
        for event_id, ops in ep.events:
            args += [event_id, len(ops)]
            for kind, name, tile, a, b in ops:
                args += [kind, index[name], tile, a, b]
        return keys, args

    async def apply(self, events: list[Event], now: int | None = None) -> ApplyResult:
        """Apply a micro-batch of events, each at most once per entity. One round trip."""
        now = now_ms() if now is None else now
        plan = plan_batch(events, self.config, now)
        for name, n in plan.late.items():
            metrics.FEATURE_EVENTS_LATE.labels(feature=name).inc(n)
        late = sum(plan.late.values())
        if not plan.entities:
            return ApplyResult(0, 0, late)
        calls = [self._apply_call(ep, now) for ep in plan.entities.values()]
        with metrics.REDIS_SECONDS.labels(op="apply").time():
            results = await self._evalsha_many("apply", calls)
        applied = dups = 0
        for ep, (a, d) in zip(plan.entities.values(), results, strict=True):
            applied += int(a)
            dups += int(d)
            metrics.FEATURE_EVENTS_APPLIED.labels(entity=ep.entity).inc(int(a))
            if d:
                metrics.FEATURE_EVENTS_DUPLICATE.labels(entity=ep.entity).inc(int(d))
        done = now_ms()
        for e in events:  # accept -> applied, and event time -> applied (clamped: ts may be in the future)
            metrics.FEATURE_FRESHNESS_SECONDS.observe(max(0, done - e.received_at) / 1000)
            metrics.FEATURE_EVENT_LAG_SECONDS.observe(max(0, done - e.ts) / 1000)
        return ApplyResult(applied, dups, late)

    # -- read path ----------------------------------------------------------------------------------
    def resolve(self, entity: str, names: Sequence[str] | None) -> list[tuple[str, FeatureDef]]:
        if entity not in self.config.entities:
            raise NotFound(f"unknown entity {entity!r}")
        own = self.config.features_of(entity)
        if names is None:
            return list(own.items())
        unknown = [n for n in names if n not in own]
        if unknown:
            raise InvalidInput(f"unknown feature(s) of entity {entity!r}: {', '.join(unknown)}")
        return [(n, own[n]) for n in names]

    def _read_call(self, entity: str, entity_id: str, feats: list[tuple[str, FeatureDef]], as_of: int
                   ) -> tuple[list[str], list[Any]]:  # fmt: skip
        keys = [self.keys.feature(entity, entity_id, n) for n, _ in feats]
        args: list[Any] = [as_of]
        for _, f in feats:
            args += [kind_of(f), f.tile_ms or 1, f.n_tiles]
        return keys, args

    async def read_many(
        self, requests: Sequence[tuple[str, str, Sequence[str] | None]], as_of: int | None = None
    ) -> list[dict[str, FeatureValue]]:
        """Features of several entities at ``as_of`` (default now), in ONE Redis round trip."""
        return [row.values for row in await self.read_rows(requests, as_of)]

    async def read_rows(
        self, requests: Sequence[tuple[str, str, Sequence[str] | None]], as_of: int | None = None
    ) -> list[FeatureRow]:
        """Like ``read_many``, with when each entity's features last changed (freshness)."""
        as_of = now_ms() if as_of is None else as_of
        resolved = [self.resolve(entity, names) for entity, _, names in requests]
        calls = [
            self._read_call(entity, entity_id, feats, as_of)
            for (entity, entity_id, _), feats in zip(requests, resolved, strict=True)
            if feats
        ]
        with metrics.REDIS_SECONDS.labels(op="read").time():
            raw = await self._evalsha_many("read", calls) if calls else []
        out: list[FeatureRow] = []
        it = iter(raw)
        for (entity, _, names), feats in zip(requests, resolved, strict=True):
            out.append(self.decode_row(entity, names, next(it) if feats else []))
        return out

    async def _evalsha_many(self, which: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        return await self.run_calls([(which, keys, args) for keys, args in calls])

    async def run_calls(self, calls: list[Call]) -> list[Any]:
        """Run apply/read calls in order in ONE pipeline (Redis runs them in that order, so a read placed
        after an apply sees it); reload the scripts once if Redis lost them (a restart)."""
        for attempt in (0, 1):
            if self._apply_sha is None or self._read_sha is None:
                await self.load_scripts()
            shas = {"apply": self._apply_sha, "read": self._read_sha}

            async def go(shas: dict[str, str | None] = shas) -> list[Any]:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for which, keys, args in calls:
                        pipe.evalsha(shas[which], len(keys), *keys, *args)  # type: ignore[arg-type]
                    return list(await pipe.execute())

            try:
                return await guarded(go(), "feature store call")
            except NoScriptError:
                if attempt:
                    raise
                self._apply_sha = self._read_sha = None
        raise AssertionError("unreachable")

    # -- building blocks for replays (backfill) --------------------------------------------------------
    def apply_calls(self, events: list[Event], now: int) -> list[Call]:
        plan = plan_batch(events, self.config, now)
        return [("apply", *self._apply_call(ep, now)) for ep in plan.entities.values()]

    def read_call(self, entity: str, entity_id: str, names: Sequence[str] | None, as_of: int) -> Call:
        return ("read", *self._read_call(entity, entity_id, self.resolve(entity, names), as_of))

    def decode_row(self, entity: str, names: Sequence[str] | None, flat: list[Any]) -> FeatureRow:
        feats = self.resolve(entity, names)
        values = {name: _decode(f, flat[2 * i]) for i, (name, f) in enumerate(feats)}
        stamps = [int(u) for u in flat[1::2] if u is not None]
        return FeatureRow(values, max(stamps) if stamps else None)


def _decode(f: FeatureDef, raw: Any) -> FeatureValue:
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if f.agg == "last":
        value: FeatureValue = orjson.loads(text)
        return value
    if f.agg in ("count", "distinct_count"):
        return int(float(text))
    return float(text)
