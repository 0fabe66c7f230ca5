"""The simulator's drift: seeded, invisible before its time, and (for ``fraud``) a pattern that breaks the demo
fraud model while staying learnable from the same four features."""

from __future__ import annotations

import functools
import hashlib
import json
import random
import statistics
from unittest import mock

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from rtml.core.config import load_config
from rtml.serving import train
from rtml.simulate.world import (
    PACED_FRAUD_GAP_MS,
    Clickstream,
    World,
    purchase_history,
    shopping_session,
)

T0 = 1_700_000_000_000
MINUTE = 60_000


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def stream_events(world: World, n: int, step_ms: int = 100, **kw: int) -> list[dict[str, object]]:
    stream = Clickstream(world, **kw)
    return [stream.next_event(T0 + t * step_ms) for t in range(n)]


def test_without_drift_the_world_draws_exactly_what_it_drew_before_drift_existed() -> None:
    # digests of the code before drift was added (commit 214665f): same seed, same events, same histories,
    # so models and tests built on a seed keep their data
    assert digest(stream_events(World(300, 40, seed=3), 20_000)) == "4da46fbf9ba9307c"
    rng = random.Random(5)
    histories = [purchase_history(rng, fraud, 3 * 86_400_000) for fraud in (False, True, False, True)]
    assert digest(histories) == "06d493f8c7b70be0"


def test_drift_is_invisible_before_its_time_and_seeded_after() -> None:
    plain = stream_events(World(300, 40, seed=3), 20_000)
    drift_at = T0 + 1_000_000  # half way through the 2 000 000 ms the events span
    drifting = World(300, 40, seed=3, drift_at_ms=drift_at, drift=frozenset({"taste", "fraud"}))
    events = stream_events(drifting, 20_000)
    assert events == stream_events(drifting, 20_000)  # seeded
    before = [e for e in events if int(str(e["ts"])) < drift_at]
    assert before == plain[: len(before)]  # the same stream up to the drift (purchases scheduled later aside)
    assert events != plain


def test_taste_drift_redraws_who_clicks_what() -> None:
    w = World(400, 80, seed=2, drift_at_ms=T0, drift=frozenset({"taste"}))
    pairs = [(u, i) for u in range(0, 400, 7) for i in range(0, 80, 3)]
    before = np.array([w.click_probability(u, i, T0 - 1) for u, i in pairs])
    after = np.array([w.click_probability(u, i, T0) for u, i in pairs])
    assert before.tolist() == [World(400, 80, seed=2).click_probability(u, i) for u, i in pairs]
    assert [w.click_probability(u, i) for u, i in pairs] == before.tolist()  # no time: the pre-drift truth
    # tastes are an independent draw: the two truths hardly agree pair by pair, yet the overall CTR stays
    assert abs(np.corrcoef(before, after)[0, 1]) < 0.7
    assert abs(before.mean() - after.mean()) < 0.03
    # the stream clicks by the new truth after the drift
    stream = Clickstream(w)
    views: dict[tuple[int, int], int] = {}
    clicks: dict[tuple[int, int], int] = {}
    for e in stream.batch(40_000, T0):
        key = (int(str(e["user_id"])[1:]), int(str(e["item_id"])[1:]))
        if e["type"] == "view":
            views[key] = views.get(key, 0) + 1
        elif e["type"] == "click":
            clicks[key] = clicks.get(key, 0) + 1
    rate = lambda ks: sum(clicks.get(k, 0) for k in ks) / sum(views[k] for k in ks)  # noqa: E731
    liked_now = [k for k in views if w.click_probability(*k, T0) > 0.4 and w.click_probability(*k) < 0.1]
    liked_before = [k for k in views if w.click_probability(*k) > 0.4 and w.click_probability(*k, T0) < 0.1]
    assert rate(liked_now) > 0.3 > 0.12 > rate(liked_before)


