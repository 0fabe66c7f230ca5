"""Safe rollout on the serving side, on a real broker and redis-server: a candidate in shadow and canary, the
guard after a promotion, compare-and-set decisions, replicas following another client, load failures, the
admin routes, recommend during a rollout. Scores are checked against each version's own ONNX session on the
feature values the prediction record logged."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from rtml.core import metrics
from rtml.core.errors import InvalidInput, NotFound
from rtml.core.kafka import Producer, create_topics
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.serving.app import create_app
from rtml.serving.inference.session import LoadedModel, build_model
from rtml.serving.registry import RolloutConflict, StaleRollout, canary_point
from tests.helpers import error_of, eventually, running
from tests.integration.test_serving import FEATURES, ev, register, trained, write_events
from tests.integration.test_serving_registry import consume, registry_of

pytestmark = pytest.mark.integration

# The candidate orders its inputs differently, lacks none of live's but adds one (user_views_total), and
# declares its own default for item_ctr_1h (live's is 0.0).
CANDIDATE = ["user_items_24h", "item_ctr_1h", "user_clicks_5m", "user_views_total"]
CANDIDATE_META = {"features": CANDIDATE, "defaults": {"item_ctr_1h": 0.5}, "task": "regression"}
WEIGHTS = [0.1, 1.0, 0.01, 0.001]


@functools.cache
def linear(weights: tuple[float, ...], intercept: float) -> bytes:
    """An exact linear model (ONNX) over len(weights) inputs: scores are easy to tell apart and to check."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 5, size=(50, len(weights))).astype(np.float32)
    reg = LinearRegression().fit(x, x @ np.array(weights, np.float32) + intercept)
    return bytes(to_onnx(reg, x[:1]).SerializeToString())


def session(onnx_bytes: bytes, metadata: dict[str, Any]) -> LoadedModel:
    return build_model("ctr", "x", onnx_bytes, metadata)


def live_score(features: dict[str, float]) -> float:
    t = trained(0)
    return float(session(t.onnx_bytes, t.metadata).predict(np.array([[features[f] for f in FEATURES]], np.float32))[0])


def candidate_score(features: dict[str, float], meta: dict[str, Any] = CANDIDATE_META,
                    weights: tuple[float, ...] = tuple(WEIGHTS)) -> float:  # fmt: skip
    row = np.array([[features[f] for f in meta["features"]]], np.float32)
    return float(session(linear(weights, 0.5), meta).predict(row)[0])


async def register_candidate(s: Settings, meta: dict[str, Any] = CANDIDATE_META,
                             weights: tuple[float, ...] = tuple(WEIGHTS)) -> str:  # fmt: skip
    async with registry_of(s) as registry:
        return await registry.register("ctr", linear(weights, 0.5), meta)


def shadow_count(version: str) -> float:
    return float(metrics.SHADOW_PREDICTIONS.labels("ctr", version)._value.get())


@pytest.fixture
async def fast(settings: Settings) -> AsyncIterator[Settings]:
    yield settings.model_copy(update={"model_poll_interval_s": 0.2})


async def seed_u1(s: Settings) -> None:
    now = now_ms()
    events = [ev(i, "click", "u1", f"t{i}", now - 1000) for i in range(4)]
    events += [ev(i, "view", "u1", "t9", now - 1000) for i in range(3)] + [ev(0, "click", "u2", "t9", now - 1000)]
    await write_events(s, events)


