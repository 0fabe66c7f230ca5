"""The join's pure decisions, without Redis: what each record leads to, given its slot."""

from __future__ import annotations

import math

import pytest

from rtml.core.schemas import Outcome, PredictionLogged
from rtml.feedback.join import OUTCOME, PREDICTION, Result, Slot, decide, is_late
from rtml.feedback.qualitymath import log_loss, summarize, sums_of

TTL = 60_000
PRED = PredictionLogged(
    prediction_id="p1", model="ctr", version="3", entities={"user_id": "u1"},
    features={"a": 1.5, "b": None}, score=0.8, degraded=False, ts=1_000_000,
)  # fmt: skip


def outcome(label: float = 1.0, ts: int = 1_000_500) -> Outcome:
    return Outcome(prediction_id="p1", label=label, ts=ts, received_at=ts)


def slot(**kw: object) -> Slot:
    base: dict[str, object] = dict(
        mine=True, stored_now=True, claim=None, claimed_now=False, prediction=None, outcome=None
    )
    base.update(kw)
    return Slot(**base)  # type: ignore[arg-type]


def paired(claim: str, claimed_now: bool, out: Outcome | None = None) -> Slot:
    return slot(
        claim=claim, claimed_now=claimed_now,
        prediction=PRED.model_dump_json().encode(), outcome=(out or outcome()).model_dump_json().encode(),
    )  # fmt: skip


def test_the_record_that_completes_the_pair_emits_the_exact_example_once_counted() -> None:
    d = decide(OUTCOME, "o:0:1", paired("o:0:1", claimed_now=True), TTL)
    assert d.result is Result.JOINED and d.count == "joined" and d.first
    assert d.example is not None
    assert d.example.features == {"a": 1.5, "b": None}
    assert (d.example.score, d.example.label, d.example.model, d.example.version) == (0.8, 1.0, "ctr", "3")
    assert (d.example.predicted_at, d.example.labelled_at) == (1_000_000, 1_000_500)


def test_a_prediction_arriving_after_its_outcome_completes_the_pair() -> None:
    d = decide(PREDICTION, "p:1:7", paired("p:1:7", claimed_now=True), TTL)
    assert d.result is Result.JOINED and d.count == "joined" and d.example is not None


def test_redelivery_of_the_completing_record_re_emits_the_same_example_without_counting() -> None:
    first = decide(OUTCOME, "o:0:1", paired("o:0:1", claimed_now=True), TTL)
    again = decide(OUTCOME, "o:0:1", paired("o:0:1", claimed_now=False), TTL)
    assert again.result is Result.JOINED and again.count is None and not again.first
    assert again.example == first.example


def test_an_outcome_without_its_prediction_is_parked_as_unmatched_and_counted_once() -> None:
    d = decide(OUTCOME, "o:0:1", slot(outcome=b"{}"), TTL)
    assert (d.result, d.count, d.example) == (Result.UNMATCHED, "unmatched", None)
    redelivered = decide(OUTCOME, "o:0:1", slot(stored_now=False, outcome=b"{}"), TTL)
    assert (redelivered.result, redelivered.count) == (Result.UNMATCHED, None)


def test_a_prediction_without_its_outcome_waits_silently() -> None:
    d = decide(PREDICTION, "p:0:1", slot(prediction=b"{}"), TTL)
    assert (d.result, d.count, d.example) == (Result.PARKED, None, None)


@pytest.mark.parametrize("claim", [None, "o:0:1"])
def test_a_second_outcome_is_a_duplicate_whether_or_not_the_first_was_joined(claim: str | None) -> None:
    d = decide(OUTCOME, "o:1:9", slot(mine=False, stored_now=False, claim=claim), TTL)
    assert (d.result, d.count, d.example) == (Result.DUPLICATE, "duplicate", None)


def test_a_redelivered_first_side_after_the_other_side_joined_does_nothing() -> None:
    d = decide(OUTCOME, "o:0:1", slot(stored_now=False, claim="p:0:4"), TTL)
    assert (d.result, d.count, d.example) == (Result.REDELIVERED, None, None)


def test_a_second_prediction_with_a_known_id_is_ignored() -> None:
    d = decide(PREDICTION, "p:0:9", slot(mine=False, stored_now=False, claim="o:0:1"), TTL)
    assert (d.result, d.count, d.example) == (Result.IGNORED, None, None)


def test_an_outcome_after_the_join_window_is_late_and_dead_lettered_not_joined() -> None:
    late = outcome(ts=PRED.ts + TTL + 1)
    d = decide(OUTCOME, "o:0:1", paired("o:0:1", claimed_now=True, out=late), TTL)
    assert (d.result, d.count, d.example) == (Result.LATE, "late", None)
    assert d.dead_letter_reason is not None and "late" in d.dead_letter_reason
    on_edge = outcome(ts=PRED.ts + TTL)
    assert not is_late(PRED, on_edge, TTL)


def test_log_loss_is_finite_even_for_certain_wrong_scores() -> None:
    assert log_loss(0.5, 1.0) == pytest.approx(math.log(2))
    assert math.isfinite(log_loss(0.0, 1.0)) and math.isfinite(log_loss(1.0, 0.0))


def test_quality_sums_summarize_a_joined_example() -> None:
    ex = decide(OUTCOME, "o:0:1", paired("o:0:1", claimed_now=True), TTL).example
    ex0 = decide(OUTCOME, "o:0:2", paired("o:0:2", claimed_now=True, out=outcome(label=0.0)), TTL).example
    assert ex is not None and ex0 is not None
    q = summarize(sums_of((e.score, e.label, e.features) for e in [ex, ex0]), None)
    assert (q["count"], q["positive_rate"]) == (2, 0.5)
    assert q["mean_score"] == pytest.approx(0.8)
    assert q["log_loss"] == pytest.approx((log_loss(0.8, 1.0) + log_loss(0.8, 0.0)) / 2)
    assert q["auc"] == 0.5 and q["calibration"] == pytest.approx(0.3)  # one bin: |1.6 - 1| / 2
    assert q["score_drift"] is None and q["feature_drift"] == {}


def test_lanes_pair_a_prediction_record_with_outcomes_for_its_item_or_for_no_item() -> None:
    from rtml.feedback.join import outcome_lane, prediction_lane

    assert prediction_lane(PRED) == "-"
    assert prediction_lane(PRED.model_copy(update={"item_id": "i9"})) == "i:i9"
    assert outcome_lane(outcome()) == "*"
    assert outcome_lane(outcome().model_copy(update={"item_id": "i9"})) == "i:i9"
    # An item literally named "*" or "-" cannot collide with the special lanes.
    assert outcome_lane(outcome().model_copy(update={"item_id": "*"})) == "i:*"