def test_fraud_drift_paces_fraudsters_and_leaves_honest_shoppers_alone() -> None:
    rng_a, rng_b = random.Random(1), random.Random(1)
    for _ in range(200):  # honest sessions draw the same with or without the drift
        assert shopping_session(rng_a, False) == shopping_session(rng_b, False, drifted=True)
    rng = random.Random(4)
    old = [shopping_session(rng, True) for _ in range(2_000)]
    new = [shopping_session(rng, True, drifted=True) for _ in range(2_000)]
    assert all(2 <= len(s) <= 5 for s in new)
    gaps = lambda ss: [b[0] - a[0] for s in ss for a, b in zip(s, s[1:], strict=False)]  # noqa: E731
    assert min(gaps(new)) >= PACED_FRAUD_GAP_MS[0] and max(gaps(new)) <= PACED_FRAUD_GAP_MS[1]
    assert statistics.median(gaps(old)) < 60_000
    amounts = sorted(a for s in new for _, a in s)
    assert 25 < amounts[len(amounts) // 20] and amounts[-len(amounts) // 20] < 65  # a narrow mid-size band
    old_amounts = sorted(a for s in old for _, a in s)
    iqr = lambda xs: xs[len(xs) * 3 // 4] - xs[len(xs) // 4]  # noqa: E731
    assert iqr(old_amounts) > 5 * iqr(amounts)  # bursts were of high or tiny amounts


def test_the_stream_switches_pattern_at_the_drift_and_charges_back_with_the_configured_delay() -> None:
    w = World(300, 40, seed=3, drift_at_ms=T0 + 30 * MINUTE, drift=frozenset({"fraud"}))
    fraudsters = {w.user_id(u) for u in range(w.users) if w.fraudster(u)}
    events = stream_events(w, 36_000, chargeback_delay_ms=5_000)  # 10 events/s for an hour
    purchases = [e for e in events if e["type"] == "purchase" and e["user_id"] in fraudsters]
    amounts = lambda es: sorted(float(e["properties"]["amount"]) for e in es)  # type: ignore[index]  # noqa: E731
    before = amounts(p for p in purchases if int(str(p["ts"])) < T0 + 25 * MINUTE)
    after = amounts(p for p in purchases if int(str(p["ts"])) > T0 + 35 * MINUTE)
    assert len(before) >= 20 and len(after) >= 20
    iqr = lambda xs: xs[len(xs) * 3 // 4] - xs[len(xs) // 4]  # noqa: E731
    assert iqr(after) < 25 < iqr(before)
    by_id = {e["event_id"]: e for e in events if e["type"] == "purchase"}
    chargebacks = [e for e in events if e["type"] == "chargeback"]
    assert chargebacks
    for cb in chargebacks:
        bought = by_id[cb["properties"]["purchase_id"]]  # type: ignore[index]
        assert bought["user_id"] in fraudsters and cb["ts"] == int(str(bought["ts"])) + 5_000
    with pytest.raises(ValueError):
        Clickstream(w, chargeback_delay_ms=-1)


def test_world_rejects_unknown_drift_and_drift_without_a_time() -> None:
    with pytest.raises(ValueError, match="unknown drift"):
        World(5, 5, drift_at_ms=0, drift=frozenset({"weather"}))
    with pytest.raises(ValueError, match="drift_at_ms"):
        World(5, 5, drift=frozenset({"fraud"}))


def purchase_set(n: int, seed: int, *, drifted: bool) -> train.TrainingSet:
    """train.py's own rows for the demo fraud model, from pre- or post-drift histories."""
    config = load_config(train.DEMO_CONFIG)
    features = list(config.models["fraud"].features)
    history = functools.partial(purchase_history, drift_at_ms=0 if drifted else None)
    with mock.patch.object(train, "purchase_history", history):
        return train.make_purchase_training_set(n, seed, config, features, train.model_defaults(config, "fraud"))


def test_the_fraud_drift_breaks_the_trained_model_and_retraining_recovers() -> None:
    """A small version of benchmarks/drift_experiment.py (there: 0.985 / 0.71 / 0.99 on 20 000 rows)."""
    old, _ = train.fit_classifier(purchase_set(4_000, 0, drifted=False), 0)
    new, _ = train.fit_classifier(purchase_set(4_000, 1, drifted=True), 0)
    pre, post = purchase_set(3_000, 2, drifted=False), purchase_set(3_000, 2, drifted=True)
    auc = lambda clf, ts: roc_auc_score(ts.y, clf.predict_proba(ts.X)[:, 1])  # noqa: E731
    assert auc(old, pre) > 0.95
    assert auc(old, post) < auc(old, pre) - 0.15
    assert auc(new, post) > 0.93
