"""join.lua against a real redis-server: every arrival order and redelivery gives one example."""

from __future__ import annotations

import itertools

import pytest

from rtml.core.redis import Keys, connect
from rtml.core.schemas import Outcome, PredictionLogged
from rtml.core.settings import Settings
from rtml.feedback.join import OUTCOME, PREDICTION, Result, decide
from rtml.feedback.store import Apply, JoinStore, slot_key

pytestmark = pytest.mark.integration

TTL = 600_000


def records(pid: str) -> dict[str, Apply]:
    pred = PredictionLogged(
        prediction_id=pid, model="ctr", version="1", entities={"user_id": "u"}, features={"f": 2.0},
        score=0.3, degraded=False, ts=1_000,
    )  # fmt: skip
    o1 = Outcome(prediction_id=pid, label=1.0, ts=2_000, received_at=2_000)
    o2 = Outcome(prediction_id=pid, label=0.0, ts=3_000, received_at=3_000)
    return {
        "P": Apply(PREDICTION, pid, pred.model_dump_json().encode(), "preds:0:5"),
        "O1": Apply(OUTCOME, pid, o1.model_dump_json().encode(), "outs:1:7"),
        "O2": Apply(OUTCOME, pid, o2.model_dump_json().encode(), "outs:0:9"),
    }


# Each order also replays its first two records, as after a crash before the commit.
ORDERS = [list(p) + list(p[:2]) for p in itertools.permutations(["P", "O1", "O2"])]


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: "-".join(o))
async def test_any_order_with_redelivery_joins_the_first_outcome_exactly_once(
    settings: Settings, order: list[str]
) -> None:
    redis = connect(settings)
    keys = Keys(settings.redis.key_prefix)
    store = JoinStore(redis, keys, TTL)
    recs = records("p-" + "-".join(order))
    try:
        first_outcome = next(r for r in order if r.startswith("O"))
        counted: list[str] = []
        labels: set[float] = set()
        for name in order:
            [slot] = await store.apply([recs[name]])
            d = decide(recs[name].side, recs[name].token, slot, TTL)
            if d.count:
                counted.append(d.count)
            if d.example is not None:
                labels.add(d.example.label)
                assert d.result is Result.JOINED
        assert labels == {1.0 if first_outcome == "O1" else 0.0}
        assert counted.count("joined") == 1
        assert counted.count("duplicate") >= 1
        ttl = await redis.pttl(slot_key(keys, recs["P"].prediction_id))
        assert 0 < ttl <= TTL
    finally:
        await redis.aclose()


async def test_a_batch_applies_in_order_in_one_round_trip(settings: Settings) -> None:
    redis = connect(settings)
    store = JoinStore(redis, Keys(settings.redis.key_prefix), TTL)
    recs = records("batch")
    try:
        batch = [recs["O1"], recs["P"], recs["O2"]]
        slots = await store.apply(batch)
        results = [decide(a.side, a.token, s, TTL).result for a, s in zip(batch, slots, strict=True)]
        assert results == [Result.UNMATCHED, Result.JOINED, Result.DUPLICATE]
        assert slots[1].outcome_token == "outs:1:7"
    finally:
        await redis.aclose()