async def test_shadow_logs_both_scores_and_live_answers(fast: Settings) -> None:
    live = await register(fast)
    candidate = await register_candidate(fast)
    await seed_u1(fast)
    async with registry_of(fast) as registry:
        rollout = await registry.start_rollout("ctr", candidate, "shadow", by="test")
    assert rollout.stage == "shadow" and rollout.version == candidate and rollout.live == live and rollout.id
    before = shadow_count(candidate)
    async with running(create_app(fast)) as client:
        with_item = await client.post("/v1/predict", json={"entities": {"user_id": "u1", "item_id": "t9"}})
        no_item = await client.post("/v1/predict", json={"entities": {"user_id": "u1"},
                                                         "features": {"user_clicks_5m": 9}})  # fmt: skip
    bodies = [with_item.json(), no_item.json()]
    assert [r.status_code for r in (with_item, no_item)] == [200, 200]
    assert all(b["version"] == live and b["degraded"] is False for b in bodies)
    assert shadow_count(candidate) - before == 2
    records = {r["prediction_id"]: r for r in await consume(fast, "predictions", count=2)}
    first, second = records[bodies[0]["prediction_id"]], records[bodies[1]["prediction_id"]]
    # u1: 4 clicks, 4 distinct items, 3 views; t9: 1 click / 3 views. The record keeps live's inputs and adds
    # the candidate's extra one.
    assert first["features"] == {"user_clicks_5m": 4.0, "item_ctr_1h": pytest.approx(1 / 3), "user_items_24h": 5.0,
                                 "user_views_total": 3.0}  # fmt: skip
    assert first["version"] == live and first["score"] == pytest.approx(live_score(first["features"]), abs=1e-6)
    assert first["score"] == pytest.approx(bodies[0]["score"])
    assert first["shadow"] == {candidate: pytest.approx(candidate_score(first["features"]), abs=1e-5)}
    # no item: live takes its default 0.0 for item_ctr_1h, the candidate its own 0.5; the override reaches both
    assert second["features"]["item_ctr_1h"] == 0.0 and second["features"]["user_clicks_5m"] == 9.0
    as_candidate = {**second["features"], "item_ctr_1h": 0.5}
    assert second["shadow"] == {candidate: pytest.approx(candidate_score(as_candidate), abs=1e-5)}
    assert second["score"] == pytest.approx(live_score(second["features"]), abs=1e-6)


async def test_canary_answers_its_share_sticky_per_user_and_fresh_per_rollout(fast: Settings) -> None:
    live = await register(fast)
    candidate = await register_candidate(fast)
    users = [f"cu{i}" for i in range(200)]
    async with registry_of(fast) as registry, running(create_app(fast)) as client:
        rollout = await registry.start_rollout("ctr", candidate, "canary", 0.5)  # not announced: the poll

        async def answered() -> dict[str, str]:
            got = {}
            for u in users:
                r = await client.post("/v1/predict", json={"entities": {"user_id": u, "item_id": "t1"}})
                assert r.status_code == 200, r.text
                got[u] = r.json()["version"]
            return got

        async def serves_canary() -> None:
            [m] = [m for m in (await client.get("/v1/models")).json()["models"] if m["name"] == "ctr"]
            assert m["serving_rollout"] == {"version": candidate, "stage": "canary", "share": 0.5, "id": rollout.id}

        await eventually(serves_canary, timeout=5)
        first = await answered()
        expected = {u: candidate if canary_point(rollout.id, u) < 0.5 else live for u in users}
        assert first == expected
        assert 60 <= sum(v == candidate for v in first.values()) <= 140  # roughly half (binomial, 200 users)
        assert await answered() == first  # sticky

        # raising the share keeps the same id: every canary user stays, more join
        await registry.set_stage("ctr", rollout.id, "canary", 0.8)
        await eventually(serves_canary_at(client, candidate, 0.8), timeout=5)
        wider = await answered()
        assert {u for u, v in first.items() if v == candidate} < {u for u, v in wider.items() if v == candidate}

        # a new rollout draws its users afresh
        await registry.end_rollout("ctr", rollout.id)
        again = await registry.start_rollout("ctr", candidate, "canary", 0.5)
        assert again.id != rollout.id
        await eventually(serves_canary_at(client, candidate, 0.5), timeout=5)
        fresh = await answered()
        assert fresh == {u: candidate if canary_point(again.id, u) < 0.5 else live for u in users}
        assert fresh != first


def serves_canary_at(client: Any, candidate: str, share: float, stage: str = "canary") -> Any:
    """A check that the replica behind ``client`` scores ``candidate`` in ``stage`` with ``share``."""

    async def check() -> None:
        [m] = [m for m in (await client.get("/v1/models")).json()["models"] if m["name"] == "ctr"]
        r = m["serving_rollout"]
        assert r is not None and (r["version"], r["stage"], r["share"]) == (candidate, stage, share)

    return check


