"""Training: synthetic (or logged) examples -> scikit-learn gradient boosting -> ONNX bytes + metadata.

Nothing here runs on the request path: serving only ever loads the ONNX bytes with onnxruntime.
GradientBoostingClassifier is used rather than HistGradientBoosting because skl2onnx 1.20 cannot export
the latter with current onnx ("Expected an int, got a boolean"); on 3 features both are equally good.
Missing values are filled with the model's defaults (else 0.0) before training, exactly as serving
fills them, so the model never sees a NaN it was not trained on.

Synthetic data comes in two kinds. A model whose features all read a user's purchases (``fraud`` in the
demo config) trains on purchase histories drawn by the simulator's own generator (``rtml.simulate.world``):
one row per purchase, its features computed with the platform's window semantics as read right after that
purchase was ingested, labelled 1 when the buyer is a fraudster (the purchases the simulator charges back).
Any other model (``ctr``) gets generic per-aggregation columns with a logistic ground truth.
"""

from __future__ import annotations

import bisect
import getpass
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from rtml import __version__
from rtml.core.config import FeatureDef, PlatformConfig, load_config
from rtml.core.errors import InvalidInput, NotFound
from rtml.core.timeutil import now_ms
from rtml.core.values import as_float
from rtml.simulate.world import FRAUD_SHARE, purchase_history

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "demo" / "rtml.yaml"
INPUT_NAME = "input"
MIN_EXAMPLES = 50


@dataclass(frozen=True, slots=True)
class TrainingSet:
    X: np.ndarray  # float32 [n, n_features], in ``features`` order, no NaN
    y: np.ndarray  # int64 [n], 0/1
    features: list[str]


@dataclass(frozen=True, slots=True)
class TrainedModel:
    onnx_bytes: bytes
    metadata: dict[str, Any]


def model_defaults(config: PlatformConfig, model_name: str) -> dict[str, float]:
    return dict(config.models[model_name].defaults)


