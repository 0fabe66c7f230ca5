"""The feedback service: outcomes in, predictions joined with their labels out, online quality.

``create_app`` opens a producer, a Redis pool and the join consumer (group ``feedback`` over
``predictions`` and ``outcomes``) as a background task; see ``rtml.feedback.consumer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from rtml.core.app import ReadinessCheck, build_app
from rtml.core.errors import DependencyUnavailable
from rtml.core.kafka import ConsumerLoop, Producer
from rtml.core.redis import connect, ping
from rtml.core.settings import Settings
from rtml.feedback.consumer import GROUP_ID, TOPICS, Incoming, Joiner
from rtml.feedback.routes import router

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def open_feedback(app: FastAPI, settings: Settings) -> AsyncIterator[dict[str, ReadinessCheck]]:
    async with contextlib.AsyncExitStack() as stack:
        producer = await stack.enter_async_context(Producer(settings))
        redis = connect(settings)
        stack.push_async_callback(redis.aclose)
        joiner = Joiner(settings, redis, producer)
        loop: ConsumerLoop[Incoming] = ConsumerLoop(
            settings,
            name="feedback-join",
            topics=TOPICS,
            group_id=GROUP_ID,
            decode=joiner.decode,
            handle=joiner.handle,
            producer=producer,
        )
        await stack.enter_async_context(loop)
        task = asyncio.create_task(loop.run(), name="feedback-join")
        task.add_done_callback(_log_failure)
        stack.push_async_callback(_stop, loop, task)

        app.state.producer = producer
        app.state.redis = redis
        app.state.join_loop = loop

        async def redis_ready() -> None:
            await ping(redis)

        async def join_ready() -> None:
            if task.done():
                raise DependencyUnavailable("join", "the join consumer has stopped")

        yield {"kafka": producer.ping, "redis": redis_ready, "join": join_ready}


def _log_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the join consumer stopped", exc_info=task.exception())


async def _stop(loop: ConsumerLoop[Incoming], task: asyncio.Task[int]) -> None:
    """Let the consumer finish and commit its current batch, then leave the group."""
    await loop.stop()
    with contextlib.suppress(Exception):  # already logged by _log_failure
        await task


def create_app(settings: Settings) -> FastAPI:
    app = build_app("feedback", settings, open_feedback)
    app.include_router(router)
    return app
