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


def plan_batch(events: list[Event], config: PlatformConfig, now: int) -> Plan:
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
