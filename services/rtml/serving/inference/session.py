"""One loaded model version: an onnxruntime session plus what serving needs to build its input.

Sessions are built from bytes (never from pickle), single-threaded and sequential: rtml's models are tiny,
so a thread pool per call costs more than the call. ``load_session`` is CPU-bound: call it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from rtml.core.errors import InvalidInput


def session_options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def load_session(onnx_bytes: bytes) -> ort.InferenceSession:
    """An InferenceSession from bytes; 422 when onnxruntime cannot load them."""
    try:
        return ort.InferenceSession(onnx_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise InvalidInput(f"not a loadable ONNX model: {str(exc).splitlines()[0][:300]}") from None


def _score_output(sess: ort.InferenceSession) -> tuple[str, int]:
    """The output holding probabilities and the column of the positive class.

    skl2onnx classifiers (zipmap off) give ``label`` and ``probabilities`` [N, 2]; a regressor or a
    hand-built model gives one float tensor [N] or [N, 1].
    """
    floats = [o for o in sess.get_outputs() if o.type == "tensor(float)"]
    if not floats:
        raise InvalidInput("the ONNX model has no float tensor output (a ZipMap output? export with zipmap=False)")
    out = next((o for o in floats if o.name == "probabilities"), floats[-1])
    shape = out.shape or []
    cols = shape[-1] if len(shape) >= 2 else 1
    return out.name, (1 if cols == 2 else 0)


@dataclass(slots=True)
class LoadedModel:
    """An immutable-by-convention model version; hot swaps replace the whole object."""

    name: str
    version: str
    features: tuple[str, ...]
    defaults: dict[str, float]
    session: ort.InferenceSession
    input_name: str
    output_name: str
    column: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Scores for a float32 [N, n_features] matrix, as float64 [N]."""
        (out,) = self.session.run([self.output_name], {self.input_name: x})
        arr = np.asarray(out)
        if arr.ndim == 2:
            arr = arr[:, self.column]
        return arr.astype(np.float64).reshape(-1)


def build_model(name: str, version: str, onnx_bytes: bytes, metadata: dict[str, Any]) -> LoadedModel:
    """Load, check the input against the metadata's feature list, and warm up with one dummy run."""
    sess = load_session(onnx_bytes)
    features = tuple(str(f) for f in metadata.get("features") or ())
    if not features:
        raise InvalidInput("model metadata needs a non-empty 'features' list (the ONNX input order)")
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise InvalidInput(f"the ONNX model must have exactly one input, it has {len(inputs)}")
    inp = inputs[0]
    if inp.type != "tensor(float)":
        raise InvalidInput(f"the ONNX input must be a float32 tensor, it is {inp.type}")
    shape = inp.shape or []
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != len(features)):
        raise InvalidInput(f"the ONNX input shape {shape} does not match {len(features)} features")
    output_name, column = _score_output(sess)
    raw_defaults = metadata.get("defaults") or {}
    defaults = {str(k): float(v) for k, v in raw_defaults.items()} if isinstance(raw_defaults, dict) else {}
    model = LoadedModel(name, version, features, defaults, sess, inp.name, output_name, column, metadata)
    try:
        model.predict(np.zeros((1, len(features)), np.float32))
    except Exception as exc:
        raise InvalidInput(f"the ONNX model fails on a dummy input: {str(exc).splitlines()[0][:300]}") from None
    return model
