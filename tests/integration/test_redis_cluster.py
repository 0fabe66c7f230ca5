"""rtml on a real 3-master Redis Cluster (the ``redis_cluster`` fixture): the same results as on one node."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from rtml.core.kafka import create_topics
from rtml.core.redis import ClusterResp, Keys, Redis, Scripts, connect
from rtml.core.settings import Settings
from rtml.features.store import FeatureStore
from tests.integration.test_feature_store import CONFIG, expected, random_events

pytestmark = pytest.mark.integration


@pytest.fixture
async def cluster_settings(make_settings: Any, redis_cluster: str) -> AsyncIterator[Settings]:
    s: Settings = make_settings(redis={"url": redis_cluster, "cluster": True})
    await create_topics(s)
    yield s


@pytest.fixture
async def cluster_redis(cluster_settings: Settings) -> AsyncIterator[Redis]:
    client = connect(cluster_settings)
    try:
        yield client
    finally:
        await client.aclose()


def masters(client: Redis) -> set[tuple[str, int]]:
    assert isinstance(client, RedisCluster)
    return {(n.host, int(n.port)) for n in client.get_primaries()}


async def test_connect_returns_a_cluster_client_and_the_lean_client_routes_by_slot(cluster_redis: Redis) -> None:
    assert isinstance(cluster_redis, RedisCluster)
    await cluster_redis.ping()
    assert len(masters(cluster_redis)) == 3
    scripts = Scripts(cluster_redis, {"echo": "redis.call('SET', KEYS[1], ARGV[1]) return redis.call('GET', KEYS[1])"})
    try:
        assert isinstance(scripts.resp, ClusterResp)
        keys = [f"t:{{k{i}}}" for i in range(60)]
        assert len({key_slot(k.encode()) for k in keys}) > 3  # many slots, on every node
        got = await scripts.run([("echo", [k], [f"v{i}"]) for i, k in enumerate(keys)])
        assert got == [f"v{i}".encode() for i in range(60)]
        # one pipelined round trip per node for the whole batch
        assert sorted(scripts.resp.node_calls.values()) == [1, 1, 1]
        assert set(scripts.resp.node_calls) == masters(cluster_redis)
        for i, k in enumerate(keys):  # and each key landed where redis-py (the reference router) finds it
            assert await cluster_redis.get(k) == f"v{i}".encode()
    finally:
        await scripts.aclose()
        await cluster_redis.delete(*[f"t:{{k{i}}}" for i in range(60)])


@pytest.mark.parametrize("seed", [1, 2])
async def test_feature_store_on_a_cluster_matches_the_reference_and_a_single_node(
    cluster_settings: Settings, settings: Settings, seed: int
) -> None:
    rng = random.Random(seed)
    now = 1_700_000_000_000 + rng.randint(0, 10_000)
    events = random_events(rng, 400, now)
    single_redis, cluster_redis = connect(settings), connect(cluster_settings)
    single = FeatureStore(single_redis, Keys(settings.redis.key_prefix), CONFIG, dedup_horizon_ms=3_600_000)
    cluster = FeatureStore(cluster_redis, Keys(cluster_settings.redis.key_prefix), CONFIG,
                           dedup_horizon_ms=3_600_000, cluster=True)  # fmt: skip
    try:
        for store in (single, cluster):
            for start in range(0, len(events), 97):
                await store.apply(events[start : start + 97], now=now)
            assert (await store.apply(events[:97], now=now)).applied == 0  # a redelivery counts once
        for as_of in (now, now + 7_000, now + 45_000):
            want = expected(events, CONFIG, now, as_of)
            requests = sorted({(ent, eid) for ent, eid, _ in want})
            calls_before = dict(cluster.scripts.resp.node_calls)  # type: ignore[union-attr]
            got = await cluster.read_many([(ent, eid, None) for ent, eid in requests], as_of=as_of)
            calls = cluster.scripts.resp.node_calls  # type: ignore[union-attr]
            # the multi-entity read: one round trip to each node that holds one of the entities, no more
            nodes = {cluster.scripts.resp._slots[key_slot(Keys("x").entity(e, i).encode())]  # type: ignore[union-attr]
                     for e, i in requests}  # fmt: skip
            assert {a: calls[a] - calls_before.get(a, 0) for a in calls if calls[a] != calls_before.get(a, 0)} == {
                a: 1 for a in nodes
            }
            assert got == await single.read_many([(ent, eid, None) for ent, eid in requests], as_of=as_of)
            by_req = dict(zip(requests, got, strict=True))
            for (ent, eid, name), value in want.items():
                actual = by_req[(ent, eid)][name]
                if CONFIG.features[name].approx:
                    assert actual == pytest.approx(value, rel=0.03, abs=1), (ent, eid, name, as_of)
                elif isinstance(value, float):
                    assert actual == pytest.approx(value, rel=1e-9, abs=1e-9), (ent, eid, name, as_of)
                else:
                    assert actual == value, (ent, eid, name, as_of)
    finally:
        await single.aclose()
        await cluster.aclose()
        await single_redis.aclose()
        await cluster_redis.aclose()
