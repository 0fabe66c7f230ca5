"""The platform config (``rtml.yaml``): entities, features and models, validated by pydantic.

A bad file fails with one line naming the bad key (``features.user_clicks_5m.window: ...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rtml.core.errors import ConfigError
from rtml.core.timeutil import parse_duration_ms

Agg = Literal["count", "sum", "mean", "min", "max", "last", "distinct_count", "ratio"]
NEEDS_FIELD: frozenset[str] = frozenset({"sum", "mean", "min", "max", "last", "distinct_count"})


class EntityDef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = None
    keys: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> EntityDef:
        if (self.key is None) == (self.keys is None):
            raise ValueError("give exactly one of key (single) or keys (a pair or more)")
        if self.keys is not None and len(self.keys) < 2:
            raise ValueError("keys needs at least two fields; use key for one")
        return self

    @property
    def key_fields(self) -> tuple[str, ...]:
        return (self.key,) if self.key is not None else tuple(self.keys or ())


class EventFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    events: tuple[str, ...] | None = None

    def matches(self, event_type: str) -> bool:
        return self.events is None or event_type in self.events


class FeatureDef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    entity: str
    agg: Agg
    events: tuple[str, ...] | None = None
    field: str | None = None
    window: str | None = None
    tile: str | None = None
    numerator: EventFilter | None = None
    denominator: EventFilter | None = None
    approx: bool = False
    # Filled in by validation: window and tile widths in ms (0 for lifetime).
    window_ms: int = 0
    tile_ms: int = 0

    @model_validator(mode="before")
    @classmethod
    def _widths(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        window = data.get("window")
        if window is None:
            if data.get("tile") is not None:
                raise ValueError("tile needs a window")
            data["window_ms"], data["tile_ms"] = 0, 0
            return data
        w = parse_duration_ms(window)
        if data.get("tile") is not None:
            g = parse_duration_ms(data["tile"])
        else:
            g = max(1000, (w // 60) // 1000 * 1000)
        if w % g != 0:
            raise ValueError(f"window {window} is not a multiple of its tile ({g} ms)")
        data["window_ms"], data["tile_ms"] = w, g
        return data

    @model_validator(mode="after")
    def _agg_shape(self) -> FeatureDef:
        if self.agg in NEEDS_FIELD and not self.field:
            raise ValueError(f"agg {self.agg} needs a field (e.g. properties.amount)")
        if self.agg == "ratio":
            if self.numerator is None or self.denominator is None:
                raise ValueError("agg ratio needs numerator and denominator")
        elif self.numerator is not None or self.denominator is not None:
            raise ValueError("numerator/denominator only apply to agg ratio")
        if self.approx and self.agg != "distinct_count":
            raise ValueError("approx only applies to distinct_count")
        return self

    @property
    def lifetime(self) -> bool:
        return self.window_ms == 0

    @property
    def n_tiles(self) -> int:
        return self.window_ms // self.tile_ms if self.tile_ms else 0

    def matches(self, event_type: str) -> bool:
        return self.events is None or event_type in self.events


class LabelRule(BaseModel):
    """Labels derived from the event stream (the learning loop, docs/learning-loop.md).

    A prediction of the model gets ``positive`` when an event of one of ``events`` whose fields equal the
    prediction's entities (``match``: entity key -> event field path) has a ``ts`` in
    ``[prediction ts, prediction ts + within]``; when none has by then, it gets ``negative`` (``null``:
    no label at all, e.g. for implicit feedback that only ever confirms).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    events: tuple[str, ...] = Field(min_length=1)
    match: dict[str, str] = Field(min_length=1)
    within: str
    positive: float = 1.0
    negative: float | None = 0.0
    within_ms: int = 0  # filled in from ``within``

    @model_validator(mode="before")
    @classmethod
    def _within(cls, data: Any) -> Any:
        if isinstance(data, dict) and "within" in data:
            data = {**data, "within_ms": parse_duration_ms(data["within"])}
        return data


