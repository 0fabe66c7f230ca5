"""Registry entry points used by the CLI: train_and_register and ensure_demo_model."""

from __future__ import annotations

import pytest

from rtml.core.errors import NotFound
from rtml.core.redis import Keys, connect
from rtml.core.settings import Settings
from rtml.serving.registry import ModelRegistry, ensure_demo_model, train_and_register

pytestmark = pytest.mark.integration


async def test_ensure_demo_model_trains_once_and_train_adds_versions(settings: Settings) -> None:
    assert await ensure_demo_model(settings) == "1"
    assert await ensure_demo_model(settings) is None  # already live: nothing to do
    assert await train_and_register(settings, promote=False) == "2"
    redis = connect(settings)
    try:
        registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
        assert await registry.live_version("ctr") == "1"
        onnx_bytes, metadata = await registry.get("ctr", "2")
        assert onnx_bytes and metadata["features"] == ["user_clicks_5m", "item_ctr_1h", "user_items_24h"]
        await registry.promote("ctr", "2")
        assert await registry.live_version("ctr") == "2"
        with pytest.raises(NotFound):
            await registry.promote("ctr", "7")
        [ctr] = await registry.describe()
        assert ctr["live_version"] == "2" and [v["live"] for v in ctr["versions"]] == [False, True]
    finally:
        await redis.aclose()
    with pytest.raises(NotFound):
        await train_and_register(settings, model_name="nope")
