"""The online feature store: applies planned updates and reads features, each in one Redis round trip.

Layout (per entity, all keys in the entity's hash slot):
- ``{entity:id}:f:<feature>`` a hash of tiles -> partial aggregate (field names in apply.lua) and ``_p``, the
  oldest tile kept; TTL of the window plus two tiles plus the future-timestamp allowance, renewed and
  pruned once per tile advance;
- ``{entity:id}:seen`` a sorted set event_id -> arrival time, trimmed to the dedup horizon once a minute;
- ``{entity:id}:u`` when the entity last changed.

Every event is applied to each entity at most once (the seen-set check and the tile updates happen in the
same Lua call), so redelivered Kafka records and duplicate event_ids never double-count. The events of one
batch are folded per (feature, tile) before they reach Redis: a busy entity costs a handful of Redis
commands per batch instead of a few per event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.crc import key_slot

from rtml.core import metrics
from rtml.core.config import FeatureDef, PlatformConfig
from rtml.core.errors import InvalidInput, NotFound
from rtml.core.redis import ClusterResp, Keys, Redis, Scripts, script_source
from rtml.core.schemas import Event
from rtml.core.timeutil import now_ms
from rtml.features.plan import EntityPlan, Plan, Planner, encode_ops, plan_batch
from rtml.features.windows import tile_range

FeatureValue = float | int | str | bool | None
Call = tuple[str, list[str], list[Any]]  # ("apply" | "read", KEYS, ARGV)
_READ_SECONDS = metrics.REDIS_SECONDS.labels(op="read")
_TRIM_MS = 60_000  # the dedup seen-set is trimmed once a minute per entity: it holds horizon + <= 1 min
_KIND = {"count": "c", "sum": "s", "mean": "m", "min": "n", "max": "x", "last": "l",
         "distinct_count": "d", "ratio": "r"}  # fmt: skip


def kind_of(f: FeatureDef) -> str:
    """The one-letter aggregation kind the Lua scripts dispatch on."""
    return "h" if f.approx else _KIND[f.agg]


@dataclass(frozen=True, slots=True)
class _ReadPlan:
    feats: tuple[tuple[str, FeatureDef], ...]
    spec: bytes
    decoders: tuple[Callable[[bytes], FeatureValue], ...]  # one per feature, in ``feats`` order


@dataclass(frozen=True, slots=True)
class FeatureRow:
    values: dict[str, FeatureValue]
    updated_at: int | None  # epoch ms of the last change to the entity (within the dedup horizon); None if none


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
        cluster: bool = False,
        apply_chunk: int = 200,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self.dedup_horizon_ms = max(dedup_horizon_ms, config.longest_window_ms)
        self.max_future_ms = max_future_ms
        self.apply_chunk = apply_chunk
        self._planner = Planner(config)
        sources = {name: script_source("rtml.features", f"lua/{name}.lua") for name in ("apply", "read")}
        self.scripts = Scripts(redis, sources)
        # a cluster client (RTML_REDIS_CLUSTER) always groups by slot, whatever the caller passed
        self.cluster = cluster or isinstance(self.scripts.resp, ClusterResp)
        self._plans: dict[tuple[str, tuple[str, ...] | None], _ReadPlan] = {}

    async def aclose(self) -> None:
        await self.scripts.aclose()

    async def warm_up(self) -> None:
        """Scripts loaded and read connections open before the first read (``Scripts.warm_up``)."""
        await self.scripts.warm_up()

    # -- write path ---------------------------------------------------------------------------------
    def _apply_groups(self, plan: Plan, now: int, *, per_event: bool = False
                      ) -> list[tuple[Call, list[EntityPlan]]]:  # fmt: skip
        """Few, fat calls: up to ``apply_chunk`` entities per Lua call; on a cluster only entities of one slot
        share a call (all keys of a call must live on one node). ``per_event``: ops event by event (mode 1 of
        apply.lua, never answers "resend"); otherwise folded per (feature, tile) (mode 0)."""
        groups: dict[int, list[EntityPlan]] = {}
        for ep in plan.entities.values():
            slot = key_slot(self.keys.seen(ep.entity, ep.entity_id).encode()) if self.cluster else 0
            groups.setdefault(slot, []).append(ep)
        out: list[tuple[Call, list[EntityPlan]]] = []
        for eps in groups.values():
            for start in range(0, len(eps), self.apply_chunk):
                chunk = eps[start : start + self.apply_chunk]
                fid: dict[str, int] = {}
                feats: list[Any] = []
                ents: list[Any] = []  # flat, as apply.lua reads it
                for ep in chunk:
                    for op in ep.ops.values():
                        if op[1] not in fid:
                            fid[op[1]] = len(fid) + 1
                            feats += self._feat_spec(op[1], now, plan.min_tile)
                    ents += (self.keys.entity(ep.entity, ep.entity_id), len(ep.events))
                    ents += [e.event_id for e in ep.events]
                    if per_event:
                        ents.append(1)
                        for e in ep.events:  # the specification planner, one event at a time (rare path)
                            one = plan_batch([e], self.config, now).entities[(ep.entity, ep.entity_id)]
                            encode_ops(one.ops, fid, ents)
                    else:
                        ents.append(0)
                        encode_ops(ep.ops, fid, ents)
                doc = [now, self.dedup_horizon_ms, _TRIM_MS, len(fid), *feats, *ents]
                keys = [self.keys.seen(ep.entity, ep.entity_id) for ep in chunk]
                out.append((("apply", keys, [orjson.dumps(doc)]), chunk))
        return out

    def _feat_spec(self, name: str, now: int, min_tile: dict[str, int]) -> list[Any]:
        """apply.lua's entry for a feature: [name, ttl_ms (0 = lifetime), oldest tile read, kind, tile_ms]."""
        f = self.config.features[name]
        if f.lifetime:
            return [name, 0, 0, kind_of(f), 0]
        oldest = min_tile[name] if name in min_tile else tile_range(now, f)[0]
        return [name, f.window_ms + f.tile_ms + self.max_future_ms, oldest, kind_of(f), f.tile_ms]

    async def apply(self, events: list[Event], now: int | None = None) -> ApplyResult:
        """Apply a micro-batch of events, each at most once per entity. One round trip (two when an entity
        mixes new events with already-applied ones, as after a crash mid-batch)."""
        now = now_ms() if now is None else now
        plan = self._planner.plan(events, now)
        for name, n in plan.late.items():
            metrics.FEATURE_EVENTS_LATE.labels(feature=name).inc(n)
        late = sum(plan.late.values())
        if not plan.entities:
            return ApplyResult(0, 0, late)
        applied: Counter[str] = Counter()
        dups: Counter[str] = Counter()
        for ep in plan.entities.values():
            if ep.duplicates:
                dups[ep.entity] += ep.duplicates
        groups = self._apply_groups(plan, now)
        with metrics.REDIS_SECONDS.labels(op="apply").time():
            results = await self.run_calls([call for call, _ in groups])
        resend = Plan(min_tile=plan.min_tile)
        for (_, eps), flat in zip(groups, results, strict=True):
            for n, ep in enumerate(eps):
                a, d = int(flat[2 * n]), int(flat[2 * n + 1])
                if a < 0:
                    resend.entities[(ep.entity, ep.entity_id)] = ep
                    continue
                applied[ep.entity] += a
                dups[ep.entity] += d
        if resend.entities:
            groups = self._apply_groups(resend, now, per_event=True)
            with metrics.REDIS_SECONDS.labels(op="apply").time():
                results = await self.run_calls([call for call, _ in groups])
            for (_, eps), flat in zip(groups, results, strict=True):
                for n, ep in enumerate(eps):
                    applied[ep.entity] += int(flat[2 * n])
                    dups[ep.entity] += int(flat[2 * n + 1])
        for entity, n in applied.items():
            metrics.FEATURE_EVENTS_APPLIED.labels(entity=entity).inc(n)
        for entity, n in dups.items():
            metrics.FEATURE_EVENTS_DUPLICATE.labels(entity=entity).inc(n)
        done = now_ms()
        # accept -> applied, and event time -> applied (clamped: ts may be in the future)
        metrics.observe_many(metrics.FEATURE_FRESHNESS_SECONDS, [max(0, done - e.received_at) / 1000 for e in events])
        metrics.observe_many(metrics.FEATURE_EVENT_LAG_SECONDS, [max(0, done - e.ts) / 1000 for e in events])
        return ApplyResult(sum(applied.values()), sum(dups.values()), late)

    # -- read path ----------------------------------------------------------------------------------
    def resolve(self, entity: str, names: Sequence[str] | None) -> list[tuple[str, FeatureDef]]:
        return list(self._read_plan(entity, names).feats)

    def _read_plan(self, entity: str, names: Sequence[str] | None) -> _ReadPlan:
        """Validated features, Lua spec and decoders for (entity, names); cached (the hot path)."""
        cache_key = (entity, None if names is None else tuple(names))
        plan = self._plans.get(cache_key)
        if plan is not None:
            return plan
        if entity not in self.config.entities:
            raise NotFound(f"unknown entity {entity!r}")
        own = self.config.features_of(entity)
        if names is None:
            feats = tuple(own.items())
        else:
            unknown = [n for n in names if n not in own]
            if unknown:
                raise InvalidInput(f"unknown feature(s) of entity {entity!r}: {', '.join(unknown)}")
            feats = tuple((n, own[n]) for n in names)
        spec = orjson.dumps([[n, kind_of(f), f.tile_ms or 1, f.n_tiles] for n, f in feats])
        plan = _ReadPlan(feats, spec, tuple(_decoder(f) for _, f in feats))
        if len(self._plans) < 4096:  # bounded: names come from callers
            self._plans[cache_key] = plan
        return plan

    async def read_many(
        self, requests: Sequence[tuple[str, str, Sequence[str] | None]], as_of: int | None = None
    ) -> list[dict[str, FeatureValue]]:
        """Features of several entities at ``as_of`` (default now), in ONE Redis round trip."""
        return [row.values for row in await self.read_rows(requests, as_of)]

    async def read_rows(
        self, requests: Sequence[tuple[str, str, Sequence[str] | None]], as_of: int | None = None
    ) -> list[FeatureRow]:
        """Like ``read_many``, with when each entity's features last changed (freshness)."""
        raw = await self.read_raw(requests, as_of)
        return [self.decode_row(entity, names, flat) for (entity, _, names), flat in zip(requests, raw, strict=True)]

    async def read_raw(
        self,
        requests: Sequence[tuple[str, str, Sequence[str] | None]],
        as_of: int | None = None,
        *,
        updated_at: bool = True,
    ) -> list[list[Any]]:
        """Undecoded reads, one list per request: a raw value per feature (in the read plan's order), then
        (with ``updated_at``) when the entity last changed; empty for a request of no features. One Lua call
        reads every entity (on a cluster, one call per hash slot), all in one round trip."""
        as_of = now_ms() if as_of is None else as_of
        groups: dict[int, tuple[list[str], list[int], list[int]]] = {}  # slot -> keys, spec no., request no.
        specs: dict[bytes, int] = {}
        for n, (entity, entity_id, names) in enumerate(requests):
            plan = self._read_plan(entity, names)
            if not plan.feats:
                continue
            key = self.keys.entity(entity, entity_id)
            slot = key_slot(key.encode()) if self.cluster else 0
            group = groups.get(slot)
            if group is None:
                group = groups[slot] = ([], [], [])
            spec_no = specs.get(plan.spec)
            if spec_no is None:
                spec_no = specs[plan.spec] = len(specs) + 1
            group[0].append(key)
            group[1].append(spec_no)
            group[2].append(n)
        out: list[list[Any]] = [[] for _ in requests]
        if not groups:
            return out
        spec_doc = b"[" + b",".join(specs) + b"]"
        flag = b"1" if updated_at else b"0"
        calls: list[Call] = [
            ("read", keys, [as_of, spec_doc, orjson.dumps(nos), flag]) for keys, nos, _ in groups.values()
        ]
        with _READ_SECONDS.time():
            results = await self.run_calls(calls)
        for (_, _, positions), rows in zip(groups.values(), results, strict=True):
            for n, flat in zip(positions, rows, strict=True):
                out[n] = flat
        return out

    async def run_calls(self, calls: list[Call]) -> list[Any]:
        """Run apply/read calls in order in ONE round trip (Redis runs them in that order, so a read placed
        after an apply sees it)."""
        return await self.scripts.run(calls, "feature store call")

    # -- building blocks for replays (backfill) --------------------------------------------------------
    def apply_calls(self, events: list[Event], now: int) -> list[Call]:
        """Calls that apply ``events`` event by event (never answering "resend"), for pipelining with reads."""
        return [call for call, _ in self._apply_groups(self._planner.plan(events, now), now, per_event=True)]

    def read_call(self, entity: str, entity_id: str, names: Sequence[str] | None, as_of: int) -> Call:
        """A read of one entity for ``run_calls``; its result is ``[flat]`` (see ``read_raw``)."""
        spec = self._read_plan(entity, names).spec
        return ("read", [self.keys.entity(entity, entity_id)], [as_of, b"[" + spec + b"]", b"[1]"])

    def decoders(self, entity: str, names: Sequence[str] | None) -> tuple[Callable[[bytes], FeatureValue], ...]:
        """How to decode each raw value ``read_raw`` returns for (entity, names), in order."""
        return self._read_plan(entity, names).decoders

    def decode_row(self, entity: str, names: Sequence[str] | None, flat: list[Any]) -> FeatureRow:
        plan = self._read_plan(entity, names)
        if not flat:  # an entity asked for no features
            return FeatureRow({}, None)
        # flat = one raw value per feature, then when the entity last changed
        values = {
            name: (None if raw is None else dec(raw))
            for (name, _), dec, raw in zip(plan.feats, plan.decoders, flat[:-1], strict=True)
        }
        return FeatureRow(values, None if flat[-1] is None else int(flat[-1]))


def _as_int(raw: bytes) -> int:
    return int(float(raw))


def _decoder(f: FeatureDef) -> Callable[[bytes], FeatureValue]:
    """How a raw Lua reply becomes a value: JSON for last, int for counts, float otherwise."""
    if f.agg == "last":
        return orjson.loads
    if f.agg in ("count", "distinct_count"):
        return _as_int
    return float
