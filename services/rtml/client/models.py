"""Typed results of :mod:`rtml.client` (pydantic models, frozen).

Fields a newer server adds are kept (``extra="allow"``: read them from ``model_extra``), so an older client
keeps working against a newer platform.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Accepted(_Result):
    """What ``send_events`` achieved: ``accepted`` events, their ``event_ids`` in the order given (generated
    client-side where absent) and the number of HTTP ``requests`` the batch was split into."""

    accepted: int
    event_ids: list[str] = Field(default_factory=list)
    requests: int = 1


class Prediction(_Result):
    prediction_id: str
    model: str
    version: str
    score: float
    degraded: bool


class RankedItem(_Result):
    item_id: str
    score: float


class Recommendation(_Result):
    prediction_id: str
    items: list[RankedItem]
    model: str
    version: str
    degraded: bool = False


class ModelVersion(_Result):
    version: str
    live: bool = False
    sha256: str | None = None
    size: int = 0
    created_at: int = 0
    created_by: str | None = None
    features: list[str] | None = None
    defaults: dict[str, float] = Field(default_factory=dict)
    task: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)  # numbers, also lists (e.g. score_quantiles)


class Rollout(_Result):
    """A candidate in ``shadow``/``canary``, or the ``guard`` kept after a promotion."""

    version: str
    stage: str
    share: float = 0.0
    since: int = 0
    id: str = ""
    by: str | None = None
    live: str | None = None


class ModelInfo(_Result):
    """One model of ``GET /v1/models``: its versions, the live one, and what the answering replica serves."""

    name: str
    live_version: str | None = None
    history: list[str] = Field(default_factory=list)
    versions: list[ModelVersion] = Field(default_factory=list)
    rollout: Rollout | None = None
    serving_version: str | None = None
    serving_rollout: dict[str, Any] | None = None

    def version(self, version: str) -> ModelVersion | None:
        return next((v for v in self.versions if v.version == version), None)


class RolloutState(_Result):
    """``GET /v1/models/{name}/rollout``: the running rollout (None when none) and this replica's part in it."""

    model: str
    rollout: Rollout | None = None
    serving: dict[str, Any] | None = None


class Promoted(_Result):
    model: str
    version: str
    live: bool = True


class VersionQuality(_Result):
    version: str
    count: int
    positive_rate: float | None = None
    mean_score: float | None = None
    log_loss: float | None = None
    auc: float | None = None
    calibration: float | None = None
    score_drift: float | None = None
    feature_drift: dict[str, float | None] = Field(default_factory=dict)


class Quality(_Result):
    """Online quality per version over the model's quality window (empty ``versions``: no label yet)."""

    model: str
    window: str
    window_ms: int
    as_of: int
    versions: list[VersionQuality] = Field(default_factory=list)

    def of(self, version: str) -> VersionQuality | None:
        return next((v for v in self.versions if v.version == version), None)


class Decision(_Result):
    """One learning-loop decision (``retrained``, ``promote``, ``reject``, ...) with the numbers it used."""

    ts: int
    model: str
    decision: str
    reason: str = ""
    numbers: dict[str, Any] = Field(default_factory=dict)


class Features(_Result):
    """``GET /v1/features/{entity}/{id}``: feature values as of ``as_of`` (epoch ms)."""

    entity: str
    id: str
    as_of: int
    features: dict[str, Any]
