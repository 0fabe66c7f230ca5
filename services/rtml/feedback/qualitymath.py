"""Online quality maths, pure (no Redis): additive sums of labelled examples and the metrics drawn from them.

A ``Sums`` is a bag of named float counters. It is additive: the sums of two sets of examples is the ``+``
of their sums, and the difference of two cumulative snapshots is the sums of the examples in between. That
is what lets quality live in Redis as plain hash counters (``HINCRBYFLOAT``), per time tile, summed over
the tiles of a window at read time. The fields (all counts and sums are weights of examples):

- ``n`` examples, ``y`` sum of labels, ``s`` sum of scores, ``ll`` sum of per-example log loss;
- ``h1:<i>`` / ``h0:<i>`` examples with label >= 0.5 / < 0.5 whose score falls in bin ``i`` of
  ``HIST_BINS`` equal-width bins on [0, 1] (AUC, with ties inside a bin counted half);
- ``cs:<b>`` / ``cy:<b>`` sum of scores / labels of the examples in calibration bin ``b`` of ``CAL_BINS``
  equal-width bins (a calibration bin is ``HIST_BINS // CAL_BINS`` histogram bins, so the bin counts are
  in the histogram);
- ``r:<i>`` examples whose score falls in bin ``i`` of the version's training score reference;
- ``f:<i>:<feature>`` examples whose value of ``feature`` falls in bin ``i`` of that feature's reference.

The reference bins come from the training metadata (``metadata["reference"]``, see
``rtml.serving.train.reference_distributions``): ``edges`` are ascending interior cut points and ``hist[i]``
the training share of values ``x`` with ``edges[i-1] <= x < edges[i]`` (``len(hist) == len(edges) + 1``);
``bin_index`` is ``bisect_right(edges, x)``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

EPS = 1e-15  # log loss: scores clipped to (EPS, 1 - EPS)
PSI_EPS = 1e-4  # PSI: an empty bin counts as this share (the usual floor; PSI is infinite otherwise)
HIST_BINS = 100
CAL_BINS = 10
_PER_CAL = HIST_BINS // CAL_BINS


def log_loss(score: float, label: float) -> float:
    """Binary cross-entropy of one example; the score is clipped to (0, 1) so it is always finite."""
    p = min(max(score, EPS), 1.0 - EPS)
    y = min(max(label, 0.0), 1.0)
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def hist_bin(score: float) -> int:
    """The equal-width histogram bin of a score (clipped to [0, 1]; 1.0 is in the last bin)."""
    return min(int(min(max(score, 0.0), 1.0) * HIST_BINS), HIST_BINS - 1)


@dataclass(frozen=True, slots=True)
class Bins:
    """One reference distribution: interior cut points and the training share of each bin."""

    edges: tuple[float, ...]
    hist: tuple[float, ...]

    def index(self, x: float) -> int:
        return bisect.bisect_right(self.edges, x)

    @classmethod
    def parse(cls, raw: Any) -> Bins | None:
        """From ``{"edges": [...], "hist": [...]}``; None when malformed (a user's metadata may hold anything)."""
        if not isinstance(raw, Mapping):
            return None
        edges, hist = raw.get("edges"), raw.get("hist")
        if not isinstance(edges, list) or not isinstance(hist, list) or len(hist) != len(edges) + 1:
            return None
        if not all(_finite(v) for v in edges) or not all(_finite(v) and v >= 0 for v in hist):
            return None
        e = tuple(float(v) for v in edges)
        if any(a >= b for a, b in zip(e, e[1:], strict=False)) or sum(hist) <= 0:
            return None
        total = float(sum(hist))
        return cls(e, tuple(float(v) / total for v in hist))


@dataclass(frozen=True, slots=True)
class Reference:
    """What a version was trained on: its holdout score distribution and each input's distribution.

    ``defaults`` fill a missing input exactly as serving does before scoring (else 0.0)."""

    score: Bins | None
    features: dict[str, Bins]
    defaults: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Reference | None:
        """The reference stored by training, or None for a version without one (uploaded by a user)."""
        ref = metadata.get("reference")
        if not isinstance(ref, Mapping):
            return None
        score = Bins.parse(ref.get("score"))
        raw_features = ref.get("features")
        features: dict[str, Bins] = {}
        if isinstance(raw_features, Mapping):
            for name, raw in raw_features.items():
                bins = Bins.parse(raw)
                if bins is not None:
                    features[str(name)] = bins
        if score is None and not features:
            return None
        raw_defaults = metadata.get("defaults")
        defaults: dict[str, float] = {}
        if isinstance(raw_defaults, Mapping):
            defaults = {str(k): float(v) for k, v in raw_defaults.items() if _finite(v)}
        return cls(score, features, defaults)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class Sums:
    """Additive sums of labelled examples (see the module doc for the fields). Zero fields are not kept."""

    __slots__ = ("fields",)

    def __init__(self, fields: Mapping[str, float] | None = None) -> None:
        self.fields: dict[str, float] = {k: float(v) for k, v in (fields or {}).items() if v}

    def __add__(self, other: Sums) -> Sums:
        out = dict(self.fields)
        for k, v in other.fields.items():
            out[k] = out.get(k, 0.0) + v
        return Sums(out)

    def __sub__(self, other: Sums) -> Sums:
        out = dict(self.fields)
        for k, v in other.fields.items():
            out[k] = out.get(k, 0.0) - v
        return Sums(out)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sums) and self.fields == other.fields

    def __hash__(self) -> int:
        return hash(frozenset(self.fields.items()))

    def __repr__(self) -> str:
        return f"Sums(n={self.n:g}, fields={len(self.fields)})"

    def get(self, name: str) -> float:
        return self.fields.get(name, 0.0)

    @property
    def n(self) -> float:
        return self.get("n")

    def close_to(self, other: Sums, rel: float = 1e-9) -> bool:
        """Equal up to float rounding (sums built in another order differ in the last bits)."""
        keys = self.fields.keys() | other.fields.keys()
        return all(math.isclose(self.get(k), other.get(k), rel_tol=rel, abs_tol=1e-9) for k in keys)

    # -- Redis hash fields ------------------------------------------------------------------------------------
    def to_hash(self, prefix: str = "") -> dict[str, float]:
        """Hash fields (``prefix`` + name, e.g. ``"3|n"`` for version 3) and their values."""
        return {prefix + k: v for k, v in self.fields.items()}

    @classmethod
    def from_hash(cls, raw: Mapping[str, str | float]) -> Sums:
        """From hash fields without a prefix (values as Redis returns them, text)."""
        return cls({k: float(v) for k, v in raw.items()})


