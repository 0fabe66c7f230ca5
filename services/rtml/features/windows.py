"""Window maths of the contract, as plain functions over plain data.

A window of width W has tiles of width G. A read at time T aggregates the events whose tile
``floor(ts/G)`` lies in ``[floor(T/G) - W/G + 1, floor(T/G)]``; a lifetime feature (W = 0) aggregates all.
``reference_value`` is the slow, obviously-correct implementation the Redis engine is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rtml.core.config import FeatureDef
from rtml.core.schemas import Event


def tile_of(ts: int, tile_ms: int) -> int:
    return ts // tile_ms  # floor division: correct for negative ts too


def tile_range(as_of: int, feature: FeatureDef) -> tuple[int, int]:
    """Inclusive range of tiles a read at ``as_of`` covers (a finite window only)."""
    hi = tile_of(as_of, feature.tile_ms)
    return hi - feature.n_tiles + 1, hi


def is_late(ts: int, now: int, feature: FeatureDef) -> bool:
    """True when the event's tile is outside the window of every read from ``now`` on."""
    if feature.lifetime:
        return False
    return tile_of(ts, feature.tile_ms) < tile_range(now, feature)[0]


def in_window(ts: int, as_of: int, feature: FeatureDef) -> bool:
    if feature.lifetime:
        return True
    lo, hi = tile_range(as_of, feature)
    return lo <= tile_of(ts, feature.tile_ms) <= hi


def touches(event: Event, feature: FeatureDef) -> bool:
    """Does this event change this feature? (type filter, and the field it reads must be present)."""
    if feature.agg == "ratio":
        assert feature.numerator is not None and feature.denominator is not None
        return feature.numerator.matches(event.type) or feature.denominator.matches(event.type)
    if not feature.matches(event.type):
        return False
    if feature.field is not None:
        value = event.field(feature.field)
        if value is None:
            return False
        if feature.agg in ("sum", "mean", "min", "max") and not _is_number(value):
            return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def reference_value(events: Iterable[Event], feature: FeatureDef, as_of: int) -> Any:
    """The value a read at ``as_of`` must return, from the accepted, deduplicated events (in arrival order)."""
    chosen = [e for e in events if touches(e, feature) and in_window(e.ts, as_of, feature)]
    agg = feature.agg
    if agg == "count":
        return len(chosen)
    if agg == "ratio":
        assert feature.numerator is not None and feature.denominator is not None
        num = sum(1 for e in chosen if feature.numerator.matches(e.type))
        den = sum(1 for e in chosen if feature.denominator.matches(e.type))
        return None if den == 0 else num / den
    assert feature.field is not None
    values = [e.field(feature.field) for e in chosen]
    if agg == "distinct_count":
        return len({_distinct_key(v) for v in values})
    if agg == "last":
        if not chosen:
            return None
        best = chosen[0]
        for e in chosen[1:]:
            if e.ts >= best.ts:  # ties: the later arrival wins
                best = e
        return best.field(feature.field)
    nums = [float(v) for v in values]
    if agg == "sum":
        return float(sum(nums))
    if not nums:
        return None
    if agg == "mean":
        return sum(nums) / len(nums)
    if agg == "min":
        return min(nums)
    if agg == "max":
        return max(nums)
    raise AssertionError(f"unknown agg {agg}")


def _distinct_key(value: Any) -> str:
    """How distinct_count tells values apart: by their JSON text (1 and "1" differ; 1 and 1.0 do not)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return "s" + value
    return str(value)