def _synthetic_column(rng: np.random.Generator, f: FeatureDef, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw values with NaN for "no data", their contribution to the true logit)."""
    if f.agg == "ratio":
        values = rng.beta(2.0, 18.0, n)  # CTR-like: mean 0.1
        values[rng.random(n) < 0.1] = np.nan  # items never viewed in the window
        return values, 12.0 * (np.nan_to_num(values) - 0.1)
    if f.agg in ("count", "distinct_count"):
        scale = 2.0 if f.window_ms and f.window_ms <= 600_000 else 12.0
        values = rng.poisson(rng.gamma(1.5, scale / 1.5, n)).astype(np.float64)
        # recent activity matters most; long-window breadth a little (diminishing returns)
        weight = 0.9 if f.window_ms and f.window_ms <= 600_000 else 0.15
        return values, weight * np.log1p(values)
    values = rng.lognormal(3.0, 1.0, n)
    values[rng.random(n) < 0.2] = np.nan
    return values, 0.1 * np.log1p(np.nan_to_num(values))


PURCHASE_AGGS = frozenset({"count", "sum", "mean", "min", "max", "last"})
DAY_MS = 86_400_000


def is_purchase_feature(config: PlatformConfig, f: FeatureDef) -> bool:
    """Whether ``f`` is a per-user aggregate over purchases only (so a purchase history determines it)."""
    if config.entities[f.entity].key_fields != ("user_id",) or f.agg not in PURCHASE_AGGS:
        return False
    if f.agg != "count" and f.field != "properties.amount":
        return False
    if f.events is None:  # every event type: in the simulated world only purchases carry an amount
        return f.agg != "count"
    return set(f.events) == {"purchase"}


def _window_start(f: FeatureDef, t: int) -> int | None:
    """The smallest ``ts`` a read at ``t`` includes (None: lifetime), per the contract's tile semantics."""
    if f.lifetime:
        return None
    g = f.tile_ms
    return (t // g - f.window_ms // g + 1) * g


def _purchase_value(f: FeatureDef, amounts: list[float]) -> float:
    if f.agg == "count":
        return float(len(amounts))
    if f.agg == "sum":
        return float(sum(amounts))
    if not amounts:
        return math.nan
    if f.agg == "mean":
        return sum(amounts) / len(amounts)
    if f.agg == "min":
        return min(amounts)
    if f.agg == "max":
        return max(amounts)
    return amounts[-1]  # last


def make_purchase_training_set(
    n: int, seed: int, config: PlatformConfig, features: Sequence[str], defaults: dict[str, float]
) -> TrainingSet:
    """``n`` purchases of simulated users (a ``FRAUD_SHARE`` of them fraudsters), label 1 = fraudulent.

    Each user's history is drawn by ``rtml.simulate.world.purchase_history`` over a warm-up as long as the
    longest window plus one observed day; only the observed day's purchases become rows, so every window
    is full. A row holds the features as read right after its purchase (which they therefore include).
    """
    defs = [config.features[name] for name in features]
    warmup = min(max((f.window_ms for f in defs), default=0) or DAY_MS, 7 * DAY_MS)
    rng = random.Random(seed)  # noqa: S311 - simulation only
    rows: list[list[float]] = []
    labels: list[int] = []
    while len(rows) < n:
        fraud = rng.random() < FRAUD_SHARE
        history = purchase_history(rng, fraud, warmup + DAY_MS)
        times = [t for t, _ in history]
        amounts = [a for _, a in history]
        for j in range(bisect.bisect_left(times, warmup), len(history)):
            t = times[j]
            row = []
            for name, f in zip(features, defs, strict=True):
                start = _window_start(f, t)
                lo = 0 if start is None else bisect.bisect_left(times, start)
                v = _purchase_value(f, amounts[lo : j + 1])
                row.append(defaults.get(name, 0.0) if math.isnan(v) else v)
            rows.append(row)
            labels.append(int(fraud))
            if len(rows) == n:
                break
    return TrainingSet(np.asarray(rows, np.float32).reshape(n, len(features)), np.asarray(labels, np.int64),
                       list(features))  # fmt: skip


def make_training_set(
    n: int, seed: int = 0, config: PlatformConfig | None = None, model_name: str = "ctr"
) -> TrainingSet:
    """Synthetic rows for ``model_name``: simulated purchases when every feature is a purchase feature
    (``make_purchase_training_set``), else clickstream-like columns with a logistic ground truth.

    More recent clicks and a higher item CTR mean more clicks. ``config`` defaults to the bundled demo config.
    """
    config = config or load_config(DEMO_CONFIG)
    if model_name not in config.models:
        raise NotFound(f"unknown model {model_name!r}")
    features = list(config.models[model_name].features)
    defaults = model_defaults(config, model_name)
    if all(is_purchase_feature(config, config.features[name]) for name in features):
        return make_purchase_training_set(n, seed, config, features, defaults)
    rng = np.random.default_rng(seed)
    cols = []
    logit = np.full(n, -2.2)
    for name in features:
        values, contribution = _synthetic_column(rng, config.features[name], n)
        logit += contribution
        cols.append(np.where(np.isnan(values), defaults.get(name, 0.0), values))
    p = 1.0 / (1.0 + np.exp(-logit))
    y = (rng.random(n) < p).astype(np.int64)
    X = np.column_stack(cols).astype(np.float32) if cols else np.zeros((n, 0), np.float32)
    return TrainingSet(X, y, features)


def load_examples(path: Path, features: Sequence[str], defaults: dict[str, float]) -> TrainingSet:
    """JSONL of ``{"features": {...}, "label": 0|1|float}`` (``rtml.examples`` records qualify)."""
    rows: list[list[float]] = []
    labels: list[int] = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise InvalidInput(f"cannot read examples {path}: {exc.strerror}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
            feats = record.get("features") or {}
            label = float(record["label"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise InvalidInput(f'{path}:{lineno}: expected {{"features": {{...}}, "label": 0|1}}') from None
        row = []
        for name in features:
            v = as_float(feats.get(name))
            row.append(defaults.get(name, 0.0) if v is None else v)
        rows.append(row)
        labels.append(1 if label >= 0.5 else 0)
    if len(rows) < MIN_EXAMPLES or len(set(labels)) < 2:
        raise InvalidInput(f"{path}: need at least {MIN_EXAMPLES} examples with both labels, got {len(rows)}")
    return TrainingSet(np.asarray(rows, np.float32), np.asarray(labels, np.int64), list(features))


def new_classifier(seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier

    return GradientBoostingClassifier(n_estimators=80, max_depth=3, learning_rate=0.1, random_state=seed)


def holdout_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """ROC AUC (NaN with one class) and log loss of scores ``proba`` for 0/1 labels ``y``."""
    from sklearn.metrics import log_loss, roc_auc_score

    auc = float(roc_auc_score(y, proba)) if len(set(y.tolist())) == 2 else float("nan")
    return {"auc": auc, "logloss": float(log_loss(y, np.clip(proba, 1e-15, 1 - 1e-15), labels=[0, 1]))}


def fit_classifier(ts: TrainingSet, seed: int) -> tuple[Any, dict[str, Any]]:
    from sklearn.model_selection import train_test_split

    stratify = ts.y if min(np.bincount(ts.y, minlength=2)) >= 2 else None
    X_tr, X_te, y_tr, y_te = train_test_split(ts.X, ts.y, test_size=0.2, random_state=seed, stratify=stratify)
    clf = new_classifier(seed)
    clf.fit(X_tr, y_tr)
    proba = clf.predict_proba(X_te)[:, 1]
    stats = {
        **holdout_metrics(y_te, proba),
        "n_train": len(y_tr),
        "n_holdout": len(y_te),
        "positive_rate": float(ts.y.mean()),
        # the holdout score distribution: the reference for online score drift
        "score_mean": float(proba.mean()),
        "score_quantiles": [float(q) for q in np.quantile(proba, [0.1, 0.25, 0.5, 0.75, 0.9])],
        "holdout_scores": proba,  # for ``reference_distributions``; ``train_model`` keeps it out of the metrics
    }
    return clf, stats


REFERENCE_QUANTILES = np.linspace(0.1, 0.9, 9)


def reference_bins(values: np.ndarray) -> dict[str, list[float]]:
    """The deciles of ``values`` as cut points and the share of values in each bin: ``hist[i]`` is the share of
    ``x`` with ``edges[i-1] <= x < edges[i]`` (``len(hist) == len(edges) + 1``). Cut points are values that
    occur (``method="lower"``), deduplicated: a discrete input (counts, mostly zeros) has fewer bins."""
    v = np.asarray(values, np.float64)
    edges = sorted(set(np.quantile(v, REFERENCE_QUANTILES, method="lower").tolist()))
    counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(edges) + 1)
    return {"edges": [float(e) for e in edges], "hist": [float(c) for c in counts / v.size]}


def reference_distributions(X: np.ndarray, features: Sequence[str], scores: np.ndarray) -> dict[str, Any]:
    """What feedback measures online drift against (PSI, ``rtml.feedback.qualitymath``): the holdout score
    distribution and each training input's distribution (``X`` as the model saw it, defaults filled)."""
    return {
        "score": reference_bins(scores),
        "features": {name: reference_bins(X[:, j]) for j, name in enumerate(features)},
    }


def to_onnx_bytes(clf: Any, n_features: int) -> bytes:
    """ONNX with one float32 input ``[N, n_features]`` and a plain probability tensor (no ZipMap)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(clf, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
                  options={id(clf): {"zipmap": False}})  # fmt: skip
    data: bytes = onx.SerializeToString()
    return data


def train_model(
    config: PlatformConfig,
    model_name: str = "ctr",
    examples: Path | None = None,
    *,
    n_synthetic: int = 20_000,
    seed: int = 0,
    created_by: str | None = None,
) -> TrainedModel:
    """Train ``model_name`` on ``examples`` (JSONL) or synthetic data; CPU-bound, call it in a thread."""
    if model_name not in config.models:
        raise NotFound(f"unknown model {model_name!r}: not in the platform config")
    features = list(config.models[model_name].features)
    defaults = model_defaults(config, model_name)
    if examples is not None:
        ts = load_examples(examples, features, defaults)
    else:
        ts = make_training_set(n_synthetic, seed, config, model_name)
    clf, stats = fit_classifier(ts, seed)
    holdout_scores = stats.pop("holdout_scores")
    metadata: dict[str, Any] = {
        "features": features,
        "defaults": defaults,
        "task": "binary_classification",  # the registry's default task name (registry.DEFAULT_TASK)
        "metrics": {k: v for k, v in stats.items() if not (isinstance(v, float) and math.isnan(v))},
        "reference": reference_distributions(ts.X, features, holdout_scores),
        "source": str(examples) if examples is not None else "synthetic",
        "algorithm": "sklearn.GradientBoostingClassifier",
        "created_at": now_ms(),
        "created_by": created_by or f"{current_user()} (rtml {__version__})",
    }
    return TrainedModel(to_onnx_bytes(clf, len(features)), metadata)


@dataclass(frozen=True, slots=True)
class Scorer:
    """A model version that can score a holdout: the live one, to compare a retrained candidate against."""

    version: str
    features: Sequence[str]
    defaults: dict[str, float]
    predict: Any  # float32 [n, len(features)] -> float [n]


def train_time_ordered(
    model_name: str,
    features: Sequence[str],
    defaults: dict[str, float],
    X_by: Any,
    y: np.ndarray,
    predicted_at: np.ndarray,
    *,
    live: Scorer | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    source: str = "examples",
    created_by: str | None = None,
) -> TrainedModel:
    """Train on the oldest ``1 - holdout`` of examples ordered by prediction time, evaluate on the newest.

    A random split would let the model see the future of its own holdout; in production it only ever
    scores what comes after its training data, so the holdout is the most recent slice. ``X_by(features,
    defaults)`` gives the input matrix for any feature order (the live version's may differ), ``y`` the
    0/1 labels, ``predicted_at`` their times (non-decreasing). ``live`` is scored on the same holdout and
    its numbers go into the metadata next to the candidate's (``live_auc``, ``live_logloss``), so anyone can
    see whether the candidate was better offline before it goes to shadow. CPU-bound: call it in a thread.
    """
    n = len(y)
    cut = int(n * (1.0 - holdout))
    if n < MIN_EXAMPLES or cut < 1 or cut >= n:
        raise InvalidInput(f"{model_name}: need at least {MIN_EXAMPLES} examples to train and evaluate, got {n}")
    y_tr, y_te = y[:cut], y[cut:]
    for part, labels in (("training", y_tr), ("holdout (the newest)", y_te)):
        if len(set(labels.tolist())) < 2:
            raise InvalidInput(f"{model_name}: the {part} part of {n} examples has one label only; wait for more")
    X = X_by(features, defaults)
    clf = new_classifier(seed)
    clf.fit(X[:cut], y_tr)
    proba = clf.predict_proba(X[cut:])[:, 1]
    stats: dict[str, Any] = {
        **holdout_metrics(y_te, proba),
        "n_train": cut,
        "n_holdout": n - cut,
        "positive_rate": float(y.mean()),
        "score_mean": float(proba.mean()),
        "score_quantiles": [float(q) for q in np.quantile(proba, [0.1, 0.25, 0.5, 0.75, 0.9])],
        "trained_from": int(predicted_at[0]),
        "holdout_from": int(predicted_at[cut]),
        "holdout_to": int(predicted_at[-1]),
    }
    if live is not None:
        live_x = X_by(live.features, live.defaults)[cut:]
        live_stats = holdout_metrics(y_te, np.asarray(live.predict(live_x), dtype=np.float64))
        stats["live_auc"], stats["live_logloss"] = live_stats["auc"], live_stats["logloss"]
    metadata: dict[str, Any] = {
        "features": list(features),
        "defaults": dict(defaults),
        "task": "binary_classification",
        "metrics": {k: v for k, v in stats.items() if not (isinstance(v, float) and math.isnan(v))},
        "reference": reference_distributions(X[:cut], features, proba),
        "source": source,
        "algorithm": "sklearn.GradientBoostingClassifier",
        "compared_with": live.version if live is not None else None,
        "created_at": now_ms(),
        "created_by": created_by or f"{current_user()} (rtml {__version__})",
    }
    return TrainedModel(to_onnx_bytes(clf, len(features)), metadata)


def current_user() -> str:
    """Who is acting (``created_by``, ``by`` of registry changes); "unknown" when the OS cannot say."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
