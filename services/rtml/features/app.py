"""The features service: consumes events into the online store and serves reads."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from rtml.core import redis as rredis
from rtml.core.app import ReadinessCheck, build_app
from rtml.core.config import load_config
from rtml.core.kafka import Producer
from rtml.core.settings import Settings
from rtml.features.consumer import features_consumer
from rtml.features.routes import router
from rtml.features.store import FeatureStore

log = logging.getLogger(__name__)


def make_store(settings: Settings, redis: rredis.Redis) -> FeatureStore:
    return FeatureStore(
        redis,
        rredis.Keys(settings.redis.key_prefix),
        load_config(settings.platform_config_path()),
        dedup_horizon_ms=settings.dedup_horizon,
        max_future_ms=settings.max_future_s * 1000,
        cluster=settings.redis.cluster,
    )


@contextlib.asynccontextmanager
async def _open(app: FastAPI, settings: Settings) -> AsyncIterator[dict[str, ReadinessCheck]]:
    redis = rredis.connect(settings)
    store = make_store(settings, redis)
    try:
        app.state.store = store
        async with Producer(settings) as producer:
            consumer = features_consumer(settings, store, producer)
            await consumer.start()
            consumer.run_in_background()

            async def redis_ready() -> None:
                await rredis.ping(redis)

            try:
                yield {"kafka": producer.ping, "redis": redis_ready, "consumer": consumer.ready}
            finally:
                await consumer.shutdown()
    finally:  # also when start-up fails half way: the pool never leaks
        await store.aclose()
        await redis.aclose()


def create_app(settings: Settings) -> FastAPI:
    app = build_app("features", settings, _open)
    app.include_router(router)
    return app
