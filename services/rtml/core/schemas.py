"""Event and message schemas (pydantic v2) shared by every service.

``EventIn`` is what a producer sends; ``Event`` is what travels on ``rtml.events``: ``event_id`` always
set, ``ts`` always epoch milliseconds. Validation that needs the clock (future timestamps) is done by
``rtml.ingest.validate.parse_events`` so the models stay pure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
    WithJsonSchema,
    field_validator,
)

SCHEMA_VERSION = "1"
SCHEMA_HEADER = "rtml-schema"  # the record header that carries SCHEMA_VERSION (rtml.core.kafka sets it)
_INT64 = 2**63
MAX_ID = 256  # the longest id (event, user, item, prediction) any route or topic accepts

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID)]
PropertyValue = StrictBool | StrictInt | StrictFloat | StrictStr

# What travels on the topics is validated again by every consumer (a record may come from anything that can
# publish, not only from rtml's own validated HTTP routes): the same bounds as the HTTP schemas, checked by
# pydantic-core itself (no Python validator on the hot path). ``allow_inf_nan=False`` on every topic model: a
# NaN or infinity (which the JSON parser accepts as the literals NaN/Infinity) never reaches a feature, a
# score, a label or the quality sums; such a record is dead-lettered by the consumer that decodes it.
Int64 = Annotated[int, Field(ge=-_INT64, lt=_INT64)]
_TOPIC = ConfigDict(allow_inf_nan=False)
_PropertyKey = Annotated[str, Field(min_length=1, max_length=128)]
_TopicId = Annotated[str, Field(max_length=MAX_ID)]  # an entity id (the planner skips empty ones)
_TopicProperty = bool | Int64 | float | Annotated[str, Field(max_length=4096)]
_SCHEMA_BYTES = SCHEMA_VERSION.encode()


def schema_mismatch(headers: Iterable[tuple[str, bytes]] | None) -> str | None:
    """Why a consumer cannot read a record, judging by its ``rtml-schema`` header; None when it can.

    A record carrying another schema version than this code's is refused (it would be misread). A record
    without the header is read (it comes from a producer that is not rtml's; its shape is validated anyway).
    """
    for name, value in headers or ():
        if name == SCHEMA_HEADER:
            if value == _SCHEMA_BYTES:
                return None
            shown = bytes(value or b"")[:64].decode("utf-8", "replace")
            return f"unsupported {SCHEMA_HEADER} header {shown!r}: this consumer reads version {SCHEMA_VERSION!r}"
    return None


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


# ``ts`` as callers may send it (parse_ts): epoch milliseconds or an RFC 3339 string with an offset; published
# as such in the OpenAPI document, which clients generate code from
TsIn = Annotated[
    int | None,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": -_INT64, "maximum": _INT64 - 1},
                {"type": "number", "minimum": -_INT64, "maximum": _INT64 - 1},
                {"type": "string", "format": "date-time"},
                {"type": "null"},
            ],
            "description": "epoch ms, or RFC 3339 with an offset (2026-01-31T12:00:00Z); default: receive time",
        }
    ),
]


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: Id | None = None
    type: Annotated[str, Field(min_length=1, max_length=128)]
    user_id: Id | None = None
    item_id: Id | None = None
    ts: TsIn = None
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
    """A normalised event as published on ``rtml.events``: within the bounds ``EventIn`` accepts."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    event_id: Id
    type: Annotated[str, Field(min_length=1, max_length=128)]
    user_id: _TopicId | None = None
    item_id: _TopicId | None = None
    ts: Int64
    received_at: Int64
    source: Annotated[str, Field(max_length=64)] | None = None  # None: sent by a caller; "rule": a label rule's
    properties: dict[_PropertyKey, _TopicProperty] = Field(default_factory=dict, max_length=128)

    def field(self, path: str) -> Any:
        """Value at a dotted path such as ``properties.amount`` or ``item_id``; None when absent."""
        if path.startswith("properties."):
            return self.properties.get(path[len("properties.") :])
        return getattr(self, path, None)


class PredictionLogged(BaseModel):
    """One prediction on ``rtml.predictions``, with the exact feature values the model saw."""

    model_config = _TOPIC

    prediction_id: Id
    model: str
    version: str
    entities: dict[str, str]
    features: dict[str, float | None]
    score: float
    degraded: bool
    ts: Int64
    item_id: str | None = None
    # scores of the same inputs by versions that did not answer (a candidate in shadow or canary, a guard)
    shadow: dict[str, float] = Field(default_factory=dict)


class OutcomeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction_id: Id
    label: StrictBool | StrictInt | StrictFloat
    item_id: Id | None = None
    ts: TsIn = None

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

    model_config = _TOPIC

    prediction_id: Id
    label: float
    item_id: str | None = None
    ts: Int64
    received_at: Int64
    source: str | None = None  # None: sent by a caller; "rule": derived by the model's label rule


class Example(BaseModel):
    """A prediction joined with its label, on ``rtml.examples``: tomorrow's training row."""

    model_config = _TOPIC

    prediction_id: Id
    model: str
    version: str
    entities: dict[str, str]
    features: dict[str, float | None]
    score: float
    label: float
    predicted_at: Int64
    labelled_at: Int64
    item_id: str | None = None
    shadow: dict[str, float] = Field(default_factory=dict)  # version -> score, see PredictionLogged.shadow
