"""Turn a micro-batch of events into per-entity update plans (pure; no I/O).

Per entity, a plan holds its events and their tile operations folded into one op per (feature, tile, kind),
which is what Redis executes (``fold``). Events too late for a feature's window are left out and counted; an
entity no feature touches gets no plan at all. A repeated ``event_id`` within the batch is dropped per entity
(first one wins, as apply.lua does across batches). ``plan_batch`` is the straightforward specification,
event by event; the resend path of apply.lua (a batch mixing new and seen events) uses it per event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from rtml.core.config import FeatureDef, PlatformConfig
from rtml.core.schemas import Event
from rtml.features.windows import _distinct_key, is_late, tile_of, touches

# One tile operation: (kind, feature name, tile, a, b). Kinds and operands:
#   c count (-, -) | s sum, m mean, n min, x max (float value, -) | r ratio (numerator 0/1, denominator 0/1)
#   d exact distinct, h approximate distinct (distinct key, -) | l last (ts, JSON text of the value)
Op = tuple[str, str, str, Any, Any]


Folded = dict[tuple[str, str, str], list[Any]]  # (kind, feature, tile) -> folded op, see ``fold``


@dataclass(slots=True)
class EntityPlan:
    entity: str
    entity_id: str
    events: list[Event] = field(default_factory=list)  # distinct event_ids, batch order
    ops: Folded = field(default_factory=dict)  # the events' ops folded
    duplicates: int = 0  # events dropped because their event_id already came earlier in this batch
    ids: set[str] = field(default_factory=set)

    def add(self, event: Event, ops: list[Op]) -> None:
        """Fold in an event's ops unless its event_id is already in this plan."""
        if event.event_id in self.ids:
            self.duplicates += 1
            return
        self.ids.add(event.event_id)
        self.events.append(event)
        fold(self.ops, ops)


@dataclass(slots=True)
class Plan:
    entities: dict[tuple[str, str], EntityPlan] = field(default_factory=dict)
    late: Counter[str] = field(default_factory=Counter)
    min_tile: dict[str, int] = field(default_factory=dict)  # per windowed feature: oldest tile still read


def op_for(event: Event, name: str, feature: FeatureDef) -> Op:
    tile = "0" if feature.lifetime else str(tile_of(event.ts, feature.tile_ms))
    agg = feature.agg
    if agg == "count":
        return ("c", name, tile, None, None)
    if agg == "ratio":
        assert feature.numerator is not None and feature.denominator is not None
        num = 1 if feature.numerator.matches(event.type) else 0
        den = 1 if feature.denominator.matches(event.type) else 0
        return ("r", name, tile, num, den)
    assert feature.field is not None
    value = event.field(feature.field)
    if agg == "distinct_count":
        return ("h" if feature.approx else "d", name, tile, _distinct_key(value), None)
    if agg == "last":
        return ("l", name, tile, event.ts, orjson.dumps(value).decode())
    kind = {"sum": "s", "mean": "m", "min": "n", "max": "x"}[agg]
    return (kind, name, tile, float(value), None)


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
    """One feature, pre-digested for the hot loop, for one event type."""

    name: str
    feature: FeatureDef
    tile_ms: int  # 0 for lifetime features (tile "0")
    field: str | None  # attribute name (user_id, item_id, ...) when not a property
    prop: str | None  # NAME when field is properties.NAME
    kind: str  # c s m n x (numeric), r (ratio), d h (distinct), l (last: through op_for)
    a: Any = None  # ratio: numerator flag for this event type
    b: Any = None  # ratio: denominator flag for this event type


def _compile(name: str, f: FeatureDef, event_type: str) -> _Compiled:
    prop = f.field[len("properties.") :] if f.field and f.field.startswith("properties.") else None
    attr = f.field if f.field and prop is None else None
    tile_ms = 0 if f.lifetime else f.tile_ms
    if f.agg == "ratio":
        assert f.numerator is not None and f.denominator is not None
        num, den = int(f.numerator.matches(event_type)), int(f.denominator.matches(event_type))
        return _Compiled(name, f, tile_ms, None, None, "r", num, den)
    kind = {"count": "c", "sum": "s", "mean": "m", "min": "n", "max": "x", "last": "l"}.get(f.agg, "d")
    if kind == "d" and f.approx:
        kind = "h"
    return _Compiled(name, f, tile_ms, attr, prop, kind)


Candidates = list[tuple[str, str | None, list[_Compiled]]]  # (entity, its single key attribute or None, features)


