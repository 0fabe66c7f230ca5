"""The feedback service: outcomes in, predictions joined with their labels out, online quality, the loop.

``create_app`` opens a producer, a Redis pool and, as background tasks:
- the join consumer (group ``feedback`` over ``predictions`` and ``outcomes``; ``rtml.feedback.consumer``);
- the examples store's consumer (group ``feedback-examples`` over ``examples``, Parquet under
  ``examples_dir``; ``rtml.feedback.examples``);
- when a model declares a label rule, the label consumer (group ``feedback-labels`` over ``predictions``
  and ``events``) and its sweeper (``rtml.feedback.labels``);
- the learning loop (retraining and rollout decisions, ``rtml.feedback.learning``) and the quality gauges.
On shutdown each consumer finishes and commits its current batch (the examples store writes what it
buffered first) and leaves its group before Redis and the producer close.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from fastapi import FastAPI

from rtml.core.app import ReadinessCheck, build_app
from rtml.core.config import load_config
from rtml.core.kafka import ConsumerLoop, Producer
from rtml.core.redis import connect, ping
from rtml.core.settings import Settings
from rtml.feedback.consumer import GROUP_ID, TOPICS, Incoming, Joiner
from rtml.feedback.examples import ExamplesWriter, examples_loop
from rtml.feedback.labels import GROUP_ID as LABEL_GROUP_ID
from rtml.feedback.labels import TOPICS as LABEL_TOPICS
from rtml.feedback.labels import LabelRules, Seen
from rtml.feedback.learning import Learning
from rtml.feedback.quality import publish_gauges_forever
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
        # the examples store: Parquet files for training; its loop flushes and commits before it leaves
        examples = examples_loop(settings, producer, ExamplesWriter(settings))
        loops: list[ConsumerLoop[Any]] = [loop, examples]
        checks: dict[str, ReadinessCheck] = {"join": loop.ready, "examples": examples.ready}
        # label rules: labels derived from the event stream, published as outcomes the join picks up
        config = load_config(settings.platform_config_path())
        rules = LabelRules(settings, config, redis, producer)
        stack.push_async_callback(rules.aclose)
        if rules.active:
            labels: ConsumerLoop[Seen] = ConsumerLoop(
                settings, name="feedback-labels", topics=LABEL_TOPICS, group_id=LABEL_GROUP_ID, decode=rules.decode,
                handle=rules.handle, producer=producer, fetch_max_wait_ms=100,
                foreign_schema="skip",  # the join and features consumers dead-letter those records, once
            )  # fmt: skip
            loops.append(labels)
            checks["labels"] = labels.ready
        await start_all(stack, loops)  # a consumer's start takes seconds on some brokers: not one after another
        if rules.active:
            await stack.enter_async_context(background(rules.sweep_forever(), "label-sweeper"))

        # the learning loop: quality gauges, retraining, rollout decisions (every replica; one acts per model)
        learning = Learning(settings, config, redis, producer, joiner.quality)
        await stack.enter_async_context(background(learning.run_forever(), "learning-loop"))
        await stack.enter_async_context(
            background(publish_gauges_forever(joiner.quality, settings.learning_interval_s), "quality-gauges")
        )

        app.state.producer = producer
        app.state.redis = redis
        app.state.join_loop = loop
        app.state.examples_loop = examples
        app.state.quality = joiner.quality
        app.state.learning = learning

        async def redis_ready() -> None:
            await ping(redis)

        yield {"kafka": producer.ping, "redis": redis_ready, **checks}


async def start_all(stack: contextlib.AsyncExitStack, loops: list[ConsumerLoop[Any]]) -> None:
    """Start the consumer loops at once and run each in the background; on the way out each finishes and
    commits its batch and leaves its group (``shutdown``), then closes. A failed start closes the others."""
    results = await asyncio.gather(*(lp.start() for lp in loops), return_exceptions=True)
    for lp, result in zip(loops, results, strict=True):
        if not isinstance(result, BaseException):
            stack.push_async_callback(lp.close)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    for lp in loops:
        lp.run_in_background()
        stack.push_async_callback(lp.shutdown)


@contextlib.asynccontextmanager
async def background(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``coro`` as a task for the duration of the block; cancelled and awaited when it ends.

    Cancelled again until it is done: a client library that turns a cancellation into its own error (and
    a loop that logs errors and goes on) would otherwise keep the service from ever shutting down."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield task
    finally:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_app(settings: Settings) -> FastAPI:
    app = build_app("feedback", settings, open_feedback)
    app.include_router(router)
    return app
