"""The hot-swap benchmark's arithmetic on hand-made request timelines (no server, no timing)."""

from __future__ import annotations

from typing import Any

import pytest

from rtml.bench.swap import Marks, Rec, analyse_round, summarise

MARKS = Marks(measure=1.0, promote=5.0, promoted=5.1, end=10.0)


def ok(sent: float, received: float, version: str) -> Rec:
    return Rec(sent, received, True, version)


def test_swap_is_the_first_new_answer_after_the_last_old_one_on_the_slowest_connection() -> None:
    a = [ok(0.5, 0.6, "1"), ok(2.0, 2.01, "1"), ok(4.99, 5.2, "1"), ok(5.2, 5.3, "2"), ok(6.0, 6.01, "2")]
    # b answers new, then old once more (a lagging replica), then new for good
    b = [ok(2.0, 2.02, "1"), ok(5.0, 5.25, "2"), ok(5.3, 5.4, "1"), ok(5.4, 5.5, "2"), ok(9.0, 9.01, "2")]
    out = analyse_round([a, b], old="1", new="2", marks=MARKS, settle_s=1.0)
    assert out["swap_observed"] is True
    assert out["swap_s_per_connection"] == [0.3, 0.5]
    assert out["swap_s"] == 0.5
    assert out["old_version_after_promote_answered"] == 1  # b's 5.3 request, sent after the call answered
    assert out["versions_after_promote"] == {"1": 2, "2": 5}
    # before: sent after the warm-up, answered before the promote call; during: answered after the call,
    # sent before swap + settle (5.5 + 1.0); after: sent from then on
    assert out["before"]["n"] == 2 and out["before"]["window_s"] == 4.0
    assert out["during"]["n"] == 6 and out["during"]["window_s"] == 1.5
    assert out["after"]["n"] == 1 and out["after"]["window_s"] == 3.5
    assert out["requests"] == 10 and out["failed"] == 0 and out["error_kinds"] == {}
    assert out["req_per_s"] == pytest.approx(9 / 9.0, abs=0.1)  # the warm-up request is not counted
    assert out["promote_call_ms"] == 100.0
    assert out["p99_during_to_before"] is not None


def test_failures_are_counted_overall_and_during_the_swap() -> None:
    conn = [
        ok(1.5, 1.6, "1"),
        Rec(2.0, 2.1, False, "503"),
        Rec(5.05, 5.2, False, "ConnectionResetError"),
        ok(5.2, 5.3, "2"),
        Rec(8.0, 8.5, False, "timeout"),
    ]
    out = analyse_round([conn], old="1", new="2", marks=MARKS, settle_s=1.0)
    assert out["swap_s"] == 0.3
    assert out["failed"] == 3 and out["failed_during_swap"] == 1
    assert out["error_kinds"] == {"503": 1, "ConnectionResetError": 1, "timeout": 1}
    assert out["before"]["n"] == 1 and out["during"]["n"] == 1  # latency only of answered requests


def test_a_connection_that_never_sees_the_new_version_means_no_swap() -> None:
    new_one = [ok(5.2, 5.3, "2")]
    stuck = [ok(5.2, 5.3, "1"), ok(9.9, 9.95, "1")]
    silent: list[Rec] = []
    for conns in ([new_one, stuck], [new_one, silent]):
        out = analyse_round(conns, old="1", new="2", marks=MARKS)
        assert out["swap_observed"] is False and out["swap_s"] is None
        assert out["during"]["window_s"] == 5.0 and out["after"]["n"] == 0  # the swap window runs to the end
    assert analyse_round([], old="1", new="2", marks=MARKS)["swap_observed"] is False


def _round(swap_s: float | None, p99_before: float, p99_during: float, failed: int = 0) -> dict[str, Any]:
    return {
        "swap_observed": swap_s is not None,
        "swap_s": swap_s,
        "failed": failed,
        "failed_during_swap": failed,
        "before": {"p50_ms": 1.0, "p99_ms": p99_before},
        "during": {"p50_ms": 1.0, "p99_ms": p99_during},
        "p99_during_to_before": p99_during / p99_before,
        "promote_call_ms": 40.0,
    }


def test_summary_takes_medians_and_the_slowest_swap() -> None:
    summary, targets = summarise([_round(0.2, 10, 12), _round(4.0, 10, 30), _round(0.3, 10, 15)])
    assert summary["rounds"] == 3 and summary["swap_observed"] is True
    assert summary["swap_s_median"] == 0.3 and summary["swap_s_max"] == 4.0
    assert summary["before_p99_ms"] == 10 and summary["during_p99_ms"] == 15
    assert summary["p99_during_to_before"] == 1.5
    assert targets["swap_s"] == {"target": "<= 5", "measured": 4.0, "meets": True}
    assert targets["failed"]["meets"] is True and targets["p99_during_vs_before"]["meets"] is True


def test_summary_fails_an_unobserved_swap_and_any_failure() -> None:
    summary, targets = summarise([_round(0.2, 10, 12), _round(None, 10, 30, failed=2)])
    assert summary["swap_observed"] is False and summary["swap_s_max"] is None
    assert targets["swap_s"]["meets"] is False and "never answered" in targets["swap_s"]["note"]
    assert summary["failed"] == 2 and targets["failed"]["meets"] is False
