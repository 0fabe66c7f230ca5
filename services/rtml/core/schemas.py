"""Event and message schemas (pydantic v2) shared by every service.

``EventIn`` is what a producer sends; ``Event`` is what travels on ``rtml.events``: ``event_id`` always
set, ``ts`` always epoch milliseconds. Validation that needs the clock (future timestamps) is done by
``rtml.ingest.validate.parse_events`` so the models stay pure.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

SCHEMA_VERSION = "1"
_INT64 = 2**63

Id = Annotated[str, Field(min_length=1, max_length=256)]
PropertyValue = StrictBool | StrictInt | StrictFloat | StrictStr


def parse_ts(value: object) -> int:
    """RFC 3339 string or epoch milliseconds -> epoch milliseconds."""
    if isinstance(value, bool):
        raise ValueError("ts must be an RFC 3339 string or epoch milliseconds")
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise ValueError("ts is out of range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or not -_INT64 <= value < _INT64:
            raise ValueError("ts must be finite and in range")
        return int(value)
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("ts must be RFC 3339 (e.g. 2026-01-31T12:00:00Z) or epoch ms") from None
        if dt.tzinfo is None:
            raise ValueError("ts needs a UTC offset (e.g. Z or +01:00)")
        return int(dt.timestamp() * 1000)
    raise ValueError("ts must be an RFC 3339 string or epoch milliseconds")


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: Id | None = None
    type: Annotated[str, Field(min_length=1, max_length=128)]
    user_id: Id | None = None
    item_id: Id | None = None
    ts: int | None = None
    properties: dict[Annotated[str, Field(min_length=1, max_length=128)], PropertyValue] = Field(
        default_factory=dict, max_length=128
    )

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, v: object) -> int | None:
        return None if v is None else parse_ts(v)

    @field_validator("properties")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, val in v.items():
            if isinstance(val, float) and not math.isfinite(val):
                raise ValueError(f"property {key!r} must be a finite number")
            if isinstance(val, int) and not -_INT64 <= val < _INT64:
                raise ValueError(f"property {key!r} does not fit in 64 bits")
            if isinstance(val, str) and len(val) > 4096:
                raise ValueError(f"property {key!r} is longer than 4096 characters")
        return v


class Event(BaseModel):
    """A normalised event as published on ``rtml.events``."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    type: str
    user_id: str | None = None
    item_id: str | None = None
    ts: int
    received_at: int
    source: str | None = None  # None: sent by a caller; "rule": derived by the model's label rule
    properties: dict[str, bool | int | float | str] = Field(default_factory=dict)

    def field(self, path: str) -> Any:
        """Value at a dotted path such as ``properties.amount`` or ``item_id``; None when absent."""
        if path.startswith("properties."):
            return self.properties.get(path[len("properties.") :])
        return getattr(self, path, None)


class PredictionLogged(BaseModel):
    """One prediction on ``rtml.predictions``, with the exact feature values the model saw."""

    prediction_id: str
    model: str
    version: str
    entities: dict[str, str]
    features: dict[str, float | None]
    score: float
    degraded: bool
    ts: int
    item_id: str | None = None
    # scores of the same inputs by versions that did not answer (a candidate in shadow or canary, a guard)
    shadow: dict[str, float] = Field(default_factory=dict)


class OutcomeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction_id: Id
    label: StrictBool | StrictInt | StrictFloat
    item_id: Id | None = None
    ts: int | None = None

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, v: object) -> int | None:
        return None if v is None else parse_ts(v)

    @field_validator("label")
    @classmethod
    def _label(cls, v: bool | int | float) -> bool | int | float:
        try:
            finite = math.isfinite(float(v))
        except OverflowError:
            finite = False
        if not finite:
            raise ValueError("label must be a finite number")
        return v


class Outcome(BaseModel):
    """An outcome on ``rtml.outcomes``."""

    prediction_id: str
    label: float
    item_id: str | None = None
    ts: int
    received_at: int
    source: str | None = None  # None: sent by a caller; "rule": derived by the model's label rule


class Example(BaseModel):
    """A prediction joined with its label, on ``rtml.examples``: tomorrow's training row."""

    prediction_id: str
    model: str
    version: str
    entities: dict[str, str]
    features: dict[str, float | None]
    score: float
    label: float
    predicted_at: int
    labelled_at: int
    item_id: str | None = None
    shadow: dict[str, float] = Field(default_factory=dict)  # version -> score, see PredictionLogged.shadow
