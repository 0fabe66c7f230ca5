"""rtml on a real 3-master Redis Cluster (the ``redis_cluster`` fixture): the same results as on one node."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from rtml.core.kafka import create_topics
from rtml.core.redis import ClusterResp, Keys, Redis, Scripts, connect
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.features.store import FeatureStore
from rtml.serving.app import create_app as create_serving
from rtml.serving.registry import ModelRegistry
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


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


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


async def test_warm_up_loads_the_scripts_and_opens_a_connection_to_every_master(cluster_redis: Redis) -> None:
    scripts = Scripts(cluster_redis, {"get": "return redis.call('GET', KEYS[1])"})
    try:
        assert isinstance(scripts.resp, ClusterResp)
        assert not scripts.warm
        await scripts.warm_up()
        assert scripts.warm
        assert all(scripts.resp.node(addr).connected for addr in masters(cluster_redis))
        await scripts.run([("get", [f"t:{{w{i}}}"], []) for i in range(30)])
        assert sorted(scripts.resp.node_calls.values()) == [1, 1, 1]  # only the calls: no map load, no connect
    finally:
        await scripts.aclose()


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


async def test_registry_keeps_the_live_versions_of_models_spread_over_every_node(cluster_settings: Settings) -> None:
    from tests.integration.test_serving import trained

    client = connect(cluster_settings)
    keys = Keys(cluster_settings.redis.key_prefix)
    registry = ModelRegistry(client, keys)
    await client.initialize()  # type: ignore[attr-defined]
    names = [f"m{i}" for i in range(8)]
    slot_nodes = {client.get_node_from_key(keys.model(n)).name for n in names}  # type: ignore[attr-defined]
    assert len(slot_nodes) >= 2  # the models' hash tags really are on different nodes
    t = trained(0)
    try:
        want: dict[str, str | None] = {}
        for i, n in enumerate(names):
            first = await registry.register(n, t.onnx_bytes, t.metadata)
            second = await registry.register(n, t.onnx_bytes, t.metadata)
            await registry.promote(n, first)
            if i % 2:
                await registry.promote(n, second)
            want[n] = second if i % 2 else first
        want["never-registered"] = None
        assert await registry.live_versions(list(want)) == want
        state = await registry.serving_state(list(want))
        assert {n: live for n, (live, _) in state.items()} == want
        assert await registry.rollback("m1") == want["m0"]  # m1: back to its first version ("1")
        assert await registry.live_version("m1") == "1"
        listed = {m["name"]: m for m in await registry.describe()}
        assert set(names) <= set(listed)
        assert all(len(listed[n]["versions"]) == 2 for n in names)
    finally:
        await client.aclose()


async def test_predictions_on_a_cluster_equal_those_on_a_single_node(
    cluster_settings: Settings, settings: Settings
) -> None:
    from tests.helpers import running
    from tests.integration.test_serving import ev, register, write_events

    rng = random.Random(7)
    now = now_ms()
    users, items = [f"u{i}" for i in range(30)], [f"t{i}" for i in range(30)]
    events = [
        ev(i, rng.choice(["view", "view", "click"]), rng.choice(users), rng.choice(items), now - rng.randint(0, 90_000))
        for i in range(1_500)
    ]
    pairs = [(u, rng.choice(items)) for u in users]
    scores: list[list[Any]] = []
    for s in (settings, cluster_settings):
        s = s.model_copy(update={"model_poll_interval_s": 0.2})
        await register(s)
        await write_events(s, events)
        got: list[Any] = []
        async with running(create_serving(s)) as client:
            for u, item in pairs:
                resp = await client.post("/v1/predict", json={"entities": {"user_id": u, "item_id": item}})
                assert resp.status_code == 200, resp.text
                assert resp.json()["degraded"] is False
                got.append(resp.json()["score"])
            for u in users[:10]:  # candidates on every node: one read per node for the whole list
                resp = await client.post("/v1/recommend", json={"user_id": u, "candidates": items, "k": 10})
                assert resp.status_code == 200, resp.text
                got.append(resp.json()["items"])
        scores.append(got)
    single, cluster = scores
    assert cluster == single
    assert len({s for s in single[:30]}) > 5  # the features differ between users: the comparison means something


async def test_the_lean_client_follows_ask_during_a_slot_migration_and_moved_after_it(
    cluster_redis: Redis, redis_cluster: str
) -> None:
    import os

    if os.environ.get("RTML_REDIS_CLUSTER_URL"):
        pytest.skip("moves a hash slot: only on the cluster the fixtures started")
    assert isinstance(cluster_redis, RedisCluster)
    await cluster_redis.initialize()
    tag = f"mig-{random.random()}"
    old_key, new_key = f"{{{tag}}}:old", f"{{{tag}}}:new"
    slot = key_slot(old_key.encode())
    source = cluster_redis.get_node_from_key(old_key)
    target = next(n for n in cluster_redis.get_primaries() if n.name != source.name)
    src = aioredis.Redis(host=source.host, port=source.port)
    dst = aioredis.Redis(host=target.host, port=target.port)
    scripts = Scripts(cluster_redis, {"getset": "redis.call('SET', KEYS[1], ARGV[1]) return redis.call('GET', KEYS[1])",
                                      "get": "return redis.call('GET', KEYS[1])"})  # fmt: skip
    resp = scripts.resp
    assert isinstance(resp, ClusterResp)
    try:
        assert await scripts.run([("getset", [old_key], ["before"])]) == [b"before"]
        neighbour = f"{{{tag}}}:neighbour"  # a key of the same slot that rtml never touches here
        await cluster_redis.set(neighbour, "n")
        src_id, dst_id = (
            _text(await src.execute_command("CLUSTER MYID")),
            _text(await dst.execute_command("CLUSTER MYID")),
        )
        await dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        await src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        # mid-migration: the existing key is still served by the source, a new one is ASKed to the target
        got = await scripts.run([("get", [old_key], []), ("getset", [new_key], ["during"])])
        assert got == [b"before", b"during"]
        # move every key of the slot, as a resharding does: other tests' keys may share it (then the slot could
        # not change owner); old_key among them
        while keys := await src.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000):
            await src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
        for node in cluster_redis.get_primaries():
            r = aioredis.Redis(host=node.host, port=node.port)
            try:
                await r.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
            finally:
                await r.aclose()
        # after it: the stale map sends to the source, which answers MOVED; the map is reloaded
        calls = dict(resp.node_calls)
        assert await scripts.run([("get", [old_key], []), ("get", [new_key], [])]) == [b"before", b"during"]
        assert resp._slots is not None and resp._slots[slot] == (target.host, int(target.port))
        assert resp.node_calls[(source.host, int(source.port))] == calls.get((source.host, int(source.port)), 0) + 1
        assert await scripts.run([("get", [old_key], [])]) == [b"before"]  # straight to the new owner now
        assert resp.node_calls[(source.host, int(source.port))] == calls.get((source.host, int(source.port)), 0) + 1
        assert await dst.get(neighbour) == b"n"  # moved with the slot
    finally:
        await scripts.aclose()
        await src.aclose()
        await dst.aclose()


async def test_quality_writes_count_once_when_one_node_lost_its_scripts(cluster_redis: Redis) -> None:
    from rtml.feedback.quality import QualityStore, marks_key

    assert isinstance(cluster_redis, RedisCluster)
    await cluster_redis.initialize()
    keys = Keys(f"q{random.randint(0, 10**9)}:")
    store = QualityStore(cluster_redis, keys)
    names = [keys.model(f"m{i}") + ":q:0" for i in range(12)]
    assert len({cluster_redis.get_node_from_key(k).name for k in names}) == 3
    per_key = {k: {"1|n": 1.0, "1|s": 0.5} for k in names}
    ttl = dict.fromkeys(names, 60_000)
    await store._write(per_key, ttl, dict.fromkeys(names, [("t.outcomes:0", -1, 7, 9)]))
    victim = cluster_redis.get_node_from_key(names[0])
    flush = aioredis.Redis(host=victim.host, port=victim.port)
    try:
        await flush.script_flush()  # that node forgets quality.lua (as after a restart)
    finally:
        await flush.aclose()
    await store._write(per_key, ttl, dict.fromkeys(names, [("t.outcomes:0", -1, 10, 12)]))
    for k in names:  # the calls the other nodes accepted were not sent twice
        assert await cluster_redis.hgetall(k) == {b"1|n": b"2", b"1|s": b"1"}
        assert 0 < await cluster_redis.pttl(k) <= 60_000
        # the marks (same slot): the last offset of the stream each key holds
        assert await cluster_redis.hgetall(marks_key(k)) == {b"t.outcomes:0": b"12"}
