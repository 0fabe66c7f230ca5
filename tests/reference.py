"""The reference features: what every feature must read, computed from the accepted events in plain Python.

Shared by the tests that prove features exact under faults on real processes (SIGKILL, scale-out, broker and
Redis outages): ``expected`` computes the reference with ``rtml.features.windows.reference_value`` (the slow,
obviously-correct implementation), ``assert_converges`` waits until the store reads exactly that.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from rtml.core.config import PlatformConfig
from rtml.core.redis import Keys, connect
from rtml.core.schemas import Event
from rtml.core.settings import Settings
from rtml.features.plan import entity_id_of
from rtml.features.store import FeatureStore
from rtml.features.windows import reference_value

# Every aggregation kind over every entity kind, windowed and lifetime: what the exactness tests load.
CONFIG_YAML = """
entities:
  user: {key: user_id}
  item: {key: item_id}
  user_item: {keys: [user_id, item_id]}
features:
  user_events_total: {entity: user, agg: count}
  user_clicks_1h:    {entity: user, agg: count, events: [click], window: 1h}
  user_spend_24h:    {entity: user, agg: sum, field: properties.amount, window: 24h}
  user_amount_max_1h: {entity: user, agg: max, field: properties.amount, window: 1h}
  user_last_item_1h: {entity: user, agg: last, field: item_id, window: 1h}
  user_items_24h:    {entity: user, agg: distinct_count, field: item_id, window: 24h}
  item_ctr_1h:       {entity: item, agg: ratio, numerator: {events: [click]}, denominator: {events: [view]}, window: 1h}
  pair_clicks_24h:   {entity: user_item, agg: count, events: [click], window: 24h}
"""


class EventMaker:
    """Random events over ``users`` x ``items``, timestamps out of order within the last 10 minutes, about 5 %
    exact duplicates (same event_id, as a producer retry sends). Timestamps are unique per user, so which event
    is a user's ``last`` never depends on arrival order (ties go to the later arrival, which concurrent senders
    do not fix)."""

    def __init__(self, seed: int, users: int = 40, items: int = 25, dup_rate: float = 0.05) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.users = users
        self.items = items
        self.dup_rate = dup_rate
        self.made: list[Event] = []
        self._ts: set[tuple[str, int]] = set()

    def next(self, now: int | None = None) -> Event:
        rng = self.rng
        if self.made and rng.random() < self.dup_rate:
            event = rng.choice(self.made)
            self.made.append(event)
            return event
        now = int(time.time() * 1000) if now is None else now
        user = f"u{rng.randrange(self.users)}"
        ts = now - rng.randint(0, 600_000)
        while (user, ts) in self._ts:
            ts -= 1
        self._ts.add((user, ts))
        props: dict[str, bool | int | float | str] = {}
        if rng.random() < 0.3:
            props["amount"] = round(rng.uniform(1, 500), 2)
        event = Event(
            event_id=f"ev{self.seed}-{len(self.made)}",
            type=rng.choice(["view", "view", "view", "click", "purchase"]),
            user_id=user,
            item_id=f"t{rng.randrange(self.items)}",
            ts=ts,
            received_at=now,
            properties=props,
        )
        self.made.append(event)
        return event

    def batch(self, n: int) -> list[Event]:
        now = int(time.time() * 1000)
        return [self.next(now) for _ in range(n)]


def make_events(n: int, seed: int) -> list[Event]:
    maker = EventMaker(seed)
    return maker.batch(n)


def expected(events: list[Event], config: PlatformConfig, as_of: int) -> dict[tuple[str, str], dict[str, Any]]:
    """(entity, id) -> {feature: reference value at ``as_of``} over the deduplicated ``events`` (the first
    occurrence of an event_id counts; arrival order is kept)."""
    unique: dict[str, Event] = {}
    for e in events:
        unique.setdefault(e.event_id, e)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for entity in config.entities:
        feats = config.features_of(entity)
        mine: dict[str, list[Event]] = {}
        for e in unique.values():
            entity_id = entity_id_of(config, entity, e)
            if entity_id is not None:
                mine.setdefault(entity_id, []).append(e)
        for entity_id, evs in mine.items():
            out[(entity, entity_id)] = {n: reference_value(evs, f, as_of) for n, f in feats.items()}
    return out


def _equal(got: Any, want: Any) -> bool:
    return bool(got == pytest.approx(want)) if isinstance(want, float) else bool(got == want)


async def assert_converges(settings: Settings, config: PlatformConfig, events: list[Event], timeout: float) -> None:
    """Wait until every feature equals the reference (over-counting never converges: it fails here)."""
    redis = connect(settings)
    store = FeatureStore(redis, Keys(settings.redis.key_prefix), config)
    try:
        deadline = time.monotonic() + timeout
        while True:
            as_of = int(time.time() * 1000)
            want = expected(events, config, as_of)
            keys = sorted(want)
            got = dict(zip(keys, await store.read_many([(e, i, None) for e, i in keys], as_of=as_of), strict=True))
            diff = {
                (k, n): (got[k][n], v) for k, row in want.items() for n, v in row.items() if not _equal(got[k][n], v)
            }
            if not diff:
                return
            if time.monotonic() > deadline:
                sample = dict(list(diff.items())[:8])
                raise AssertionError(f"{len(diff)} feature values differ from the reference (got, want): {sample}")
            await asyncio.sleep(0.25)
    finally:
        await store.aclose()
        await redis.aclose()
