"""Online quality maths against scikit-learn and direct formulas (hypothesis drives the data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from rtml.feedback.qualitymath import (
    CAL_BINS,
    HIST_BINS,
    Bins,
    Reference,
    Sums,
    auc,
    calibration_error,
    hist_bin,
    log_loss,
    psi,
    split_versions,
    summarize,
    sums_of,
)

scores = st.floats(0.0, 1.0, allow_nan=False)
binary = st.lists(st.tuples(scores, st.sampled_from([0.0, 1.0])), min_size=1, max_size=300)
soft = st.lists(st.tuples(scores, st.floats(0.0, 1.0, allow_nan=False)), min_size=1, max_size=200)


def of(rows: list[tuple[float, float]]) -> Sums:
    return sums_of((s, y, {}) for s, y in rows)


@given(binary)
@settings(max_examples=200, deadline=None)
def test_auc_is_the_exact_auc_of_binned_scores_and_within_the_binning_bound(rows: list[tuple[float, float]]) -> None:
    y = np.array([r[1] for r in rows])
    s = np.array([r[0] for r in rows])
    got = auc(of(rows))
    if len(set(y.tolist())) < 2:
        assert got is None
        return
    assert got is not None
    binned = np.array([hist_bin(v) for v in s])
    assert got == pytest.approx(roc_auc_score(y, binned), abs=1e-12)
    # Only pairs inside one bin can be ordered differently by the raw scores; each is off by at most 1/2.
    pos = np.bincount(binned[y == 1], minlength=HIST_BINS)
    neg = np.bincount(binned[y == 0], minlength=HIST_BINS)
    bound = float((pos * neg).sum()) / (2 * pos.sum() * neg.sum())
    assert abs(got - roc_auc_score(y, s)) <= bound + 1e-12


def test_auc_of_well_separated_scores_matches_sklearn_closely() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(5_000) < 0.3).astype(float)
    s = 1 / (1 + np.exp(-(2.0 * y - 1.0 + rng.normal(0, 1.0, y.size))))
    got = auc(of(list(zip(s.tolist(), y.tolist(), strict=True))))
    assert got == pytest.approx(roc_auc_score(y, s), abs=2e-3)


@given(binary)
@settings(max_examples=200, deadline=None)
def test_log_loss_positive_rate_and_mean_score_match_sklearn(rows: list[tuple[float, float]]) -> None:
    y = [r[1] for r in rows]
    s = [r[0] for r in rows]
    m = summarize(of(rows), None)
    assert m["count"] == len(rows)
    assert m["positive_rate"] == pytest.approx(sum(y) / len(y))
    assert m["mean_score"] == pytest.approx(sum(s) / len(s))
    clipped = np.clip(s, 1e-15, 1 - 1e-15)
    assert m["log_loss"] == pytest.approx(sk_log_loss(y, clipped, labels=[0, 1]), rel=1e-9, abs=1e-12)


def test_log_loss_is_finite_even_for_certain_wrong_scores() -> None:
    assert log_loss(0.5, 1.0) == pytest.approx(math.log(2))
    assert math.isfinite(log_loss(0.0, 1.0)) and math.isfinite(log_loss(1.0, 0.0))


def direct_ece(rows: list[tuple[float, float]]) -> float:
    total = 0.0
    for b in range(CAL_BINS):
        members = [(s, y) for s, y in rows if min(int(min(max(s, 0), 1) * CAL_BINS), CAL_BINS - 1) == b]
        if members:
            mean_s = sum(s for s, _ in members) / len(members)
            mean_y = sum(y for _, y in members) / len(members)
            total += len(members) / len(rows) * abs(mean_s - mean_y)
    return total


@given(soft)
@settings(max_examples=200, deadline=None)
def test_calibration_error_is_the_expected_calibration_error_over_ten_bins(rows: list[tuple[float, float]]) -> None:
    # float labels too: the label sum, not a positive count, is what the calibration compares
    got = calibration_error(of(rows))
    assert got == pytest.approx(direct_ece(rows), abs=1e-9)


def test_bins_on_the_edges_of_the_calibration_bins_agree_with_the_histogram() -> None:
    # 0.3 * 100 = 30.000000000000004 and 0.7 * 100 = 70.0: both land where a direct computation puts them
    rows = [(0.3, 1.0), (0.7, 0.0), (1.0, 1.0), (0.0, 0.0), (0.1, 0.0)]
    assert calibration_error(of(rows)) == pytest.approx(direct_ece(rows))


def test_no_examples_and_one_class_give_none() -> None:
    m = summarize(Sums(), None)
    assert m["count"] == 0
    assert all(m[k] is None for k in ("positive_rate", "mean_score", "log_loss", "auc", "calibration", "score_drift"))
    assert summarize(of([(0.2, 1.0), (0.9, 1.0)]), None)["auc"] is None


def hand_psi(actual: list[float], expected: list[float], eps: float = 1e-4) -> float:
    total = sum(actual)
    out = 0.0
    for a, e in zip(actual, expected, strict=True):
        pa, pe = max(a / total, eps), max(e, eps)
        out += (pa - pe) * math.log(pa / pe)
    return out


def test_psi_matches_the_hand_formula() -> None:
    assert psi([10, 20, 30, 40], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.0)
    assert psi([40, 30, 20, 10], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(2 * (0.3 * math.log(4) + 0.1 * math.log(1.5)))
    # an empty bin on either side takes the floor share instead of making PSI infinite
    assert psi([0, 50, 50], [0.2, 0.4, 0.4]) == pytest.approx(hand_psi([0, 50, 50], [0.2, 0.4, 0.4]))
    assert psi([10, 0, 0], [0.0, 0.5, 0.5]) == pytest.approx(hand_psi([10, 0, 0], [0.0, 0.5, 0.5]))
    assert psi([0, 0], [0.5, 0.5]) is None


REF = Reference(
    score=Bins((0.25, 0.5, 0.75), (0.25, 0.25, 0.25, 0.25)),
    features={"a": Bins((0.0, 1.0), (0.0, 0.5, 0.5)), "b|odd:name": Bins((10.0,), (0.5, 0.5))},
    defaults={"b|odd:name": 20.0},
)


def test_drift_counts_each_value_in_its_reference_bin_and_missing_inputs_take_the_default() -> None:
    rows = [(0.1, 0.0, {"a": 0.5, "b|odd:name": None}), (0.6, 1.0, {"a": 1.0}), (0.9, 1.0, {"a": -3.0})]
    sums = sums_of(rows, REF)
    assert [sums.get(f"r:{i}") for i in range(4)] == [1.0, 0.0, 1.0, 1.0]
    assert [sums.get(f"f:{i}:a") for i in range(3)] == [1.0, 1.0, 1.0]  # bisect_right: 1.0 is in [1, inf)
    assert [sums.get(f"f:{i}:b|odd:name") for i in range(2)] == [0.0, 3.0]  # default 20
    m = summarize(sums, REF)
    assert m["score_drift"] == pytest.approx(hand_psi([1, 0, 1, 1], [0.25] * 4))
    assert m["feature_drift"]["a"] == pytest.approx(hand_psi([1, 1, 1], [0.0, 0.5, 0.5]))
    assert m["feature_drift"]["b|odd:name"] == pytest.approx(hand_psi([0, 3], [0.5, 0.5]))
    # the same examples recorded without a reference: no drift, everything else alike
    bare = summarize(sums_of(rows, None), REF)
    assert bare["score_drift"] is None and bare["feature_drift"] == {"a": None, "b|odd:name": None}
    assert bare["auc"] == m["auc"] and bare["log_loss"] == m["log_loss"]


def test_psi_is_small_for_data_drawn_like_the_reference_and_large_for_shifted_data() -> None:
    rng = np.random.default_rng(7)
    train = rng.normal(0, 1, 20_000)
    edges = sorted(set(np.quantile(train, np.linspace(0.1, 0.9, 9)).tolist()))
    hist = np.bincount(np.searchsorted(edges, train, side="right"), minlength=len(edges) + 1) / train.size
    ref = Reference(None, {"x": Bins(tuple(edges), tuple(hist.tolist()))})
    same = summarize(sums_of(((0.5, 0.0, {"x": float(v)}) for v in rng.normal(0, 1, 5_000)), ref), ref)
    shifted = summarize(sums_of(((0.5, 0.0, {"x": float(v)}) for v in rng.normal(1, 1, 5_000)), ref), ref)
    assert same["feature_drift"]["x"] < 0.02
    assert shifted["feature_drift"]["x"] > 0.25


@given(soft, soft)
@settings(max_examples=100, deadline=None)
def test_sums_are_additive_and_a_difference_of_snapshots_is_the_examples_in_between(
    first: list[tuple[float, float]], second: list[tuple[float, float]]
) -> None:
    a = sums_of(((s, y, {"a": s * 2}) for s, y in first), REF)
    b = sums_of(((s, y, {"a": s * 2}) for s, y in second), REF)
    both = sums_of(((s, y, {"a": s * 2}) for s, y in first + second), REF)
    assert (a + b).close_to(both)
    assert ((a + b) - a).close_to(b)
    assert (both - both).close_to(Sums())
    assert Sums() + a == a


def test_sums_round_trip_through_version_prefixed_hash_fields() -> None:
    a = of([(0.2, 1.0), (0.9, 0.0)])
    b = sums_of([(0.4, 1.0, {"a": 2.0})], REF)
    raw = {k: repr(v) for k, v in (a.to_hash("1|") | b.to_hash("12|")).items()}
    raw["junk"] = "1"
    got = split_versions({k.encode(): v.encode() for k, v in raw.items()})
    assert got == {"1": a, "12": b}
    assert Sums.from_hash({k: str(v) for k, v in a.fields.items()}) == a


def test_reference_from_metadata_accepts_the_training_form_and_ignores_garbage() -> None:
    md = {
        "defaults": {"a": 1.0, "bad": "x"},
        "reference": {
            "score": {"edges": [0.2, 0.5], "hist": [0.3, 0.3, 0.4]},
            "features": {"a": {"edges": [1.0], "hist": [2, 2]}, "b": {"edges": [2.0, 1.0], "hist": [1, 1, 1]}},
        },
    }
    ref = Reference.from_metadata(md)
    assert ref is not None and ref.score == Bins((0.2, 0.5), (0.3, 0.3, 0.4))
    assert ref.features == {"a": Bins((1.0,), (0.5, 0.5))}  # hist normalised; "b" has unsorted edges
    assert ref.defaults == {"a": 1.0}
    assert Reference.from_metadata({"features": ["a"]}) is None
    assert Reference.from_metadata({"reference": {"score": {"edges": [1], "hist": [1]}}}) is None