async def test_a_canary_user_gets_the_candidate_and_live_goes_to_shadow(fast: Settings) -> None:
    live = await register(fast)
    candidate = await register_candidate(fast)
    await seed_u1(fast)
    async with registry_of(fast) as registry:
        rollout = await registry.start_rollout("ctr", candidate, "canary", 0.3)
    inside = next(u for u in (f"x{i}" for i in range(1000)) if canary_point(rollout.id, u) < 0.3)
    async with running(create_app(fast)) as client:
        r = await client.post("/v1/predict", json={"entities": {"user_id": inside, "item_id": "t9"}})
        # and without user_id the first entity value decides
        s = await client.post("/v1/predict", json={"entities": {"item_id": inside}})
    assert r.json()["version"] == candidate and s.json()["version"] == candidate
    records = {x["prediction_id"]: x for x in await consume(fast, "predictions", count=2)}
    rec = records[r.json()["prediction_id"]]
    assert rec["version"] == candidate
    # the candidate's inputs, and live's (all of them the candidate has too)
    assert set(rec["features"]) == set(CANDIDATE)
    assert rec["score"] == pytest.approx(candidate_score(rec["features"]), abs=1e-5)
    assert rec["score"] == pytest.approx(r.json()["score"])
    assert rec["shadow"] == {live: pytest.approx(live_score(rec["features"]), abs=1e-6)}


async def test_guard_after_promote_candidate_then_revert(fast: Settings) -> None:
    v1 = await register(fast)
    v2 = await register(fast, seed=1, promote=False)
    async with registry_of(fast) as registry, Producer(fast) as producer:
        rollout = await registry.start_rollout("ctr", v2, "shadow", producer=producer)
        guard = await registry.promote_candidate("ctr", rollout.id, guard=True, by="controller", producer=producer)
        assert guard is not None and guard.id == rollout.id
        assert (guard.stage, guard.version, guard.live, guard.share) == ("guard", v1, v2, 0.0)
        assert await registry.live_version("ctr") == v2 and await registry.history("ctr") == [v1]
        with pytest.raises(RolloutConflict, match="guard"):
            await registry.set_stage("ctr", rollout.id, "canary", 0.5)
        with pytest.raises(RolloutConflict):
            await registry.promote_candidate("ctr", rollout.id, guard=True)
        body = {"entities": {"user_id": "g1"}, "features": {"user_clicks_5m": 3, "item_ctr_1h": 0.2}}
        async with running(create_app(fast)) as client:
            resp = await client.post("/v1/predict", json=body)
            assert resp.json()["version"] == v2
            [rec] = [r for r in await consume(fast, "predictions", count=1)
                     if r["prediction_id"] == resp.json()["prediction_id"]]  # fmt: skip
            row = [rec["features"][f] for f in FEATURES]
            assert rec["version"] == v2 and rec["shadow"] == {v1: pytest.approx(live_score(rec["features"]), abs=1e-6)}
            t1 = trained(1)
            expected = float(session(t1.onnx_bytes, t1.metadata).predict(np.array([row], np.float32))[0])
            assert rec["score"] == pytest.approx(expected, abs=1e-6)

            # the controller finds v2 worse: back to v1, rollout over
            assert await registry.revert_guard("ctr", rollout.id, by="controller", producer=producer) == v1
            assert await registry.live_version("ctr") == v1 and await registry.rollout("ctr") is None
            assert await registry.history("ctr") == []  # like a rollback: v1 left the history

            async def back_on_v1() -> None:
                r = await client.post("/v1/predict", json=body)
                assert r.json()["version"] == v1

            await eventually(back_on_v1, timeout=5)
            with pytest.raises(StaleRollout):
                await registry.revert_guard("ctr", rollout.id)
        # without a guard the rollout ends with the promotion
        again = await registry.start_rollout("ctr", v2, "canary", 0.1)
        assert await registry.promote_candidate("ctr", again.id, guard=False) is None
        assert await registry.live_version("ctr") == v2 and await registry.rollout("ctr") is None
    got = await consume(fast, "models", count=5)
    assert [(r["event"], r["version"]) for r in got] == [
        ("rollout_started", v2), ("promoted", v2), ("rollout_stage", v1), ("rolled_back", v1), ("rollout_ended", v1),
    ]  # fmt: skip
    assert all(r["rollout_id"] == rollout.id for r in got[1:] if "rollout_id" in r)
    assert got[0]["rollout"]["id"] == rollout.id and got[2]["rollout"]["stage"] == "guard"
    assert got[1]["by"] == "controller" and got[4]["reason"] == "reverted"


