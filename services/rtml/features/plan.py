"""Turn a micro-batch of events into per-entity update plans (pure; no I/O).

Each plan lists, per event, the tile operations the apply script performs. Events too late for a
feature's window are left out and counted; an entity no feature touches gets no plan at all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import orjson

from rtml.core.config import FeatureDef, PlatformConfig
from rtml.core.schemas import Event
from rtml.features.windows import _distinct_key, is_late, tile_of, touches

# One tile operation: (kind, feature name, tile, a, b) -- see apply.lua for the kinds.
Op = tuple[str, str, str, str, str]


@dataclass(slots=True)
class EntityPlan:
    entity: str
    entity_id: str
    features: list[str] = field(default_factory=list)  # the feature keys this plan writes, in KEYS order
    events: list[tuple[str, list[Op]]] = field(default_factory=list)  # (event_id, ops)
    max_received_at: int = 0


@dataclass(slots=True)
class Plan:
    entities: dict[tuple[str, str], EntityPlan] = field(default_factory=dict)
    late: Counter[str] = field(default_factory=Counter)
    min_tile: dict[str, int] = field(default_factory=dict)  # per windowed feature: oldest tile still read


def op_for(event: Event, name: str, feature: FeatureDef) -> Op:
    tile = "0" if feature.lifetime else str(tile_of(event.ts, feature.tile_ms))
    agg = feature.agg
    if agg == "count":
        return ("c", name, tile, "1", "")
    if agg == "ratio":
        assert feature.numerator is not None and feature.denominator is not None
        num = "1" if feature.numerator.matches(event.type) else "0"
        den = "1" if feature.denominator.matches(event.type) else "0"
        return ("r", name, tile, num, den)
    assert feature.field is not None
    value = event.field(feature.field)
    if agg == "distinct_count":
        return ("h" if feature.approx else "d", name, tile, _distinct_key(value), "")
    if agg == "last":
        return ("l", name, tile, str(event.ts), orjson.dumps(value).decode())
    kind = {"sum": "s", "mean": "m", "min": "n", "max": "x"}[agg]
    return (kind, name, tile, repr(float(value)), "")


def entity_id_of(config: PlatformConfig, entity: str, event: Event) -> str | None:
    parts = []
    for key in config.entities[entity].key_fields:
        value = event.field(key)
        if value is None or value == "":
            return None
        parts.append(str(value))
    return "|".join(parts)


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One feature, pre-digested for the hot loop."""

    name: str
    feature: FeatureDef
    tile_ms: int
    n_tiles: int
    lifetime: bool
    field: str | None
    prop: str | None  # NAME when field is properties.NAME
    numeric: bool  # sum/mean/min/max need a number
    kind: str  # c (count), s/m/n/x (sum/mean/min/max); other aggs go through op_for


class Planner:
    """``plan_batch`` for one config, with per-event-type candidate lists cached (the consumer's hot loop).

    Same results as applying ``touches``/``is_late``/``op_for`` feature by feature; only faster.
    """

    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        self._entities: list[tuple[str, tuple[str, ...], list[_Compiled]]] = []
        for entity, ent in config.entities.items():
            compiled = [
                _Compiled(
                    name,
                    f,
                    f.tile_ms,
                    f.n_tiles,
                    f.lifetime,
                    f.field,
                    f.field[len("properties.") :] if f.field and f.field.startswith("properties.") else None,
                    f.agg in ("sum", "mean", "min", "max"),
                    {"count": "c", "sum": "s", "mean": "m", "min": "n", "max": "x"}.get(f.agg, "?"),
                )  # fmt: skip
                for name, f in config.features_of(entity).items()
            ]
            if compiled:
                self._entities.append((entity, ent.key_fields, compiled))
        self._by_type: dict[str, list[tuple[str, tuple[str, ...], list[_Compiled]]]] = {}

    def _for_type(self, event_type: str) -> list[tuple[str, tuple[str, ...], list[_Compiled]]]:
        cached = self._by_type.get(event_type)
        if cached is None:
            cached = []
            for entity, keys, compiled in self._entities:
                mine = [c for c in compiled if _type_matches(c.feature, event_type)]
                if mine:
                    cached.append((entity, keys, mine))
            if len(self._by_type) < 10_000:  # event types come from producers: stay bounded
                self._by_type[event_type] = cached
        return cached

    def plan(self, events: list[Event], now: int) -> Plan:
        plan = Plan()
        min_tile = plan.min_tile
        for _, _, compiled in self._entities:
            for c in compiled:
                if not c.lifetime:
                    min_tile[c.name] = now // c.tile_ms - c.n_tiles + 1
        entities = plan.entities
        for event in events:
            for entity, key_fields, compiled in self._for_type(event.type):
                entity_id = (
                    entity_id_of(self.config, entity, event) if len(key_fields) > 1 else _key(event, key_fields[0])
                )
                if entity_id is None:
                    continue
                ops: list[Op] = []
                for c in compiled:
                    value = None
                    if c.field is not None:
                        value = event.properties.get(c.prop) if c.prop is not None else event.field(c.field)
                        if value is None or (
                            c.numeric and (isinstance(value, bool) or not isinstance(value, int | float))
                        ):
                            continue
                    if not c.lifetime and event.ts // c.tile_ms < min_tile[c.name]:
                        plan.late[c.name] += 1
                        continue
                    kind = c.kind
                    tile = "0" if c.lifetime else str(event.ts // c.tile_ms)
                    if kind == "c":
                        ops.append(("c", c.name, tile, "1", ""))
                    elif kind in "smnx" and value is not None:
                        ops.append((kind, c.name, tile, repr(float(value)), ""))
                    else:
                        ops.append(op_for(event, c.name, c.feature))
                if not ops:
                    continue
                ep = entities.get((entity, entity_id))
                if ep is None:
                    ep = entities[(entity, entity_id)] = EntityPlan(entity, entity_id)
                for op in ops:
                    if op[1] not in ep.features:
                        ep.features.append(op[1])
                ep.events.append((event.event_id, ops))
                if event.received_at > ep.max_received_at:
                    ep.max_received_at = event.received_at
        return plan


def _type_matches(f: FeatureDef, event_type: str) -> bool:
    if f.agg == "ratio":
        assert f.numerator is not None and f.denominator is not None
        return f.numerator.matches(event_type) or f.denominator.matches(event_type)
    return f.matches(event_type)


def _key(event: Event, key_field: str) -> str | None:
    value = event.field(key_field)
    if value is None or value == "":
        return None
    return str(value)


def plan_batch(events: list[Event], config: PlatformConfig, now: int) -> Plan:
    """The straightforward planner: the specification ``Planner`` is tested against."""
    plan = Plan()
    by_entity = {e: config.features_of(e) for e in config.entities}
    for event in events:
        for entity, features in by_entity.items():
            if not features:
                continue
            entity_id = entity_id_of(config, entity, event)
            if entity_id is None:
                continue
            ops: list[Op] = []
            for name, feature in features.items():
                if not touches(event, feature):
                    continue
                if is_late(event.ts, now, feature):
                    plan.late[name] += 1
                    continue
                ops.append(op_for(event, name, feature))
            if not ops:
                continue
            ep = plan.entities.get((entity, entity_id))
            if ep is None:
                ep = plan.entities[(entity, entity_id)] = EntityPlan(entity, entity_id)
            for op in ops:
                if op[1] not in ep.features:
                    ep.features.append(op[1])
            ep.events.append((event.event_id, ops))
            ep.max_received_at = max(ep.max_received_at, event.received_at)
    return plan
