"""The feedback service: outcomes in, predictions joined with their labels out, online quality.

``create_app`` opens a producer, a Redis pool and the join consumer (group ``feedback`` over
``predictions`` and ``outcomes``) as a background task; see ``rtml.feedback.consumer``. On shutdown the
consumer finishes and commits its current batch and leaves the group before Redis and the producer close.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from rtml.core.app import ReadinessCheck, build_app
from rtml.core.kafka import ConsumerLoop, Producer
from rtml.core.redis import connect, ping
from rtml.core.settings import Settings
from rtml.feedback.consumer import GROUP_ID, TOPICS, Incoming, Joiner
from rtml.feedback.routes import router


@contextlib.asynccontextmanager
async def open_feedback(app: FastAPI, settings: Settings) -> AsyncIterator[dict[str, ReadinessCheck]]:
    async with contextlib.AsyncExitStack() as stack:
        producer = await stack.enter_async_context(Producer(settings))
        redis = connect(settings)
        stack.push_async_callback(redis.aclose)
        joiner = Joiner(settings, redis, producer)
        stack.push_async_callback(joiner.store.aclose)
        loop: ConsumerLoop[Incoming] = ConsumerLoop(
            settings,
            name="feedback-join",
            topics=TOPICS,
            group_id=GROUP_ID,
            decode=joiner.decode,
            handle=joiner.handle,
            producer=producer,
            fetch_max_wait_ms=100,  # labels arrive minutes later: no need to poll the broker 100 times a second
        )
        await stack.enter_async_context(loop)
        loop.run_in_background()
        stack.push_async_callback(loop.shutdown)

        app.state.producer = producer
        app.state.redis = redis
        app.state.join_loop = loop

        async def redis_ready() -> None:
            await ping(redis)

        yield {"kafka": producer.ping, "redis": redis_ready, "join": loop.ready}


def create_app(settings: Settings) -> FastAPI:
    app = build_app("feedback", settings, open_feedback)
    app.include_router(router)
    return app