async def test_decisions_are_compare_and_set_and_errors_are_clear(settings: Settings) -> None:
    t = trained()
    async with registry_of(settings) as registry:
        for _ in range(3):
            await registry.register("ctr", t.onnx_bytes, t.metadata)
        with pytest.raises(RolloutConflict, match="no live version"):
            await registry.start_rollout("ctr", "2")
        await registry.promote("ctr", "1")
        with pytest.raises(NotFound):
            await registry.start_rollout("ctr", "9")
        with pytest.raises(InvalidInput, match="live one"):
            await registry.start_rollout("ctr", "1")
        with pytest.raises(InvalidInput, match="canary. only"):
            await registry.start_rollout("ctr", "2", "shadow", 0.2)
        for bad in (0.0, 1.5, float("nan")):
            with pytest.raises(InvalidInput, match="canary share"):
                await registry.start_rollout("ctr", "2", "canary", bad)
        with pytest.raises(InvalidInput, match="stage"):
            await registry.start_rollout("ctr", "2", "guard")
        assert await registry.rollout("ctr") is None  # nothing half-started

        first = await registry.start_rollout("ctr", "2", by="alice")
        # the same candidate again: a stage change, same id
        same = await registry.start_rollout("ctr", "2", "canary", 0.25, by="bob")
        assert same.id == first.id and (same.stage, same.share, same.by) == ("canary", 0.25, "bob")
        with pytest.raises(RolloutConflict, match="already has a rollout: version 2 in canary"):
            await registry.start_rollout("ctr", "3")
        assert (await registry.rollout("ctr")) == same  # refused: unchanged
        second = await registry.start_rollout("ctr", "3", replace=True)
        assert second.id != first.id and second.version == "3" and second.stage == "shadow"
        # the first controller acts on what it saw: refused, nothing changed
        for stale in (
            registry.set_stage("ctr", first.id, "canary", 0.5),
            registry.end_rollout("ctr", first.id),
            registry.promote_candidate("ctr", first.id, guard=True),
        ):
            with pytest.raises(StaleRollout):
                await stale
        assert await registry.rollout("ctr") == second and await registry.live_version("ctr") == "1"
        moved = await registry.set_stage("ctr", second.id, "canary", 0.5)
        assert moved.stage == "canary" and moved.share == 0.5 and moved.id == second.id

        # a manual promote of another version ends the rollout; so does a rollback
        await registry.promote("ctr", "2")
        assert await registry.rollout("ctr") is None
        third = await registry.start_rollout("ctr", "3")
        await registry.promote("ctr", "2")  # the live one again: no change, the rollout stays
        assert await registry.rollout("ctr") == third
        await registry.rollback("ctr")
        assert await registry.rollout("ctr") is None and await registry.live_version("ctr") == "1"

        fourth = await registry.start_rollout("ctr", "3")
        ended = await registry.end_rollout("ctr")
        assert ended == fourth and await registry.end_rollout("ctr") is None
        with pytest.raises(StaleRollout):
            await registry.end_rollout("ctr", fourth.id)
        [ctr] = await registry.describe()
        assert ctr["rollout"] is None


