"""Client commands find a `rtml up` running from the same directory without exporting anything."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from rtml.cli.common import ENDPOINTS_FILE, load_client_settings, load_settings
from rtml.cli.up import Platform
from rtml.core.settings import Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    for var in ("RTML_KAFKA_BOOTSTRAP", "RTML_REDIS_URL", "RTML_SERVING_PORT", "RTML_TOPIC_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_up_writes_its_endpoints_and_client_commands_read_them(clean_env: Path) -> None:
    s = Settings(kafka={"bootstrap": "127.0.0.1:19092"}, redis={"url": "redis://127.0.0.1:16379/0"},
                 serving_port=18003, topic_prefix="x.")  # fmt: skip
    platform = Platform(s, (clean_env / ".rtml" / "logs"), threading.Event())
    (clean_env / ".rtml").mkdir()
    platform.write_endpoints()
    assert (clean_env / ENDPOINTS_FILE).is_file()

    c = load_client_settings()
    assert (c.kafka.bootstrap, c.redis.url, c.serving_port, c.topic_prefix) == (
        "127.0.0.1:19092", "redis://127.0.0.1:16379/0", 18003, "x."
    )  # fmt: skip
    # the platform's own commands never take them (up would not start its embedded broker)
    assert load_settings().kafka.bootstrap is None


def test_the_environment_wins_over_the_endpoints_file(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".rtml").mkdir()
    (clean_env / ENDPOINTS_FILE).write_text("RTML_KAFKA_BOOTSTRAP=127.0.0.1:1\nRTML_REDIS_URL=redis://a:1/0\n")
    monkeypatch.setenv("RTML_KAFKA_BOOTSTRAP", "kafka.prod:9092")
    c = load_client_settings()
    assert c.kafka.bootstrap == "kafka.prod:9092" and c.redis.url == "redis://a:1/0"


def test_without_a_running_up_nothing_is_invented(clean_env: Path) -> None:
    c = load_client_settings()
    assert c.kafka.bootstrap is None and c.redis.url is None
