"""In-process feature-store workloads shared by the read and memory benchmarks."""

from __future__ import annotations

import random
from typing import Any

from rtml.core.config import PlatformConfig, parse_config
from rtml.core.schemas import Event

# (agg, extra definition) cycled over to build a mixed set of windowed user features.
_AGGS: list[tuple[str, dict[str, Any]]] = [
    ("count", {}),
    ("count", {"events": ["click"]}),
    ("sum", {"field": "properties.amount"}),
    ("mean", {"field": "properties.amount"}),
    ("min", {"field": "properties.amount"}),
    ("max", {"field": "properties.amount"}),
    ("last", {"field": "properties.tag"}),
    ("distinct_count", {"field": "item_id"}),
    ("ratio", {"numerator": {"events": ["click"]}, "denominator": {"events": ["view"]}}),
]
_WINDOWS = ["1m", "5m", "1h", "24h"]


def mixed_config(features: int) -> PlatformConfig:
    """``features`` windowed features of entity user, cycling aggregations and windows (1m .. 24h)."""
    defs: dict[str, Any] = {}
    for i in range(features):
        agg, extra = _AGGS[i % len(_AGGS)]
        window = _WINDOWS[i % len(_WINDOWS)]
        defs[f"f{i:02d}_{agg}_{window}"] = {"entity": "user", "agg": agg, "window": window, **extra}
    return parse_config({"entities": {"user": {"key": "user_id"}}, "features": defs}, source="bench")


def events_for(user: str, n: int, now: int, *, spread_ms: int, seed: int = 7, tag: str = "") -> list[Event]:
    """``n`` mixed events of one user with timestamps spread over the last ``spread_ms``."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible workload, not a secret
    out = []
    for i in range(n):
        out.append(
            Event(
                event_id=f"{user}-{tag}{i}",
                type=rng.choice(["view", "view", "click", "purchase"]),
                user_id=user,
                item_id=f"t{rng.randrange(50)}",
                ts=now - rng.randrange(spread_ms),
                received_at=now,
                properties={"amount": round(rng.uniform(1, 100), 2), "tag": rng.choice("abc")},
            )
        )
    return out