def split_versions(raw: Mapping[bytes | str, bytes | str | float]) -> dict[str, Sums]:
    """A hash whose fields are ``<version>|<name>`` -> the Sums of each version (other fields ignored).
    Versions are the registry's (``1``, ``2``, ...); a feature name in ``<name>`` may hold any character."""
    per: dict[str, dict[str, float]] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        version, sep, name = key.partition("|")
        if not sep or not version:
            continue
        try:
            value = float(v)
        except ValueError:
            continue
        fields = per.setdefault(version, {})
        fields[name] = fields.get(name, 0.0) + value
    return {version: Sums(fields) for version, fields in per.items()}


def add_example(
    acc: dict[str, float],
    score: float,
    label: float,
    features: Mapping[str, float | None],
    reference: Reference | None,
) -> None:
    """Add one labelled example's increments to ``acc`` (field -> amount), in place.

    Inputs missing from ``features`` (or None) take the reference's defaults, else 0.0, as serving fills
    them. Without a reference there are no ``r:``/``f:`` fields."""
    h = hist_bin(score)
    c = h // _PER_CAL
    for name, amount in (
        ("n", 1.0),
        ("y", label),
        ("s", score),
        ("ll", log_loss(score, label)),
        (f"h{1 if label >= 0.5 else 0}:{h}", 1.0),
        (f"cs:{c}", score),
        (f"cy:{c}", label),
    ):
        acc[name] = acc.get(name, 0.0) + amount
    if reference is None:
        return
    if reference.score is not None:
        name = f"r:{reference.score.index(score)}"
        acc[name] = acc.get(name, 0.0) + 1.0
    for feature, bins in reference.features.items():
        value = features.get(feature)
        if value is None or not math.isfinite(value):
            value = reference.defaults.get(feature, 0.0)
        name = f"f:{bins.index(value)}:{feature}"
        acc[name] = acc.get(name, 0.0) + 1.0


