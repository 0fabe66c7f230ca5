"""Redis memory per entity, per feature and per tile, and of the dedup seen-set per event.

Writes ``events_per_entity`` mixed events (timestamps spread over ``spread_min`` minutes) to ``entities``
users through ``FeatureStore.apply``, then measures ``MEMORY USAGE`` (all nested values sampled) of every
key of a few entities (``SCAN MATCH`` on the entity's hash-tag prefix). ``used_memory`` before and after is
reported as a cross-check that includes Redis's per-key overhead.
"""

from __future__ import annotations

import re
from typing import Any

from rtml.bench.common import machine, run_id
from rtml.bench.read import _delete_prefix
from rtml.bench.stats import median, rnd
from rtml.bench.workload import events_for, mixed_config
from rtml.core.redis import Keys, Redis, connect, text
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.features.store import FeatureStore

_GLOB = re.compile(r"([*?\[\]\\])")


def glob_escape(text: str) -> str:
    return _GLOB.sub(r"\\\1", text)


def tile_of_field(field: str) -> str | None:
    """The tile a hash field belongs to (see apply.lua): ``123``, ``s123``, ``123|value``; None for ``_u``."""
    if field.startswith("_"):
        return None
    head = field.split("|", 1)[0]
    return head[1:] if head[:1].isalpha() else head


async def _used_memory(redis: Redis) -> int:
    info = await redis.info("memory")
    return int(info["used_memory"])


async def _entity_usage(redis: Redis, keys: Keys, user: str) -> dict[str, Any]:
    base = keys.entity("user", user)
    per_key: dict[str, dict[str, Any]] = {}
    async for raw in redis.scan_iter(match=f"{glob_escape(base)}*", count=1000):
        key = text(raw)
        usage = int(await redis.memory_usage(key, samples=0) or 0)
        kind = text(await redis.type(key))
        encoding = text(await redis.object("encoding", key) or b"")
        entry: dict[str, Any] = {"bytes": usage, "type": kind, "encoding": encoding}
        if kind == "hash":
            fields = [text(f) for f in await redis.hkeys(key)]
            entry["fields"] = len(fields)
            entry["tiles"] = len({t for f in fields if (t := tile_of_field(f)) is not None})
        elif kind == "zset":
            entry["members"] = int(await redis.zcard(key))
        per_key[key[len(base) :]] = entry
    return per_key


async def bench_memory(
    settings: Settings,
    *,
    entities: int = 100,
    events_per_entity: int = 200,
    features: int = 20,
    spread_min: int = 60,
    sample: int = 5,
) -> dict[str, Any]:
    """Bytes per entity, per feature, per tile and per dedup entry, with the mixed 20-feature config."""
    rid = run_id()
    prefix = f"{settings.redis.key_prefix}bench-{rid}:"
    config = mixed_config(features)
    keys = Keys(prefix)
    redis = connect(settings)
    store = FeatureStore(redis, keys, config)
    try:
        used_before = await _used_memory(redis)
        now = now_ms()
        applied = late = 0
        for e in range(entities):
            evs = events_for(f"u{e}", events_per_entity, now, spread_ms=spread_min * 60_000, seed=e)
            for start in range(0, len(evs), 100):
                res = await store.apply(evs[start : start + 100], now=now)
                applied += res.applied
                late += res.late
        used_after = await _used_memory(redis)
        samples = [await _entity_usage(redis, keys, f"u{e}") for e in range(min(sample, entities))]
        await _delete_prefix(redis, prefix)
    finally:
        await store.aclose()
        await redis.aclose()

    totals = [sum(k["bytes"] for k in s.values()) for s in samples]
    seen = [s[":seen"] for s in samples if ":seen" in s]
    first = samples[0] if samples else {}
    by_feature: dict[str, dict[str, Any]] = {}
    by_agg: dict[str, tuple[int, float]] = {}  # agg -> (tiles, bytes per tile) of its feature with most tiles
    for name, f in config.features.items():
        entry = first.get(f":f:{name}")
        if entry is None:
            by_feature[name] = {"agg": f.agg, "window": f.window, "bytes": 0, "tiles": 0}
            continue
        per_tile = entry["bytes"] / entry["tiles"] if entry.get("tiles") else None
        by_feature[name] = {
            "agg": f.agg,
            "window": f.window,
            "bytes": entry["bytes"],
            "fields": entry["fields"],
            "tiles": entry["tiles"],
            "bytes_per_tile": rnd(per_tile, 1),
            "encoding": entry["encoding"],
        }
        if per_tile is not None:
            if entry["tiles"] > by_agg.get(f.agg, (0, 0.0))[0]:
                by_agg[f.agg] = (entry["tiles"], per_tile)
    feature_bytes = [sum(v["bytes"] for k, v in s.items() if k.startswith(":f:")) for s in samples]
    per_entity = median(totals)
    feat_med = median(feature_bytes)
    return {
        "bench": "memory",
        "run_id": rid,
        "machine": machine(),
        "params": {
            "entities": entities,
            "events_per_entity": events_per_entity,
            "features": features,
            "spread_min": spread_min,
            "sampled_entities": len(samples),
            "dedup_horizon_ms": store.dedup_horizon_ms,
        },
        "applied_events": applied,
        "late_feature_skips": late,  # (event, feature) pairs too old for that window
        "per_entity_bytes": rnd(per_entity, 1),
        "per_entity_per_feature_bytes": rnd(None if feat_med is None else feat_med / max(1, features), 1),
        # the feature of each agg with the most tiles, so the key's fixed overhead weighs least
        "per_tile_bytes_by_agg": {agg: {"bytes": rnd(b, 1), "tiles": t} for agg, (t, b) in sorted(by_agg.items())},
        "seen_set": {
            "bytes": rnd(median([s["bytes"] for s in seen]), 1),
            "members": rnd(median([s["members"] for s in seen]), 1),
            "bytes_per_event": rnd(median([s["bytes"] / s["members"] for s in seen if s["members"]]), 1),
            "encoding": seen[0]["encoding"] if seen else None,
        },
        "used_memory_delta_per_entity_bytes": rnd((used_after - used_before) / entities, 1),
        "features": by_feature,
        "targets": {},
    }
