"""Shared fixtures: one real broker and one real redis-server per test session.

``RTML_KAFKA_BOOTSTRAP`` / ``RTML_REDIS_URL`` in the environment switch to external ones (e.g. Apache
Kafka). Every test gets its own topic prefix and Redis key prefix, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from rtml.core import embedded
from rtml.core.kafka import create_topics
from rtml.core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("RTML_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    broker = embedded.start_broker()
    try:
        yield f"127.0.0.1:{broker.port}"
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("RTML_REDIS_URL")
    if external:
        yield external
        return
    server = embedded.start_redis()
    try:
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.stop()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def make_settings(kafka_bootstrap: str, redis_url: str, unique: str, tmp_path: Path) -> Any:
    """Settings for one test: real broker and Redis, a private topic and key prefix."""

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "kafka": {"bootstrap": kafka_bootstrap, "partitions": 2},
            "redis": {"url": redis_url, "key_prefix": f"t{unique}:"},
            "topic_prefix": f"t{unique}.",
            "config": ROOT / "services" / "rtml" / "demo" / "rtml.yaml",
            "examples_dir": tmp_path / "examples",  # never the working directory's .rtml/examples
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return Settings(**base)

    return make


@pytest.fixture
async def settings(make_settings: Any) -> AsyncIterator[Settings]:
    s: Settings = make_settings()
    await create_topics(s)
    yield s
