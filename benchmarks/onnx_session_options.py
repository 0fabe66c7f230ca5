"""Which onnxruntime session options suit rtml's models: per-call CPU and wall time of a few choices.

The model is the demo ``ctr`` one, built by rtml's own training code (``rtml.serving.train.train_model``:
scikit-learn GradientBoostingClassifier, 80 trees of depth 3 on 3 features, exported with skl2onnx, zipmap
off). Each option set gets its own session on the same bytes; every round runs each session in turn
(interleaved, so they share the machine's noise) for ``--calls`` calls of 1 row and ``--calls // 10`` calls of
100 rows, and the medians over ``--rounds`` rounds are printed as JSON with the ratios to rtml's choice.

CPU is ``time.process_time`` (every thread of this process, so a thread pool's spinning counts: on a server
it is CPU the event loop and the other services do not get); wall is ``time.perf_counter``.

Option sets:
- ``rtml``: ``rtml.serving.inference.session.session_options()`` (1 intra-op and 1 inter-op thread,
  sequential execution, ORT_ENABLE_ALL graph optimisations);
- ``disable_all``: the same with ORT_DISABLE_ALL;
- ``intra_2``: the same with ``intra_op_num_threads=2``;
- ``default``: ``ort.SessionOptions()`` untouched (a thread pool as wide as the machine, spinning on);
- ``default_no_spin``: the default with ``session.intra_op.allow_spinning=0``.

    python benchmarks/onnx_session_options.py [--rounds 7] [--calls 3000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import orjson

from rtml.core.config import load_config
from rtml.serving.inference.session import session_options
from rtml.serving.train import DEMO_CONFIG, make_training_set, train_model

BATCHES = (1, 100)


def _rtml() -> ort.SessionOptions:
    return session_options()


def _disable_all() -> ort.SessionOptions:
    opts = session_options()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def _intra_2() -> ort.SessionOptions:
    opts = session_options()
    opts.intra_op_num_threads = 2
    return opts


def _default() -> ort.SessionOptions:
    return ort.SessionOptions()


def _default_no_spin() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


OPTION_SETS: dict[str, Callable[[], ort.SessionOptions]] = {
    "rtml": _rtml,
    "disable_all": _disable_all,
    "intra_2": _intra_2,
    "default": _default,
    "default_no_spin": _default_no_spin,
}


def _time_calls(sess: ort.InferenceSession, inputs: list[np.ndarray]) -> tuple[float, float]:
    """(CPU s, wall s) per call over ``inputs``, one ``run`` each."""
    run, output = sess.run, ["probabilities"]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for x in inputs:
        run(output, {"input": x})
    return (time.process_time() - cpu0) / len(inputs), (time.perf_counter() - wall0) / len(inputs)


def measure(rounds: int, calls: int, seed: int) -> dict[str, object]:
    config = load_config(DEMO_CONFIG)
    trained = train_model(config, "ctr", seed=seed)
    rows = make_training_set(2_000, seed + 1, config, "ctr").X  # realistic inputs, not the training rows
    sessions = {
        name: ort.InferenceSession(trained.onnx_bytes, sess_options=make(), providers=["CPUExecutionProvider"])
        for name, make in OPTION_SETS.items()
    }
    inputs = {
        1: [rows[i % len(rows)][None, :] for i in range(calls)],
        100: [rows[(j * 100) % (len(rows) - 100) :][:100] for j in range(max(1, calls // 10))],
    }
    reference = sessions["rtml"].run(["probabilities"], {"input": rows})[0]
    for name, sess in sessions.items():  # same answers everywhere (optimisations must not change scores)
        got = sess.run(["probabilities"], {"input": rows})[0]
        if not np.allclose(got, reference, atol=1e-5):
            raise SystemExit(f"{name}: scores differ from rtml's session by {np.abs(got - reference).max():g}")
        for batch in BATCHES:  # warm-up: first-call allocations, thread pool start
            _time_calls(sess, inputs[batch][:200])

    cpu: dict[tuple[str, int], list[float]] = {(n, b): [] for n in sessions for b in BATCHES}
    wall: dict[tuple[str, int], list[float]] = {(n, b): [] for n in sessions for b in BATCHES}
    for r in range(rounds):
        order = list(sessions) if r % 2 == 0 else list(reversed(sessions))  # no set always goes first
        for batch in BATCHES:
            for name in order:
                c, w = _time_calls(sessions[name], inputs[batch])
                cpu[(name, batch)].append(c)
                wall[(name, batch)].append(w)

    results: dict[str, dict[str, dict[str, float]]] = {}
    for batch in BATCHES:
        med_cpu = {n: statistics.median(cpu[(n, batch)]) * 1e6 for n in sessions}
        med_wall = {n: statistics.median(wall[(n, batch)]) * 1e6 for n in sessions}
        results[f"rows_{batch}"] = {
            n: {
                "cpu_us_per_call": round(med_cpu[n], 2),
                "wall_us_per_call": round(med_wall[n], 2),
                "cpu_vs_rtml": round(med_cpu[n] / med_cpu["rtml"], 3),
                "wall_vs_rtml": round(med_wall[n] / med_wall["rtml"], 3),
            }
            for n in sessions
        }
    return {
        "bench": "onnx_session_options",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
            "onnxruntime": ort.__version__,
        },
        "model": {
            "what": "demo ctr: sklearn GradientBoostingClassifier, 80 trees, depth 3, skl2onnx (zipmap off)",
            "features": len(trained.metadata["features"]),
            "onnx_bytes": len(trained.onnx_bytes),
        },
        "params": {"rounds": rounds, "calls_1_row": len(inputs[1]), "calls_100_rows": len(inputs[100])},
        "option_sets": {
            "rtml": "rtml session_options(): intra 1, inter 1, ORT_SEQUENTIAL, ORT_ENABLE_ALL",
            "disable_all": "rtml's with ORT_DISABLE_ALL",
            "intra_2": "rtml's with intra_op_num_threads=2",
            "default": "ort.SessionOptions() untouched (thread pool of os.cpu_count(), spinning)",
            "default_no_spin": "default with session.intra_op.allow_spinning=0",
        },
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are reported")
    parser.add_argument("--calls", type=int, default=3000, help="1-row calls per set and round (100-row: a tenth)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 10:
        parser.error("need --rounds >= 1 and --calls >= 10")
    sys.stdout.write(orjson.dumps(measure(args.rounds, args.calls, args.seed), option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
