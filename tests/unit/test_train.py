"""Training: synthetic data shape, ONNX export fidelity, examples loading, metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from rtml.core.config import load_config
from rtml.core.errors import InvalidInput, NotFound
from rtml.serving.inference.session import build_model, load_session
from rtml.serving.train import DEMO_CONFIG, fit_classifier, make_training_set, to_onnx_bytes, train_model

CONFIG = load_config(DEMO_CONFIG)


def test_training_set_follows_the_config_order_and_has_no_nan() -> None:
    ts = make_training_set(5_000, seed=1)
    assert ts.features == list(CONFIG.models["ctr"].features)
    assert ts.X.shape == (5_000, 3) and ts.X.dtype == np.float32
    assert not np.isnan(ts.X).any()
    assert 0.05 < ts.y.mean() < 0.6  # both classes, plausibly imbalanced


def test_ground_truth_is_plausible() -> None:
    ts = make_training_set(20_000, seed=2)
    clicks, ctr = ts.X[:, 0], ts.X[:, 1]
    assert ts.y[clicks >= np.quantile(clicks, 0.8)].mean() > ts.y[clicks <= np.quantile(clicks, 0.2)].mean()
    assert ts.y[ctr >= np.quantile(ctr, 0.8)].mean() > ts.y[ctr <= np.quantile(ctr, 0.2)].mean()


def test_onnx_agrees_with_sklearn() -> None:
    ts = make_training_set(4_000, seed=3)
    clf, _ = fit_classifier(ts, seed=3)
    sess = load_session(to_onnx_bytes(clf, 3))
    rng = np.random.default_rng(0)
    rows = np.column_stack([rng.poisson(3, 500), rng.random(500), rng.poisson(15, 500)]).astype(np.float32)
    rows = np.vstack([rows, ts.X[:500]])
    (probs,) = sess.run(["probabilities"], {"input": rows})
    np.testing.assert_allclose(probs[:, 1], clf.predict_proba(rows)[:, 1], atol=1e-4)


def test_train_model_metadata_and_loadable() -> None:
    trained = train_model(CONFIG, "ctr", n_synthetic=5_000)
    md = trained.metadata
    assert md["features"] == ["user_clicks_5m", "item_ctr_1h", "user_items_24h"]
    assert md["defaults"] == {"item_ctr_1h": 0.0}
    assert md["task"] == "binary_classification"
    assert md["metrics"]["auc"] > 0.6 and md["metrics"]["logloss"] > 0
    assert md["created_at"] > 0 and md["created_by"]
    model = build_model("ctr", "1", trained.onnx_bytes, md)
    scores = model.predict(np.array([[0, 0.0, 0], [20, 0.5, 10]], np.float32))
    assert scores.shape == (2,) and 0 <= scores[0] < scores[1] <= 1


def test_train_from_examples(tmp_path: Path) -> None:
    ts = make_training_set(400, seed=4)
    path = tmp_path / "examples.jsonl"
    lines = [
        orjson.dumps({"features": dict(zip(ts.features, map(float, row), strict=True)), "label": int(label)})
        for row, label in zip(ts.X, ts.y, strict=True)
    ]
    lines.append(orjson.dumps({"features": {"user_clicks_5m": 3, "item_ctr_1h": None}, "label": 1.0}))
    path.write_bytes(b"\n".join(lines) + b"\n")
    trained = train_model(CONFIG, "ctr", path)
    assert trained.metadata["source"] == str(path)
    assert trained.metadata["metrics"]["n_train"] + trained.metadata["metrics"]["n_holdout"] == 401


def test_bad_examples_and_unknown_model(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"features": {}}\n')
    with pytest.raises(InvalidInput):
        train_model(CONFIG, "ctr", path)
    with pytest.raises(NotFound):
        train_model(CONFIG, "nope")


def test_non_onnx_bytes_are_refused() -> None:
    import pickle

    with pytest.raises(InvalidInput):
        load_session(pickle.dumps({"a": 1}))
    with pytest.raises(InvalidInput):
        build_model("ctr", "1", b"not a model", {"features": ["a"]})


FRAUD_FEATURES = ["user_spend_1h", "user_amount_max_24h", "user_purchases_5m", "user_purchases_1h"]


def test_fraud_training_set_is_simulated_purchases() -> None:
    ts = make_training_set(6_000, seed=5, model_name="fraud")
    assert ts.features == FRAUD_FEATURES == list(CONFIG.models["fraud"].features)
    assert ts.X.shape == (6_000, 4) and ts.X.dtype == np.float32 and not np.isnan(ts.X).any()
    assert 0.05 < ts.y.mean() < 0.4  # both labels, fraud the minority
    spend, amax, n5m, n1h = ts.X.T
    # each row is read right after its purchase, so its own purchase is in every window
    assert (n5m >= 1).all() and (n1h >= n5m).all() and (amax > 0).all() and (spend > 0).all()
    # the simulator's pattern: fraudsters buy faster and for more
    fraud, honest = ts.y == 1, ts.y == 0
    assert n5m[fraud].mean() > 1.5 * n5m[honest].mean()
    assert np.median(amax[fraud]) > 2 * np.median(amax[honest])
    assert make_training_set(500, seed=5, model_name="fraud").X.tolist() == ts.X[:500].tolist()  # seeded


def test_fraud_model_separates_bursts_of_high_amounts() -> None:
    trained = train_model(CONFIG, "fraud", n_synthetic=8_000, seed=1)
    md = trained.metadata
    assert md["features"] == FRAUD_FEATURES and md["defaults"] == {"user_amount_max_24h": 0.0}
    assert md["metrics"]["auc"] >= 0.85 and md["metrics"]["n_holdout"] == 1_600
    assert 0.05 < md["metrics"]["positive_rate"] < 0.4
    sess = load_session(trained.onnx_bytes)
    rows = np.array(
        [
            [25.0, 25.0, 1, 1],  # one ordinary purchase
            [400.0, 150.0, 4, 4],  # four purchases for 100+ within five minutes
        ],
        np.float32,
    )
    (probs,) = sess.run(["probabilities"], {"input": rows})
    assert probs[0, 1] < 0.2 < 0.8 < probs[1, 1]
    model = build_model("fraud", "1", trained.onnx_bytes, md)
    low, high = model.predict(rows)
    assert low < high


def test_a_model_mixing_purchase_and_click_features_gets_generic_columns() -> None:
    cfg = CONFIG.model_copy(
        update={
            "models": {"mix": CONFIG.models["ctr"].model_copy(update={"features": ("user_spend_1h", "user_clicks_5m")})}
        }
    )
    ts = make_training_set(2_000, seed=1, config=cfg, model_name="mix")
    assert ts.features == ["user_spend_1h", "user_clicks_5m"] and 0 < ts.y.mean() < 1


def test_metadata_holds_the_training_reference_distributions_feedback_measures_drift_against() -> None:
    from rtml.feedback.qualitymath import Reference
    from rtml.serving.registry import validate_metadata

    trained = train_model(CONFIG, "ctr", n_synthetic=5_000)
    ref = trained.metadata["reference"]
    assert set(ref["features"]) == set(trained.metadata["features"])
    for bins in [ref["score"], *ref["features"].values()]:
        assert len(bins["hist"]) == len(bins["edges"]) + 1
        assert bins["edges"] == sorted(set(bins["edges"]))
        assert sum(bins["hist"]) == pytest.approx(1.0)
    # holdout scores are continuous: ten bins of about a tenth each
    assert len(ref["score"]["edges"]) == 9 and max(ref["score"]["hist"]) < 0.15
    # recent clicks are small counts: deduplicated decile edges, every edge a value that occurs
    clicks = ref["features"]["user_clicks_5m"]
    assert len(clicks["edges"]) < 9 and all(e == int(e) for e in clicks["edges"])
    assert "holdout_scores" not in trained.metadata["metrics"]
    # the registry keeps it as it is and feedback reads it back
    parsed = Reference.from_metadata(orjson.loads(orjson.dumps(validate_metadata(trained.metadata))))
    assert parsed is not None and parsed.score is not None and set(parsed.features) == set(ref["features"])


def test_reference_bins_put_each_value_in_the_bin_its_edges_say() -> None:
    from rtml.serving.train import reference_bins

    values = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3, 9], np.float32)
    bins = reference_bins(values)
    assert bins["edges"] == [0.0, 1.0, 2.0, 3.0]  # deciles 0,0,0,0,0,1,1,2,3 (lower), deduplicated
    assert bins["hist"] == pytest.approx([0.0, 0.5, 0.2, 0.1, 0.2])  # [0,1) [1,2) [2,3) [3,inf)
    constant = reference_bins(np.full(50, 4.0))
    assert constant == {"edges": [4.0], "hist": [0.0, 1.0]}
