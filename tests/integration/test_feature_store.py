"""The Redis feature engine equals the plain reference implementation, on a real redis-server."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtml.core.config import PlatformConfig, parse_config
from rtml.core.redis import Keys, Redis, connect
from rtml.core.schemas import Event
from rtml.core.settings import Settings
from rtml.features.store import FeatureStore
from rtml.features.windows import is_late, reference_value, touches

pytestmark = pytest.mark.integration

CONFIG = parse_config(
    {
        "entities": {"user": {"key": "user_id"}, "item": {"key": "item_id"},
                     "user_item": {"keys": ["user_id", "item_id"]}},
        "features": {
            "u_count_10s": {"entity": "user", "agg": "count", "window": "10s", "tile": "2s"},
            "u_clicks_1m": {"entity": "user", "agg": "count", "events": ["click"], "window": "1m"},
            "u_total": {"entity": "user", "agg": "count"},
            "u_sum_30s": {"entity": "user", "agg": "sum", "field": "properties.amount", "window": "30s"},
            "u_mean_30s": {"entity": "user", "agg": "mean", "field": "properties.amount", "window": "30s"},
            "u_min_20s": {"entity": "user", "agg": "min", "field": "properties.amount", "window": "20s"},
            "u_max_1m": {"entity": "user", "agg": "max", "field": "properties.amount", "window": "1m"},
            "u_last_20s": {"entity": "user", "agg": "last", "field": "properties.tag", "window": "20s"},
            "u_items_1m": {"entity": "user", "agg": "distinct_count", "field": "item_id", "window": "1m"},
            "u_items_hll_1m": {"entity": "user", "agg": "distinct_count", "field": "item_id", "window": "1m",
                               "approx": True},
            "u_tags_total": {"entity": "user", "agg": "distinct_count", "field": "properties.tag"},
            "i_ctr_1m": {"entity": "item", "agg": "ratio", "numerator": {"events": ["click"]},
                         "denominator": {"events": ["view"]}, "window": "1m"},
            "ui_clicks": {"entity": "user_item", "agg": "count", "events": ["click"], "window": "1m"},
        },
    }
)  # fmt: skip


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[FeatureStore]:
    redis: Redis = connect(settings)
    try:
        yield FeatureStore(redis, Keys(settings.redis.key_prefix), CONFIG, dedup_horizon_ms=3_600_000)
    finally:
        await redis.aclose()


def random_events(rng: random.Random, n: int, now: int) -> list[Event]:
    events = []
    for i in range(n):
        props: dict[str, bool | int | float | str] = {}
        if rng.random() < 0.7:
            props["amount"] = rng.choice([rng.randint(-5, 50), round(rng.uniform(0, 100), 2)])
        if rng.random() < 0.5:
            props["tag"] = rng.choice(["a", "b", "c"])
        eid = f"e{rng.randint(0, n)}" if rng.random() < 0.15 else f"e{i}-{rng.random()}"  # some duplicates
        events.append(
            Event(
                event_id=eid,
                type=rng.choice(["view", "view", "click", "purchase"]),
                user_id=rng.choice(["u1", "u2", "u3"]),
                item_id=rng.choice(["t1", "t2", "t3", None]),
                ts=now - rng.randint(-60_000, 90_000),  # out of order, some late, some future
                received_at=now,
                properties=props,
            )
        )
    return events


def expected(events: list[Event], config: PlatformConfig, now: int, as_of: int) -> dict[tuple[str, str, str], object]:
    """Reference: dedup by event_id per entity (first arrival wins), drop events late at apply time."""
    out: dict[tuple[str, str, str], object] = {}
    for name, f in config.features.items():
        ids = sorted(
            {
                "|".join(str(e.field(k)) for k in config.entities[f.entity].key_fields)
                for e in events
                if all(e.field(k) is not None for k in config.entities[f.entity].key_fields)
            }
        )
        for entity_id in ids:
            accepted: list[Event] = []
            seen: set[str] = set()
            for e in events:
                key = "|".join(str(e.field(k)) for k in config.entities[f.entity].key_fields)
                if key != entity_id:
                    continue
                # dedup is per entity across all its features: an event counts once per entity
                touches_entity = any(
                    touches(e, g) and not is_late(e.ts, now, g)
                    for g in config.features.values()
                    if g.entity == f.entity
                )
                if not touches_entity or e.event_id in seen:
                    continue
                seen.add(e.event_id)
                if touches(e, f) and not is_late(e.ts, now, f):
                    accepted.append(e)
            out[(f.entity, entity_id, name)] = reference_value(accepted, f, as_of)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_engine_matches_reference_on_random_streams(store: FeatureStore, seed: int) -> None:
    rng = random.Random(seed)
    now = 1_700_000_000_000 + rng.randint(0, 10_000)
    events = random_events(rng, 400, now)
    # apply in several micro-batches, then apply one batch again (a redelivery)
    for start in range(0, len(events), 97):
        await store.apply(events[start : start + 97], now=now)
    again = await store.apply(events[:97], now=now)
    assert again.applied == 0

    for as_of in (now, now + 7_000, now + 45_000):
        want = expected(events, CONFIG, now, as_of)
        requests = sorted({(ent, eid) for ent, eid, _ in want})
        got = await store.read_many([(ent, eid, None) for ent, eid in requests], as_of=as_of)
        by_req = dict(zip(requests, got, strict=True))
        for (ent, eid, name), value in want.items():
            actual = by_req[(ent, eid)][name]
            if CONFIG.features[name].approx:  # HyperLogLog: ~0.8 % standard error, exact for tiny sets
                assert actual == pytest.approx(value, rel=0.03, abs=1), (ent, eid, name, as_of)
            elif isinstance(value, float):
                assert actual == pytest.approx(value, rel=1e-9, abs=1e-9), (ent, eid, name, as_of)
            else:
                assert actual == value, (ent, eid, name, as_of)


async def test_empty_windows_read_zero_or_null(store: FeatureStore) -> None:
    [values] = await store.read_many([("user", "nobody", None)])
    assert values["u_count_10s"] == 0 and values["u_sum_30s"] == 0.0 and values["u_items_1m"] == 0
    assert values["u_mean_30s"] is None and values["u_min_20s"] is None and values["u_last_20s"] is None
    [item] = await store.read_many([("item", "nothing", ["i_ctr_1m"])])
    assert item == {"i_ctr_1m": None}


async def test_window_slides_and_old_tiles_are_pruned(store: FeatureStore) -> None:
    t0 = 1_700_000_000_000
    ev = [Event(event_id=f"s{i}", type="click", user_id="u9", ts=t0 + i * 2000, received_at=t0 + i * 2000)
          for i in range(10)]  # fmt: skip
    for e in ev:
        await store.apply([e], now=e.ts)
    [v] = await store.read_many([("user", "u9", ["u_count_10s"])], as_of=t0 + 18_000)
    assert v["u_count_10s"] == 5  # tiles 5..9 of 2 s each
    key = store.keys.feature("user", "u9", "u_count_10s")
    tiles = [f for f in await store.redis.hkeys(key) if not f.startswith(b"_")]
    assert len(tiles) <= 6  # pruned as the window slid
    # window + two tiles + the future allowance: renewed once per tile advance, it covers the tile until then
    assert 0 < await store.redis.pttl(key) <= 10_000 + 2 * 2_000 + 300_000


async def test_a_hash_that_expired_gets_its_ttl_back_on_the_first_write(store: FeatureStore) -> None:
    """TTLs are renewed only when a write creates a field in a new tile period: a feature hash that expired
    (or was evicted) and comes back in the same period must get a TTL at once, or it would live forever."""
    t0 = 1_700_000_000_000
    await store.apply([Event(event_id="x1", type="click", user_id="ttl", ts=t0, received_at=t0)], now=t0)
    key = store.keys.feature("user", "ttl", "u_count_10s")
    assert await store.redis.pttl(key) > 0
    await store.redis.delete(key)  # as if expired or evicted; the entity's other keys remain
    await store.apply([Event(event_id="x2", type="click", user_id="ttl", ts=t0, received_at=t0)], now=t0 + 1)
    assert await store.redis.pttl(key) > 0
    [v] = await store.read_many([("user", "ttl", ["u_count_10s"])], as_of=t0 + 1)
    assert v["u_count_10s"] == 1


async def test_a_batch_mixing_new_and_already_applied_events_counts_each_once(store: FeatureStore) -> None:
    """A replayed batch (crash after apply, before commit) that also carries new events: the folded write is
    refused for that entity and redone event by event, so the old ones are not counted twice."""
    t0 = 1_700_000_000_000

    def ev(i: int, user: str) -> Event:
        return Event(event_id=f"m{i}", type="purchase", user_id=user, item_id=f"t{i % 3}", ts=t0 + i,
                     received_at=t0, properties={"amount": float(i)})  # fmt: skip

    first = await store.apply([ev(i, "mix") for i in range(5)], now=t0 + 10)
    assert (first.applied, first.duplicates) == (5, 0)  # a purchase touches only user features here
    again = await store.apply([ev(i, "mix") for i in range(3, 9)] + [ev(8, "mix")], now=t0 + 20)
    # m3, m4 already applied, m5..m8 new, m8 a second time within the batch
    assert (again.applied, again.duplicates) == (4, 3)
    [v] = await store.read_many([("user", "mix", ["u_count_10s", "u_sum_30s"])], as_of=t0 + 20)
    assert v["u_count_10s"] == 9 and v["u_sum_30s"] == float(sum(range(9)))


async def test_rows_report_when_features_last_changed(store: FeatureStore) -> None:
    t0 = 1_700_000_000_000
    [row] = await store.read_rows([("user", "fresh", None)], as_of=t0)
    assert row.updated_at is None
    await store.apply([Event(event_id="f1", type="click", user_id="fresh", ts=t0, received_at=t0)], now=t0 + 5)
    await store.apply([Event(event_id="f1", type="click", user_id="fresh", ts=t0, received_at=t0)], now=t0 + 9)
    [row] = await store.read_rows([("user", "fresh", None)], as_of=t0 + 20)
    assert row.updated_at == t0 + 5  # the duplicate changed nothing, so it does not count as an update
    assert row.values["u_count_10s"] == 1


async def test_approx_distinct_count_tiles_expire_with_the_window(store: FeatureStore) -> None:
    t0 = 1_700_000_000_000
    events = [
        Event(event_id=f"h{i}", type="view", user_id="hll", item_id=f"t{i % 50}", ts=t0, received_at=t0)
        for i in range(500)
    ]
    await store.apply(events, now=t0)
    [v] = await store.read_many([("user", "hll", ["u_items_hll_1m", "u_items_1m"])], as_of=t0)
    assert v["u_items_1m"] == 50 and v["u_items_hll_1m"] == pytest.approx(50, abs=2)
    [v] = await store.read_many([("user", "hll", ["u_items_hll_1m"])], as_of=t0 + 61_000)
    assert v["u_items_hll_1m"] == 0
    # a later write prunes the slid-out tile and its HyperLogLog key
    late = t0 + 120_000
    await store.apply([Event(event_id="h-late", type="view", user_id="hll", item_id="x", ts=late, received_at=late)],
                      now=late)  # fmt: skip
    base = store.keys.feature("user", "hll", "u_items_hll_1m")
    assert await store.redis.exists(f"{base}:h:{t0 // 1000}") == 0


# --- property test: random streams against the reference, on the real redis-server -------------------------
_types = st.sampled_from(["view", "click", "purchase"])
_events = st.lists(
    st.builds(
        dict,
        eid=st.integers(0, 40),  # small range: duplicates are common
        type=_types,
        user=st.sampled_from(["u1", "u2"]),
        item=st.sampled_from(["t1", "t2", "t3"]),
        dt=st.integers(-70_000, 70_000),  # disorder, lateness for short windows, future tiles
        amount=st.one_of(st.none(), st.integers(-10, 10), st.floats(-100, 100, allow_nan=False)),
        tag=st.one_of(st.none(), st.sampled_from(["a", "b"])),
    ),
    max_size=60,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_events, batch=st.integers(1, 25), read_dt=st.sampled_from([0, 1_999, 9_999, 30_000]))
def test_property_engine_equals_reference(redis_url: str, raw: list[dict[str, Any]], batch: int, read_dt: int) -> None:
    now = 1_700_000_000_000 + 500
    by_id: dict[int, Event] = {}
    events = []
    for r in raw:
        props: dict[str, bool | int | float | str] = {}
        if r["amount"] is not None:
            props["amount"] = r["amount"]
        if r["tag"] is not None:
            props["tag"] = r["tag"]
        # a duplicate is the same event sent again: same id, same content
        e = by_id.setdefault(
            r["eid"],
            Event(event_id=f"e{r['eid']}", type=r["type"], user_id=r["user"], item_id=r["item"],
                  ts=now + r["dt"], received_at=now, properties=props),
        )  # fmt: skip
        events.append(e)

    async def run() -> None:
        s = Settings(redis={"url": redis_url, "key_prefix": f"p{uuid.uuid4().hex[:8]}:"})
        redis = connect(s)
        try:
            store = FeatureStore(redis, Keys(s.redis.key_prefix), CONFIG, dedup_horizon_ms=3_600_000)
            for start in range(0, len(events), batch):
                await store.apply(events[start : start + batch], now=now)
            as_of = now + read_dt
            want = expected(events, CONFIG, now, as_of)
            requests = sorted({(ent, eid) for ent, eid, _ in want})
            got = dict(
                zip(requests, await store.read_many([(e, i, None) for e, i in requests], as_of=as_of), strict=True)
            )
            for (ent, eid, name), value in want.items():
                actual = got[(ent, eid)][name]
                if CONFIG.features[name].approx:
                    assert actual == pytest.approx(value, abs=1)
                elif isinstance(value, float):
                    assert actual == pytest.approx(value, rel=1e-9, abs=1e-9), (ent, eid, name)
                else:
                    assert actual == value, (ent, eid, name, actual, value)
        finally:
            await redis.aclose()

    asyncio.run(run())


async def test_a_read_only_replica_is_a_retriable_outage_not_bad_data(store: FeatureStore) -> None:
    """After a failover the old master answers READONLY: the consumer must retry, never dead-letter."""
    from rtml.core.errors import DependencyUnavailable

    await store.redis.execute_command("REPLICAOF", "127.0.0.1", "1")  # a replica of nothing: writes refused
    try:
        with pytest.raises(DependencyUnavailable):
            await store.apply([Event(event_id="ro", type="view", user_id="u", ts=1, received_at=1)], now=1)
    finally:
        await store.redis.execute_command("REPLICAOF", "NO", "ONE")