class QualityDef(BaseModel):
    """Online quality is computed over the labels of the last ``window`` (tiles of window/60, >= 1 s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: str = "1h"
    window_ms: int = 3_600_000
    tile_ms: int = 60_000

    @model_validator(mode="before")
    @classmethod
    def _widths(cls, data: Any) -> Any:
        if isinstance(data, dict) and "window" in data:
            w = parse_duration_ms(data["window"])
            g = max(1000, (w // 60) // 1000 * 1000)
            if w % g:
                w = (w // g) * g
            data = {**data, "window_ms": w, "tile_ms": g}
        return data


class RetrainPolicy(BaseModel):
    """When feedback retrains the model by itself from the stored examples (``rtml train --from-examples``).

    Either trigger fires it: ``every_labels`` new labels since the last training, or the live version's
    windowed quality below ``min_auc`` / above ``max_log_loss`` once it rests on ``min_labels`` labels.
    A training needs ``min_examples`` stored examples and waits ``cooldown`` after the previous one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    every_labels: int | None = Field(default=None, ge=1)
    min_auc: float | None = Field(default=None, gt=0.0, le=1.0)
    max_log_loss: float | None = Field(default=None, gt=0.0)
    min_labels: int = Field(default=200, ge=1)
    min_examples: int = Field(default=500, ge=50)
    cooldown: str = "10m"
    cooldown_ms: int = 600_000
    # train on the examples predicted in this recent span only (None: every stored example); after a drift
    # the old world's examples teach the old answers
    train_window: str | None = None
    train_window_ms: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _durations(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if "cooldown" in data:
                data["cooldown_ms"] = parse_duration_ms(data["cooldown"])
            if data.get("train_window") is not None:
                data["train_window_ms"] = parse_duration_ms(data["train_window"])
        return data


class RolloutPolicy(BaseModel):
    """How a registered candidate becomes live (docs/learning-loop.md).

    The candidate serves in shadow (scored, logged, not returned) until ``shadow_labels`` of its predictions
    are labelled; then, when ``canary_share`` > 0, it serves that share of users (sticky per user) for
    ``canary_labels`` more. It is promoted only when its ``metric`` over those labels beats the live
    version's on the very same examples by more than ``min_gain``, and rejected otherwise. After a promotion
    the previous version stays in shadow for ``guard_labels`` labels; worse by more than ``max_loss``: rollback.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    shadow_labels: int = Field(default=500, ge=1)
    canary_share: float = Field(default=0.0, ge=0.0, lt=1.0)
    canary_labels: int = Field(default=500, ge=1)
    metric: Literal["auc", "log_loss"] = "auc"
    min_gain: float = Field(default=0.0, ge=0.0)
    guard_labels: int = Field(default=500, ge=0)
    max_loss: float = Field(default=0.02, ge=0.0)
    auto_promote: bool = True


class ModelDef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    features: tuple[str, ...] = Field(min_length=1)
    defaults: dict[str, float] = Field(default_factory=dict)
    label: LabelRule | None = None
    quality: QualityDef = QualityDef()
    retrain: RetrainPolicy | None = None
    rollout: RolloutPolicy = RolloutPolicy()


class PlatformConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    entities: dict[str, EntityDef]
    features: dict[str, FeatureDef] = Field(default_factory=dict)
    models: dict[str, ModelDef] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> PlatformConfig:
        for name, f in self.features.items():
            if f.entity not in self.entities:
                raise ValueError(f"features.{name}.entity: unknown entity {f.entity!r}")
        for name, m in self.models.items():
            for feat in m.features:
                if feat not in self.features:
                    raise ValueError(f"models.{name}.features: unknown feature {feat!r}")
            for feat in m.defaults:
                if feat not in m.features:
                    raise ValueError(f"models.{name}.defaults: {feat!r} is not one of the model's features")
        return self

    def features_of(self, entity: str) -> dict[str, FeatureDef]:
        return {n: f for n, f in self.features.items() if f.entity == entity}

    @property
    def longest_window_ms(self) -> int:
        return max((f.window_ms for f in self.features.values()), default=0)

    def entity_id(self, entity: str, values: Mapping[str, str]) -> str | None:
        """The id of ``entity`` for one event or request; None when a key field is missing."""
        parts = []
        for key in self.entities[entity].key_fields:
            v = values.get(key)
            if v is None:
                return None
            parts.append(v)
        return "|".join(parts)


_PATH_PREFIX = re.compile(r"^([A-Za-z_][\w.-]*(?:\.[\w-]+)*): ")


def _error_path(exc: ValidationError) -> tuple[tuple[str | int, ...], str]:
    """(path to the bad key, message). Cross-reference checks put their path at the start of the message."""
    err = exc.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    loc: tuple[str | int, ...] = tuple(err["loc"])
    if not loc:
        m = _PATH_PREFIX.match(msg)
        if m:
            loc = tuple(int(p) if p.isdigit() else p for p in m.group(1).split("."))
            msg = msg[m.end() :]
    return loc, msg


def _line_of(root: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """1-based line of the deepest YAML node on ``loc`` (the bad key itself when it exists)."""
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    node, line = value_node, key_node.start_mark.line + 1
                    break
            else:
                return line if line is not None else node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _config_error(exc: ValidationError, source: str, root: yaml.Node | None = None) -> ConfigError:
    loc, msg = _error_path(exc)
    where = ".".join(str(p) for p in loc)
    line = _line_of(root, loc) if root is not None else None
    prefix = f"{source}:{line}" if line is not None else source
    return ConfigError(f"{prefix}: {where}: {msg}" if where else f"{prefix}: {msg}")


def parse_config(data: Any, source: str = "rtml.yaml", root: yaml.Node | None = None) -> PlatformConfig:
    try:
        return PlatformConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, source, root) from None


def load_config(path: Path) -> PlatformConfig:
    """Load and validate ``rtml.yaml``; errors name the file, line and key (``rtml.yaml:7: features.x.agg: ...``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path), root)