def sums_of(
    examples: Iterable[tuple[float, float, Mapping[str, float | None]]], reference: Reference | None = None
) -> Sums:
    """The Sums of ``(score, label, features)`` examples."""
    acc: dict[str, float] = {}
    for score, label, features in examples:
        add_example(acc, score, label, features, reference)
    return Sums(acc)


# -- metrics ----------------------------------------------------------------------------------------------------
def auc(sums: Sums) -> float | None:
    """ROC AUC from the label-split histogram, ties inside a bin counted half: exactly the AUC of the scores
    replaced by their bin. Differs from the AUC of the raw scores by at most ``sum_i P_i N_i / (2 P N)``
    (only pairs inside one bin can be ordered differently). None without both classes."""
    pos = [sums.get(f"h1:{i}") for i in range(HIST_BINS)]
    neg = [sums.get(f"h0:{i}") for i in range(HIST_BINS)]
    p_total, n_total = sum(pos), sum(neg)
    if p_total <= 0 or n_total <= 0:
        return None
    below = 0.0
    wins = 0.0
    for p, q in zip(pos, neg, strict=True):
        wins += p * (below + 0.5 * q)
        below += q
    return wins / (p_total * n_total)


def calibration_error(sums: Sums) -> float | None:
    """Expected calibration error over ``CAL_BINS`` equal-width score bins: sum over bins of
    ``count_b / n * |mean score_b - mean label_b|`` = ``sum_b |score sum_b - label sum_b| / n``."""
    n = sums.n
    if n <= 0:
        return None
    return sum(abs(sums.get(f"cs:{b}") - sums.get(f"cy:{b}")) for b in range(CAL_BINS)) / n


def psi(counts: Iterable[float], expected: Iterable[float]) -> float | None:
    """Population stability index of observed ``counts`` against ``expected`` shares (same bins): sum of
    ``(a - e) * ln(a / e)`` over the bins, each share floored at ``PSI_EPS``. None without observations."""
    c = list(counts)
    e = list(expected)
    total = sum(c)
    if total <= 0 or len(c) != len(e):
        return None
    out = 0.0
    for count, share in zip(c, e, strict=True):
        a = max(count / total, PSI_EPS)
        b = max(share, PSI_EPS)
        out += (a - b) * math.log(a / b)
    return out


def bin_counts(sums: Sums, prefix: str, bins: int, suffix: str = "") -> list[float]:
    return [sums.get(f"{prefix}{i}{suffix}") for i in range(bins)]


def summarize(sums: Sums, reference: Reference | None) -> dict[str, Any]:
    """The metrics of a set of labelled examples: ``count``, ``positive_rate`` (mean label), ``mean_score``,
    ``log_loss``, ``auc``, ``calibration`` (ECE), ``score_drift`` (PSI against the training scores) and
    ``feature_drift`` (PSI of each input against training). None where undefined: no examples, one class
    for AUC, no reference (or no example recorded against it) for PSI."""
    n = sums.n
    out: dict[str, Any] = {
        "count": int(round(n)),
        "positive_rate": sums.get("y") / n if n > 0 else None,
        "mean_score": sums.get("s") / n if n > 0 else None,
        "log_loss": sums.get("ll") / n if n > 0 else None,
        "auc": auc(sums),
        "calibration": calibration_error(sums),
        "score_drift": None,
        "feature_drift": {},
    }
    if reference is not None:
        if reference.score is not None:
            out["score_drift"] = psi(bin_counts(sums, "r:", len(reference.score.hist)), reference.score.hist)
        out["feature_drift"] = {
            name: psi(bin_counts(sums, "f:", len(bins.hist), f":{name}"), bins.hist)
            for name, bins in sorted(reference.features.items())
        }
    return out