async def test_a_replica_follows_a_rollout_started_elsewhere(fast: Settings) -> None:
    """Announced: a replica that polls rarely reacts to the models topic; not announced: the poll brings it."""
    live = await register(fast)
    candidate = await register_candidate(fast)
    slow = fast.model_copy(update={"model_poll_interval_s": 3600.0})
    async with running(create_app(slow)) as announced, running(create_app(fast)) as polled:

        def serving(client: Any, expected: dict[str, Any] | None) -> Any:
            async def check() -> None:
                [m] = [m for m in (await client.get("/v1/models")).json()["models"] if m["name"] == "ctr"]
                got = m["serving_rollout"]
                assert (got and {k: got[k] for k in ("version", "stage")}) == expected
                assert m["rollout"] == ((await client.get("/v1/models/ctr/rollout")).json()["rollout"])

            return check

        async with registry_of(fast) as registry, Producer(fast) as producer:
            await registry.start_rollout("ctr", candidate, "shadow", producer=producer)
            await eventually(serving(announced, {"version": candidate, "stage": "shadow"}), timeout=10)
            await registry.end_rollout("ctr", producer=producer)
            await eventually(serving(announced, None), timeout=10)
            await registry.start_rollout("ctr", candidate, "canary", 0.5)  # no producer: not announced
            await eventually(serving(polled, {"version": candidate, "stage": "canary"}), timeout=5)
        r = await polled.post("/v1/predict", json={"entities": {"user_id": "u1"}})
        assert r.json()["version"] in {live, candidate}


async def test_a_candidate_that_cannot_load_leaves_live_serving_alone(fast: Settings) -> None:
    live = await register(fast)
    candidate = await register_candidate(fast)
    async with registry_of(fast) as registry:
        key = f"{registry.keys.model('ctr')}:v:{candidate}"
        await registry.redis.hset(key, "onnx", linear(tuple(WEIGHTS), 0.5)[:-3])  # fails its checksum
        errors = metrics.MODEL_LOAD_ERRORS.labels(model="ctr")._value.get()
        rollout = await registry.start_rollout("ctr", candidate, "canary", 1.0)
    async with running(create_app(fast)) as client:
        resp = await client.post("/v1/predict", json={"entities": {"user_id": "u1"}})
        assert resp.status_code == 200 and resp.json()["version"] == live  # not the candidate, though share 1
        got = (await client.get("/v1/models/ctr/rollout")).json()
        assert got["rollout"]["id"] == rollout.id and got["serving"] is None
    assert metrics.MODEL_LOAD_ERRORS.labels(model="ctr")._value.get() >= errors + 1
    [rec] = [r for r in await consume(fast, "predictions", count=1)
             if r["prediction_id"] == resp.json()["prediction_id"]]  # fmt: skip
    assert rec["shadow"] == {} and rec["version"] == live


