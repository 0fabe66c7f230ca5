"""Online model quality, skeleton: running sums per model version, kept in one Redis hash per model.

``<prefix>{model:<name>}:quality`` holds, per version ``v``, the fields ``v|n`` (joined examples),
``v|label`` (sum of labels), ``v|score`` (sum of scores) and ``v|logloss`` (sum of per-example log loss),
updated once per joined example. They are cumulative since the hash was created (no sliding window yet),
and AUC, calibration and score drift vs training are not computed yet: they are reported as ``null``
until the issue that adds windowed sketches lands.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

from pydantic import BaseModel
from redis.asyncio.client import Pipeline

from rtml.core.redis import Keys, Redis, guarded, run_pipeline
from rtml.core.schemas import Example

EPS = 1e-15
_FIELDS = ("n", "label", "score", "logloss")


def quality_key(keys: Keys, model: str) -> str:
    return f"{keys.model(model)}:quality"


def log_loss(score: float, label: float) -> float:
    """Binary cross-entropy of one example; the score is clipped to (0, 1) so it is always finite."""
    p = min(max(score, EPS), 1.0 - EPS)
    y = min(max(label, 0.0), 1.0)
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


class VersionQuality(BaseModel):
    version: str
    count: int
    positive_rate: float | None  # mean label: the positive rate for 0/1 labels
    mean_score: float | None
    log_loss: float | None
    auc: float | None = None  # not computed yet
    calibration: float | None = None  # not computed yet
    score_drift: float | None = None  # not computed yet


class ModelQuality(BaseModel):
    model: str
    window: str = "cumulative"
    versions: list[VersionQuality]


def increments(examples: Sequence[Example]) -> dict[str, dict[str, float]]:
    """Hash field increments per model for a batch of joined examples."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for ex in examples:
        fields = out[ex.model]
        fields[f"{ex.version}|n"] += 1
        fields[f"{ex.version}|label"] += ex.label
        fields[f"{ex.version}|score"] += ex.score
        fields[f"{ex.version}|logloss"] += log_loss(ex.score, ex.label)
    return out


def summarize(model: str, raw: Mapping[str, str]) -> ModelQuality:
    """The quality report from the stored sums (unknown fields are ignored)."""
    sums: dict[str, dict[str, float]] = defaultdict(dict)
    for field, value in raw.items():
        version, sep, name = field.rpartition("|")
        if sep and name in _FIELDS:
            sums[version][name] = float(value)
    versions = []
    for version in sorted(sums):
        s = sums[version]
        n = int(s.get("n", 0))
        versions.append(
            VersionQuality(
                version=version,
                count=n,
                positive_rate=s.get("label", 0.0) / n if n else None,
                mean_score=s.get("score", 0.0) / n if n else None,
                log_loss=s.get("logloss", 0.0) / n if n else None,
            )
        )
    return ModelQuality(model=model, versions=versions)


async def record(redis: Redis, keys: Keys, examples: Sequence[Example]) -> None:
    """Add a batch of joined examples to the sums, one pipelined round trip."""
    per_model = increments(examples)
    if not per_model:
        return

    def build(pipe: Pipeline) -> None:
        for model, fields in per_model.items():
            key = quality_key(keys, model)
            for field, amount in fields.items():
                if field.endswith("|n"):
                    pipe.hincrby(key, field, int(amount))
                else:
                    pipe.hincrbyfloat(key, field, amount)

    await run_pipeline(redis, build, "quality update")


async def read(redis: Redis, keys: Keys, model: str) -> ModelQuality:
    raw = await guarded(redis.hgetall(quality_key(keys, model)), "quality read")
    return summarize(model, {_text(k): _text(v) for k, v in raw.items()})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
