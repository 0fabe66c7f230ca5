"""Fixtures shared by integration tests: a serving app under uvicorn with a registered demo model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import uvicorn

from rtml.core.config import load_config
from rtml.core.embedded import free_port
from rtml.core.redis import Keys, connect
from rtml.core.settings import Settings
from rtml.serving.app import create_app
from rtml.serving.registry import ModelRegistry
from rtml.serving.train import DEMO_CONFIG, train_model


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
    server = uvicorn.Server(
        uvicorn.Config(create_app(s), host=s.host, port=s.serving_port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    for _ in range(300):
        if server.started:
            break
        await asyncio.sleep(0.05)
    assert server.started
    try:
        yield s
    finally:
        server.should_exit = True
        await task