async def test_admin_routes_scopes_and_errors(make_settings: Any) -> None:
    s = make_settings(api_keys="p:predict,a:admin,r:read")
    await create_topics(s)
    live = await register(s)
    candidate = await register_candidate(s)
    admin, read, predict = ({"Authorization": f"Bearer {k}"} for k in ("a", "r", "p"))
    async with running(create_app(s)) as client:
        url = "/v1/models/ctr/rollout"
        assert (await client.get(url)).status_code == 401
        assert (await client.get(url, headers=predict)).status_code == 403
        got = await client.get(url, headers=read)
        assert got.status_code == 200 and got.json()["rollout"] is None
        assert (await client.get("/v1/models/nope/rollout", headers=read)).status_code == 404
        body = {"version": candidate, "stage": "canary", "share": 0.2}
        assert (await client.post(url, json=body)).status_code == 401
        assert (await client.post(url, json=body, headers=read)).status_code == 403
        assert (await client.delete(url, headers=read)).status_code == 403
        started = await client.post(url, json=body, headers=admin)
        assert started.status_code == 200, started.text
        record = started.json()["rollout"]
        assert record["version"] == candidate and record["stage"] == "canary" and record["share"] == 0.2
        assert record["by"].startswith("api-key:") and record["live"] == live
        assert (await client.get(url, headers=read)).json()["serving"]["version"] == candidate  # this replica, now
        [ctr] = [m for m in (await client.get("/v1/models", headers=read)).json()["models"] if m["name"] == "ctr"]
        assert ctr["rollout"] == record

        for bad, status, code in [
            ({"version": live}, 422, "invalid"),  # the live one
            ({"version": "99"}, 404, "not_found"),
            ({"version": candidate, "share": 0.3}, 422, "invalid"),  # shadow with a share
            ({"version": candidate, "stage": "canary", "share": 1.5}, 422, "invalid"),
            ({"version": candidate, "stage": "guard"}, 422, "invalid"),
            ({"version": candidate, "stage": "canary", "share": "half"}, 422, "invalid"),
        ]:
            resp = await client.post(url, json=bad, headers=admin)
            assert resp.status_code == status, (bad, resp.text)
            assert error_of(resp)["code"] == code
        other = await register(s, seed=1, promote=False)
        busy = await client.post(url, json={"version": other}, headers=admin)
        assert busy.status_code == 409 and error_of(busy)["code"] == "rollout_conflict"
        assert candidate in error_of(busy)["message"]
        replaced = await client.post(url, json={"version": other, "replace": True}, headers=admin)
        assert replaced.status_code == 200 and replaced.json()["rollout"]["version"] == other

        ended = await client.delete(url, headers=admin)
        assert ended.status_code == 200 and ended.json()["ended"]["version"] == other
        again = await client.delete(url, headers=admin)
        assert again.status_code == 404 and error_of(again)["code"] == "not_found"
        assert (await client.get(url, headers=read)).json() == {"model": "ctr", "rollout": None, "serving": None}


async def test_recommend_ranks_by_the_answering_version_and_logs_both(fast: Settings) -> None:
    live = await register(fast)
    # the candidate prefers what live does not: its score falls with the item's click rate
    meta = {"features": ["item_ctr_1h"], "task": "regression"}
    candidate = await register_candidate(fast, meta, (-1.0,))
    now = now_ms()
    events = [ev(i, "view", "x", "hot", now - 1000) for i in range(10)]
    events += [ev(i, "click", "x", "hot", now - 1000) for i in range(6)]
    events += [ev(i, "view", "x", "cold", now - 1000) for i in range(10)] + [ev(0, "click", "x", "cold", now - 1000)]
    await write_events(fast, events)
    body = {"user_id": "r1", "candidates": ["cold", "hot"], "k": 2}
    async with registry_of(fast) as registry, running(create_app(fast)) as client:
        await registry.start_rollout("ctr", candidate, "shadow")
        await eventually(serves_canary_at(client, candidate, 0.0, "shadow"), timeout=5)

        def ranked(version: str, order: list[str]) -> Any:
            async def check() -> dict[str, Any]:
                r = await client.post("/v1/recommend", json=body)
                assert r.status_code == 200, r.text
                got: dict[str, Any] = r.json()
                assert got["version"] == version and [i["item_id"] for i in got["items"]] == order
                return got

            return check

        shadowed = await eventually(ranked(live, ["hot", "cold"]), timeout=5)
        rollout = await registry.start_rollout("ctr", candidate, "canary", 1.0)  # every user: the candidate
        assert rollout.stage == "canary"
        canaried = await eventually(ranked(candidate, ["cold", "hot"]), timeout=5)
    recs = await consume(fast, "predictions", count=4)
    for response, answering, other in ((shadowed, live, candidate), (canaried, candidate, live)):
        mine = {r["item_id"]: r for r in recs if r["prediction_id"] == response["prediction_id"]}
        assert set(mine) == {"hot", "cold"}
        for item in response["items"]:
            rec = mine[item["item_id"]]
            assert rec["version"] == answering and rec["score"] == pytest.approx(item["score"])
            assert set(rec["features"]) == set(FEATURES)  # the candidate's one input is among live's
            live_s = live_score(rec["features"])
            cand_s = candidate_score(rec["features"], meta, (-1.0,))
            assert rec["shadow"] == {other: pytest.approx(cand_s if other == candidate else live_s, abs=1e-5)}
            assert rec["score"] == pytest.approx(live_s if answering == live else cand_s, abs=1e-5)
