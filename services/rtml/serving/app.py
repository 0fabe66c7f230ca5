"""The serving service: ONNX models kept in step with the registry, predictions logged to Kafka.

Promotions and rollout changes arrive on the models topic (each replica reloads at once) and, as a fallback,
by polling the live pointers and rollouts every ``RTML_MODEL_POLL_INTERVAL_S``. predict/recommend are
answered by ``fastpath`` in front of FastAPI (auth, admission, validation and metrics included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from rtml.core import redis as rredis
from rtml.core.app import ReadinessCheck, build_app
from rtml.core.config import load_config
from rtml.core.errors import DependencyUnavailable
from rtml.core.kafka import Consumed, ConsumerLoop, Producer
from rtml.core.settings import Settings
from rtml.features.store import FeatureStore
from rtml.serving.fastpath import FastPath, ServingApp
from rtml.serving.inference.live import LiveModels
from rtml.serving.predict import Predictor
from rtml.serving.predictlog import PredictionLog
from rtml.serving.registry import MAX_MODEL_BYTES, ModelRegistry, decode_announcement
from rtml.serving.routes import router

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _open(app: FastAPI, settings: Settings) -> AsyncIterator[dict[str, ReadinessCheck]]:
    config = load_config(settings.platform_config_path())
    keys = rredis.Keys(settings.redis.key_prefix)
    redis = rredis.connect(settings)
    registry = ModelRegistry(redis, keys)
    store = FeatureStore(redis, keys, config, cluster=settings.redis.cluster)
    live = LiveModels(registry, config.models)
    try:
        await live.refresh()
    except DependencyUnavailable as exc:  # start anyway: the poller loads the models once Redis answers
        log.warning("models not loaded at startup: %s", exc.message)
    try:  # the first predict would otherwise spend its deadline on SCRIPT LOAD and connects
        await store.warm_up()
    except DependencyUnavailable as exc:  # the first read does it once Redis answers
        log.warning("feature store not warmed up at startup: %s", exc.message)
    try:
        async with Producer(settings) as producer:
            predlog = PredictionLog(producer, settings.prediction_log_buffer)
            predlog.start()
            poller = asyncio.create_task(live.run(settings.model_poll_interval_s), name="model-poller")
            watcher = promotions_watcher(settings, live, producer)
            try:
                await watcher.start()
                watcher.run_in_background()
            except DependencyUnavailable as exc:  # the poller still brings promotions within its interval
                log.warning("not watching the models topic: %s", exc.message)
            app.state.config = config
            app.state.registry = registry
            app.state.live = live
            app.state.producer = producer
            app.state.predlog = predlog
            app.state.predictor = Predictor(config, store, live, predlog)

            async def redis_ready() -> None:
                await rredis.ping(redis)

            try:
                yield {"kafka": producer.ping, "redis": redis_ready}
            finally:
                await watcher.shutdown()
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
                await predlog.close()
    finally:  # also when start-up fails half way
        await store.aclose()
        await redis.aclose()


def promotions_watcher(settings: Settings, live: LiveModels, producer: Producer) -> ConsumerLoop[Any]:
    """Every replica reads every promotion and rollout change announced on the models topic (no consumer
    group: each reads every partition) and reloads at once; the poller is the fallback when the topic cannot
    be read."""

    async def handle(batch: list[Consumed[Any]]) -> None:
        await live.refresh()  # one refresh per batch: the pointers in Redis are the truth, not the messages

    return ConsumerLoop(
        settings,
        name="serving-models",
        topics=["models"],
        group_id=None,  # every replica reads every announcement; a group per replica would pile up on the brokers
        decode=decode_announcement,  # anything else goes to the dead-letter topic with the reason
        handle=handle,
        producer=producer,
        fetch_max_wait_ms=500,  # promotions are rare and may take a moment; idle polling costs the request path
    )


def create_app(settings: Settings) -> ServingApp:
    # model uploads (raw ONNX bytes) may be as large as the registry accepts, every other body keeps the limit
    limits = {r"/v1/models/[^/]+/versions": MAX_MODEL_BYTES}
    app = build_app("serving", settings, _open, body_limits=limits, app_class=ServingApp)
    assert isinstance(app, ServingApp)
    app.include_router(router)
    app.fast = FastPath(app.state)  # predict and recommend skip the middleware stack and the router
    return app
