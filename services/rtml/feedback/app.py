"""The feedback service: outcomes in, predictions joined with their labels out, online quality.

``create_app`` opens a producer, a Redis pool and the join consumer (group ``feedback`` over
``predictions`` and ``outcomes``) as a background task; see ``rtml.feedback.consumer``; and the examples
store's consumer (group ``feedback-examples`` over ``examples``, Parquet under ``examples_dir``; see
``rtml.feedback.examples``). On shutdown each consumer finishes and commits its current batch (the examples
store writes what it buffered first) and leaves its group before Redis and the producer close.
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
from rtml.feedback.examples import ExamplesWriter, examples_loop
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

        # the examples store: Parquet files for training; its loop flushes and commits before it leaves
        examples = examples_loop(settings, producer, ExamplesWriter(settings))
        await stack.enter_async_context(examples)
        examples.run_in_background()
        stack.push_async_callback(examples.shutdown)

        app.state.producer = producer
        app.state.redis = redis
        app.state.join_loop = loop
        app.state.examples_loop = examples

        async def redis_ready() -> None:
            await ping(redis)

        yield {"kafka": producer.ping, "redis": redis_ready, "join": loop.ready, "examples": examples.ready}


def create_app(settings: Settings) -> FastAPI:
    app = build_app("feedback", settings, open_feedback)
    app.include_router(router)
    return app
