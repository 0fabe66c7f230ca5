"""The rollout verdicts: wait for enough labels, compare on the metric's own sense, each stage's outcome."""

from __future__ import annotations

import pytest

from rtml.core.config import RolloutPolicy
from rtml.feedback.rollout import gain, judge


def q(auc: float | None, log_loss: float | None = 0.5) -> dict[str, float | None]:
    return {"auc": auc, "log_loss": log_loss}


def test_gain_follows_the_metrics_sense() -> None:
    assert gain("auc", 0.8, 0.7) == pytest.approx(0.1)
    assert gain("log_loss", 0.3, 0.4) == pytest.approx(0.1)  # lower log loss is better
    assert gain("log_loss", 0.5, 0.4) == pytest.approx(-0.1)


def test_waits_for_the_stage_labels_then_for_a_defined_metric() -> None:
    p = RolloutPolicy(shadow_labels=100)
    assert judge(p, "shadow", 99, q(0.6), q(0.9)).action == "wait"
    v = judge(p, "shadow", 100, q(None), q(0.9))
    assert v.action == "wait" and "not defined" in v.reason
    assert judge(p, "shadow", 100, q(0.6), q(0.9)).action == "promote"


def test_shadow_rejects_a_candidate_that_does_not_beat_live_by_min_gain() -> None:
    p = RolloutPolicy(shadow_labels=10, min_gain=0.02)
    v = judge(p, "shadow", 10, q(0.80), q(0.81))
    assert v.action == "reject" and v.numbers["gain"] == pytest.approx(0.01)
    assert judge(p, "shadow", 10, q(0.80), q(0.83)).action == "promote"


def test_shadow_goes_to_canary_when_a_share_is_declared_and_canary_promotes() -> None:
    p = RolloutPolicy(shadow_labels=10, canary_share=0.1, canary_labels=20)
    assert judge(p, "shadow", 10, q(0.7), q(0.8)).action == "canary"
    assert judge(p, "canary", 19, q(0.7), q(0.8)).action == "wait"
    assert judge(p, "canary", 20, q(0.7), q(0.8)).action == "promote"
    assert judge(p, "canary", 20, q(0.8), q(0.7)).action == "reject"


def test_log_loss_policy_promotes_the_lower_loss() -> None:
    p = RolloutPolicy(shadow_labels=1, metric="log_loss")
    assert judge(p, "shadow", 5, q(0.9, 0.40), q(0.5, 0.30)).action == "promote"
    assert judge(p, "shadow", 5, q(0.5, 0.30), q(0.9, 0.40)).action == "reject"


def test_guard_rolls_back_only_when_the_old_version_is_better_by_more_than_max_loss() -> None:
    p = RolloutPolicy(guard_labels=50, max_loss=0.02)
    # live = the newly promoted version, other = the previous one
    assert judge(p, "guard", 49, q(0.5), q(0.9)).action == "wait"
    v = judge(p, "guard", 50, q(0.75), q(0.80))
    assert v.action == "rollback" and v.numbers["loss"] == pytest.approx(0.05)
    assert judge(p, "guard", 50, q(0.79), q(0.80)).action == "keep"


def test_auto_promote_off_stops_at_ready() -> None:
    p = RolloutPolicy(shadow_labels=1, auto_promote=False)
    assert judge(p, "shadow", 1, q(0.6), q(0.7)).action == "ready"
