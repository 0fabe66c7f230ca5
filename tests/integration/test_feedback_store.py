"""join.lua against a real redis-server: every arrival order and redelivery gives one example per record."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest

from rtml.core.redis import Keys, connect
from rtml.core.schemas import Outcome, PredictionLogged
from rtml.core.settings import Settings
from rtml.feedback.join import OUTCOME, PREDICTION, Decision, Result, decide, outcome_lane, prediction_lane
from rtml.feedback.store import Apply, JoinStore, slot_key

pytestmark = pytest.mark.integration

TTL = 600_000


def pred(pid: str, item: str | None, score: float, offset: int) -> Apply:
    p = PredictionLogged(
        prediction_id=pid, model="ctr", version="1", entities={"user_id": "u", "item_id": item or ""},
        features={"f": score * 10}, score=score, degraded=False, ts=1_000, item_id=item,
    )  # fmt: skip
    return Apply(PREDICTION, pid, prediction_lane(p), p.model_dump_json().encode(), f"preds:0:{offset}")


def out(pid: str, item: str | None, label: float, offset: int) -> Apply:
    o = Outcome(prediction_id=pid, label=label, item_id=item, ts=2_000, received_at=2_000)
    return Apply(OUTCOME, pid, outcome_lane(o), o.model_dump_json().encode(), f"outs:1:{offset}")


async def run(store: JoinStore, records: list[Apply]) -> list[Decision]:
    decisions = []
    for r in records:
        [slot] = await store.apply([r])
        decisions.append(decide(r.side, r.token, slot, TTL))
    return decisions


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[JoinStore]:
    redis = connect(settings)
    yield JoinStore(redis, Keys(settings.redis.key_prefix), TTL)
    await redis.aclose()


# Each order also replays its first two records, as after a crash before the commit.
ORDERS = [list(p) + list(p[:2]) for p in itertools.permutations(["P", "O1", "O2"])]


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: "-".join(o))
async def test_any_order_with_redelivery_joins_one_outcome_exactly_once(store: JoinStore, order: list[str]) -> None:
    pid = "p-" + "-".join(order)
    # O1 names no item, O2 names the predicted item: both are outcomes of the one prediction record.
    recs = {"P": pred(pid, "i9", 0.3, 5), "O1": out(pid, None, 1.0, 7), "O2": out(pid, "i9", 0.0, 9)}
    decisions = await run(store, [recs[n] for n in order])

    labels = {d.example.label for d in decisions if d.example is not None}
    p_at = order.index("P")
    both_waiting = order.index("O1") < p_at and order.index("O2") < p_at
    winner = "O2" if both_waiting else next(n for n in order if n.startswith("O"))  # the item-naming one wins a tie
    assert labels == {1.0 if winner == "O1" else 0.0}
    counted = [d.count for d in decisions if d.count]
    assert counted.count("joined") == 1
    ttl = await store.redis.pttl(slot_key(store.keys, pid))
    assert 0 < ttl <= TTL


# Records of one prediction_id are logged in rank order on one partition: Pa always before Pb.
REC_ORDERS = [o for o in itertools.permutations(["Pa", "Pb", "Ob", "O"]) if o.index("Pa") < o.index("Pb")]


@pytest.mark.parametrize("order", REC_ORDERS, ids="-".join)
async def test_recommendation_outcomes_join_their_item_and_no_item_means_the_first(
    store: JoinStore, order: tuple[str, ...]
) -> None:
    pid = "r-" + "-".join(order)
    recs = {
        "Pa": pred(pid, "a", 0.9, 1),
        "Pb": pred(pid, "b", 0.4, 2),
        "Ob": out(pid, "b", 1.0, 3),
        "O": out(pid, None, 0.0, 4),
    }
    decisions = await run(store, [recs[n] for n in order])
    examples = {(e.entities["item_id"], e.score, e.features["f"], e.label) for d in decisions if (e := d.example)}
    assert examples == {("b", 0.4, 4.0, 1.0), ("a", 0.9, 9.0, 0.0)}


async def test_a_batch_applies_in_order_in_one_round_trip(store: JoinStore) -> None:
    batch = [out("batch", None, 1.0, 1), pred("batch", None, 0.5, 2), out("batch", None, 0.0, 3)]
    slots = await store.apply(batch)
    results = [decide(a.side, a.token, s, TTL).result for a, s in zip(batch, slots, strict=True)]
    assert results == [Result.UNMATCHED, Result.JOINED, Result.DUPLICATE]
    assert slots[1].outcome_token == "outs:1:1"
