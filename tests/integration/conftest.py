"""Fixtures shared by integration tests: a serving app under uvicorn with a registered demo model."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rtml.core.config import load_config
from rtml.core.redis import Keys, connect
from rtml.core.settings import Settings
from rtml.serving.app import create_app
from rtml.serving.registry import ModelRegistry
from rtml.serving.train import DEMO_CONFIG, train_model
from tests.helpers import free_port, served


@pytest.fixture
async def serving(settings: Settings) -> AsyncIterator[Settings]:
    """A registered demo model and the serving app under uvicorn on a free loopback port."""
    redis = connect(settings)
    try:
        t = train_model(load_config(DEMO_CONFIG), "ctr", n_synthetic=2_000, seed=0)
        registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
        await registry.promote("ctr", await registry.register("ctr", t.onnx_bytes, t.metadata))
    finally:
        await redis.aclose()
    s = settings.model_copy(update={"serving_port": free_port()})
    async with served(create_app(s), s.serving_port, s.host):
        yield s