class Planner:
    """``plan_batch`` for one config, with per-event-type candidate lists cached (the consumer's hot loop).

    Same results as applying ``touches``/``is_late``/``op_for`` feature by feature (property-tested); only
    faster: per event type, each feature's kind, ratio flags and field access are worked out once.
    """

    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        self._by_type: dict[str, Candidates] = {}

    def _for_type(self, event_type: str) -> Candidates:
        cached = self._by_type.get(event_type)
        if cached is None:
            cached = []
            for entity, ent in self.config.entities.items():
                mine = [
                    _compile(name, f, event_type)
                    for name, f in self.config.features_of(entity).items()
                    if _type_matches(f, event_type)
                ]
                if mine:
                    keys = ent.key_fields
                    simple = keys[0] if len(keys) == 1 and not keys[0].startswith("properties.") else None
                    cached.append((entity, simple, mine))
            if len(self._by_type) < 10_000:  # event types come from producers: stay bounded
                self._by_type[event_type] = cached
        return cached

    def plan(self, events: list[Event], now: int) -> Plan:
        plan = Plan()
        min_tile = plan.min_tile
        for f_name, f in self.config.features.items():
            if not f.lifetime:
                min_tile[f_name] = now // f.tile_ms - f.n_tiles + 1
        entities = plan.entities
        late = plan.late
        for event in events:
            ts = event.ts
            props = event.properties
            for entity, simple, compiled in self._for_type(event.type):
                if simple is not None:
                    raw = getattr(event, simple, None)
                    entity_id = None if raw is None or raw == "" else str(raw)
                else:
                    entity_id = entity_id_of(self.config, entity, event)
                if entity_id is None:
                    continue
                ops: list[Op] = []
                for c in compiled:
                    kind = c.kind
                    value: Any = None
                    if c.prop is not None:
                        value = props.get(c.prop)
                    elif c.field is not None:
                        value = getattr(event, c.field, None)
                    if kind in "smnx":
                        if value is None or value is True or value is False or not isinstance(value, int | float):
                            continue
                    elif kind != "c" and kind != "r" and value is None:
                        continue
                    if c.tile_ms:
                        t = ts // c.tile_ms
                        if t < min_tile[c.name]:
                            late[c.name] += 1
                            continue
                        tile = str(t)
                    else:
                        tile = "0"
                    if kind == "c":
                        ops.append(("c", c.name, tile, None, None))
                    elif kind == "r":
                        ops.append(("r", c.name, tile, c.a, c.b))
                    elif kind == "d" or kind == "h":
                        key = "s" + value if type(value) is str else _distinct_key(value)
                        ops.append((kind, c.name, tile, key, None))
                    elif kind == "l":
                        ops.append(op_for(event, c.name, c.feature))
                    else:
                        ops.append((kind, c.name, tile, float(value), None))
                if not ops:
                    continue
                ep = entities.get((entity, entity_id))
                if ep is None:
                    ep = entities[(entity, entity_id)] = EntityPlan(entity, entity_id)
                ep.add(event, ops)
        return plan


def _type_matches(f: FeatureDef, event_type: str) -> bool:
    if f.agg == "ratio":
        assert f.numerator is not None and f.denominator is not None
        return f.numerator.matches(event_type) or f.denominator.matches(event_type)
    return f.matches(event_type)


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
            ep.add(event, ops)
    return plan


def fold(acc: Folded, ops: Iterable[Op]) -> None:
    """Fold tile ops into ``acc``: one op per (kind, feature, tile) -- what apply.lua applies.

    Folded ops: ``[c, f, tile, n, 0]``, ``[s, f, tile, sum, 0]``, ``[m, f, tile, sum, n]``,
    ``[r, f, tile, num, den]``, ``[n|x, f, tile, min|max, 0]``, ``[l, f, tile, ts, json]`` (greatest ts, ties:
    the later event), ``[d, f, {tile|key}]`` and ``[h, f, tile, {key}]``, with f the feature name.
    """
    for kind, name, tile, a, b in ops:
        cur = acc.get((kind, name, tile))
        if cur is None:
            if kind == "c":
                acc[(kind, name, tile)] = ["c", name, tile, 1, 0]
            elif kind == "d":
                acc[(kind, name, tile)] = ["d", name, {f"{tile}|{a}": None}]
            elif kind == "h":
                acc[(kind, name, tile)] = ["h", name, tile, {a: None}]
            elif kind == "m":
                acc[(kind, name, tile)] = ["m", name, tile, a, 1]
            else:  # s n x: one number; r: two counts; l: ts and value
                acc[(kind, name, tile)] = [kind, name, tile, a, 0 if b is None else b]
        elif kind == "c":
            cur[3] += 1
        elif kind == "s":
            cur[3] += a
        elif kind == "m":
            cur[3] += a
            cur[4] += 1
        elif kind == "r":
            cur[3] += a
            cur[4] += b
        elif kind == "n":
            if a < cur[3]:
                cur[3] = a
        elif kind == "x":
            if a > cur[3]:
                cur[3] = a
        elif kind == "l":
            if a >= cur[3]:
                cur[3], cur[4] = a, b
        elif kind == "d":
            cur[2][f"{tile}|{a}"] = None
        else:  # h
            cur[3][a] = None


def encode_ops(acc: Folded, fid: dict[str, int], out: list[Any]) -> None:
    """Append ``nops`` and the folded ops, flat, as apply.lua reads them: feature names become indexes into
    the call's feature table, floats ``repr`` text (Redis's Lua turns numbers into text with at most 17
    significant digits; ``repr`` round-trips exactly), key sets lists."""
    out.append(len(acc))
    for op in acc.values():
        kind = op[0]
        if kind == "d":
            out += (kind, fid[op[1]], len(op[2]))
            out += op[2]
        elif kind == "h":
            out += (kind, fid[op[1]], op[2], len(op[3]))
            out += op[3]
        elif kind in "smnx":
            out += (kind, fid[op[1]], op[2], repr(op[3]), op[4])
        else:
            out += (kind, fid[op[1]], op[2], op[3], op[4])
