"""Does the simulator's ``fraud`` drift break the demo fraud model, and does retraining fix it?

The ``fraud`` model (``services/rtml/demo/rtml.yaml``: user_spend_1h, user_amount_max_24h, user_purchases_5m,
user_purchases_1h) is trained exactly as ``rtml train --model fraud`` trains it: ``make_purchase_training_set``
(20 000 purchases of simulated histories, seed 0) and ``fit_classifier`` (GradientBoosting, 80 trees of
depth 3). Two measurements, ROC AUC of that model and of the same classifier retrained on post-drift data:

- ``offline``: fresh purchase histories drawn by ``rtml.simulate.world.purchase_history``, pre-drift and
  post-drift (``drift_at_ms=0``: every session follows the new pattern), with train.py's feature code;
- ``clickstream``: what a running platform sees. ``Clickstream`` with the drift at ``--pre-s`` seconds is
  replayed for ``--pre-s + --post-s`` seconds at ``--rate`` events/s over ``--users`` users; every purchase
  is scored on its four features read right after it (window semantics of the contract, windows empty at
  the start, as on a fresh platform), labelled 1 when a chargeback names it. The retrained model learns on
  the first half of the post-drift purchases and is scored on the second half (time order, like
  ``rtml train --from-examples``); the old model is scored on the same second half.

    python benchmarks/drift_experiment.py [--n 20000] [--users 20000] [--rate 200] [--pre-s 300] [--post-s 300]

Prints JSON (~11 s on 2 cores). Measured with the defaults (ROC AUC; the old model / retrained):

    offline      pre-drift 0.985   post-drift 0.708 / 0.989   (20 000 rows each, 17-19 % fraudulent)
    clickstream  pre-drift 0.874   post-drift 0.630 / 0.899   (~1 000 purchases each side, 21-27 % charged back)

On the replayed stream the first purchase of a session has empty windows (a fresh platform, sessions
minutes apart), so it tells less than in the histories' day of warm-up: both levels are lower. With few
users (``--users 1000`` at 200 events/s) each fraudster starts a session every ~2 minutes, the sessions
overlap, purchase counts alone give them away and the drift does not show (0.93 -> 0.97): run the loop
with many users per event (>= 20 per event/s).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))

from rtml.core.config import load_config  # noqa: E402
from rtml.serving import train  # noqa: E402
from rtml.serving.train import TrainingSet, fit_classifier, make_purchase_training_set  # noqa: E402
from rtml.simulate.world import Clickstream, World, purchase_history  # noqa: E402

START_MS = 1_700_000_000_000


def purchase_training_set(n: int, seed: int, *, drifted: bool = False) -> TrainingSet:
    """``make_purchase_training_set`` for the demo ``fraud`` model, from pre-drift or post-drift histories.

    train.py calls ``purchase_history(rng, fraud, span_ms)``; post-drift it gets ``drift_at_ms=0``, so the
    rows come out of exactly the same feature code.
    """
    config = load_config(train.DEMO_CONFIG)
    features = list(config.models["fraud"].features)
    defaults = train.model_defaults(config, "fraud")
    history = functools.partial(purchase_history, drift_at_ms=0 if drifted else None)
    with mock.patch.object(train, "purchase_history", history):
        return make_purchase_training_set(n, seed, config, features, defaults)


def auc(y: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(y, scores)), 3)


def offline(n: int) -> dict[str, Any]:
    clf, stats = fit_classifier(purchase_training_set(n, 0), 0)
    pre_test = purchase_training_set(n, 2)
    post_train = purchase_training_set(n, 1, drifted=True)
    post_test = purchase_training_set(n, 2, drifted=True)
    retrained, _ = fit_classifier(post_train, 0)
    return {
        "rows": n,
        "positive_rate_pre": round(float(pre_test.y.mean()), 3),
        "positive_rate_post": round(float(post_test.y.mean()), 3),
        "auc_pre_holdout": round(stats["auc"], 3),
        "auc_pre": auc(pre_test.y, clf.predict_proba(pre_test.X)[:, 1]),
        "auc_post_old_model": auc(post_test.y, clf.predict_proba(post_test.X)[:, 1]),
        "auc_post_retrained": auc(post_test.y, retrained.predict_proba(post_test.X)[:, 1]),
    }


def clickstream_rows(users: int, rate: float, pre_s: float, post_s: float, seed: int) -> dict[str, Any]:
    """Replay the stream; per purchase: (ts, features in model order, label)."""
    config = load_config(train.DEMO_CONFIG)
    features = list(config.models["fraud"].features)
    defs = [config.features[name] for name in features]
    defaults = train.model_defaults(config, "fraud")
    drift_at = START_MS + int(pre_s * 1000)
    stream = Clickstream(World(users, 200, seed, drift_at_ms=drift_at, drift=frozenset({"fraud"})))
    step = 1000.0 / rate
    purchases: list[dict[str, Any]] = []
    charged: set[str] = set()
    for k in range(int(rate * (pre_s + post_s))):
        e = stream.next_event(START_MS + int(k * step))
        if e["type"] == "purchase":
            purchases.append(e)
        elif e["type"] == "chargeback":
            charged.add(e["properties"]["purchase_id"])
    # chargebacks of the last purchases may still be scheduled: drain them
    for _ in range(len(stream._scheduled)):
        e = stream.next_event(START_MS + 10**12)
        if e["type"] == "chargeback":
            charged.add(e["properties"]["purchase_id"])
    by_user: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    rows: list[tuple[int, list[float], int]] = []
    for e in purchases:
        times, amounts = by_user[e["user_id"]]
        times.append(e["ts"])
        amounts.append(e["properties"]["amount"])
        row = []
        for name, f in zip(features, defs, strict=True):
            start = train._window_start(f, e["ts"])
            lo = 0 if start is None else bisect.bisect_left(times, start)
            v = train._purchase_value(f, amounts[lo:])
            row.append(defaults.get(name, 0.0) if math.isnan(v) else v)
        rows.append((e["ts"], row, int(e["event_id"] in charged)))
    return {"rows": rows, "drift_at": drift_at}


def clickstream(users: int, rate: float, pre_s: float, post_s: float, n: int) -> dict[str, Any]:
    clf, _ = fit_classifier(purchase_training_set(n, 0), 0)
    replay = clickstream_rows(users, rate, pre_s, post_s, seed=0)
    rows, drift_at = replay["rows"], replay["drift_at"]
    pre = [r for r in rows if r[0] < drift_at]
    post = [r for r in rows if r[0] >= drift_at]
    half = len(post) // 2

    def xy(part: list[tuple[int, list[float], int]]) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray([r[1] for r in part], np.float32), np.asarray([r[2] for r in part], np.int64)

    X_pre, y_pre = xy(pre)
    X_fit, y_fit = xy(post[:half])
    X_test, y_test = xy(post[half:])
    retrained, _ = fit_classifier(TrainingSet(X_fit, y_fit, []), 0)
    return {
        "users": users,
        "rate": rate,
        "pre_s": pre_s,
        "post_s": post_s,
        "purchases_pre": len(pre),
        "purchases_post": len(post),
        "positive_rate_pre": round(float(y_pre.mean()), 3),
        "positive_rate_post": round(float(y_test.mean()), 3),
        "auc_pre": auc(y_pre, clf.predict_proba(X_pre)[:, 1]),
        "auc_post_old_model": auc(y_test, clf.predict_proba(X_test)[:, 1]),
        "auc_post_retrained": auc(y_test, retrained.predict_proba(X_test)[:, 1]),
        "retrained_on": half,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="rows per offline set (train.py's default)")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--pre-s", type=float, default=300.0)
    parser.add_argument("--post-s", type=float, default=300.0)
    args = parser.parse_args()
    random.seed(0)
    t0 = time.perf_counter()
    out = {
        "offline": offline(args.n),
        "clickstream": clickstream(args.users, args.rate, args.pre_s, args.post_s, args.n),
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
