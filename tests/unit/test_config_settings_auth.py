from __future__ import annotations

from pathlib import Path

import pytest

from rtml.core.auth import ApiKeys
from rtml.core.config import load_config, parse_config
from rtml.core.errors import ConfigError, Forbidden, Unauthorized
from rtml.core.settings import Settings
from rtml.core.timeutil import parse_duration_ms

CONTRACT_MINIMAL = """
entities:
  user: {key: user_id}
  item: {key: item_id}
  user_item: {keys: [user_id, item_id]}
features:
  user_clicks_5m:  {entity: user, agg: count, events: [click], window: 5m}
  user_spend_1h:   {entity: user, agg: sum, field: properties.amount, events: [purchase], window: 1h, tile: 1m}
  user_amount_max_24h: {entity: user, agg: max, field: properties.amount, window: 24h}
  item_ctr_1h:     {entity: item, agg: ratio, numerator: {events: [click]}, denominator: {events: [view]}, window: 1h}
  user_items_24h:  {entity: user, agg: distinct_count, field: item_id, window: 24h}
  user_views_total: {entity: user, agg: count, events: [view]}
models:
  ctr:
    features: [user_clicks_5m, item_ctr_1h, user_items_24h]
    defaults: {item_ctr_1h: 0.0}
"""


def test_the_contracts_minimal_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "rtml.yaml"
    path.write_text(CONTRACT_MINIMAL)
    cfg = load_config(path)
    assert cfg.models["ctr"].features == ("user_clicks_5m", "item_ctr_1h", "user_items_24h")
    assert cfg.features["user_spend_1h"].tile_ms == 60_000
    assert cfg.features["user_views_total"].lifetime
    assert cfg.entity_id("user_item", {"user_id": "u1", "item_id": "t9"}) == "u1|t9"
    assert cfg.entity_id("user_item", {"user_id": "u1"}) is None


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"features": {"f": {"entity": "ghost", "agg": "count"}}}, "features.f.entity"),
        ({"features": {"f": {"entity": "user", "agg": "median"}}}, "features.f.agg"),
        ({"features": {"f": {"entity": "user", "agg": "count", "window": "7m", "tile": "2m"}}}, "multiple"),
        ({"features": {"f": {"entity": "user", "agg": "max", "window": "1h"}}}, "needs a field"),
        ({"models": {"m": {"features": ["nope"]}}}, "models.m.features"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_config_names_the_bad_key(patch: dict[str, object], needle: str) -> None:
    data: dict[str, object] = {"entities": {"user": {"key": "user_id"}}, **patch}
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert needle in exc.value.message


def test_config_file_errors_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("entities: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_settings_use_the_contract_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTML_KAFKA_BOOTSTRAP", "k:9092")
    monkeypatch.setenv("RTML_REDIS_URL", "redis://r:6379/0")
    monkeypatch.setenv("RTML_TOPIC_PREFIX", "x.")
    monkeypatch.setenv("RTML_SERVING_PORT", "9003")
    monkeypatch.setenv("RTML_DEDUP_HORIZON", "48h")
    monkeypatch.setenv("RTML_KAFKA_SASL_PASSWORD", "s3cret")
    s = Settings()
    assert s.kafka.bootstrap == "k:9092" and s.redis.url == "redis://r:6379/0"
    assert s.topic("events") == "x.events" and s.port_of("serving") == 9003
    assert s.dedup_horizon == 48 * 3_600_000
    assert "s3cret" not in repr(s)
    with pytest.raises(ValueError, match="frozen"):
        s.topic_prefix = "y."  # type: ignore[misc]


def test_durations() -> None:
    assert parse_duration_ms("5m") == 300_000 and parse_duration_ms("250ms") == 250 and parse_duration_ms(3) == 3000
    for bad in ("5 minutes", "-1s", "0s", True, None):
        with pytest.raises(ValueError):
            parse_duration_ms(bad)


def test_api_keys_scopes() -> None:
    keys = ApiKeys.parse("k1:ingest+read, k2:admin")
    keys.check("Bearer k1", "ingest")
    keys.check("Bearer k2", "predict")  # admin may do everything
    with pytest.raises(Unauthorized):
        keys.check(None, "read")
    with pytest.raises(Unauthorized):
        keys.check("Bearer nope", "read")
    with pytest.raises(Forbidden):
        keys.check("Bearer k1", "predict")
    keys.check("bearer k1", "ingest")  # the scheme's case does not matter (RFC 9110 11.1), the key's does
    keys.check("BEARER   k1 ", "ingest")
    for bad in ("Bearer K1", "Bearer", "Bearer ", "Basic k1", "k1", "Bearerk1"):
        with pytest.raises(Unauthorized):
            keys.check(bad, "ingest")
    ApiKeys.parse(None).check(None, "admin")  # no keys configured: open
    with pytest.raises(ConfigError):
        ApiKeys.parse("k1:superuser")


def test_config_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "rtml.yaml"
    path.write_text(
        "entities:\n  user: {key: user_id}\nfeatures:\n  ok: {entity: user, agg: count}\n"
        "  bad:\n    entity: user\n    agg: median\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.message.startswith(f"{path}:7: features.bad.agg: ")
    path.write_text("entities:\n  user: {key: user_id}\nfeatures:\n  x: {entity: ghost, agg: count}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.message == f"{path}:4: features.x.entity: unknown entity 'ghost'"


def test_huge_numbers_are_input_errors_not_crashes() -> None:
    from pydantic import ValidationError

    from rtml.core.schemas import OutcomeIn
    from rtml.core.values import as_float

    assert as_float(10**400) is None and as_float(float("nan")) is None and as_float(2) == 2.0
    with pytest.raises(ValidationError, match="finite"):
        OutcomeIn.model_validate({"prediction_id": "p", "label": 10**400})
