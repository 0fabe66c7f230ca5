"""Prediction logging never delays a response, on a real broker that stops answering (SIGSTOP).

While the broker is frozen, predictions keep answering at once; the bounded buffer keeps the first records
and drops (and counts) the rest; once the broker is back, what was buffered is published.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rtml.core import embedded, metrics
from rtml.core.kafka import Consumed, ConsumerLoop, Producer, create_topics, decode_json
from rtml.serving.app import create_app
from tests.helpers import free_port, running
from tests.integration.test_serving import register

pytestmark = pytest.mark.integration

BUFFER = 20


@pytest.fixture
def own_broker() -> Iterator[embedded.Managed]:
    if os.environ.get("RTML_KAFKA_BOOTSTRAP"):
        pytest.skip("freezes its broker: needs the embedded one, not RTML_KAFKA_BOOTSTRAP")
    broker = embedded.start_broker(free_port())
    try:
        yield broker
    finally:
        with_signal(broker, signal.SIGCONT)
        broker.stop()


def with_signal(broker: embedded.Managed, sig: signal.Signals) -> None:
    if broker.proc.poll() is None:
        os.kill(broker.proc.pid, sig)


def dropped() -> float:
    return float(metrics.PREDICTION_LOG_DROPPED._value.get())


async def test_a_frozen_broker_never_delays_predictions(make_settings: Any, own_broker: embedded.Managed) -> None:
    s = make_settings(
        kafka={"bootstrap": f"127.0.0.1:{own_broker.port}", "publish_timeout_s": 30.0, "request_timeout_ms": 30_000},
        prediction_log_buffer=BUFFER,
    )
    await create_topics(s)
    await register(s)
    body = {"entities": {"user_id": "u1", "item_id": "t1"}}
    async with running(create_app(s)) as client:
        assert (await client.post("/v1/predict", json=body)).status_code == 200
        await asyncio.sleep(0.5)  # that one is published: the log is idle
        with_signal(own_broker, signal.SIGSTOP)
        before = dropped()
        ids: list[str] = []
        started = time.monotonic()
        for _ in range(200):
            r = await client.post("/v1/predict", json=body)
            assert r.status_code == 200, r.text
            ids.append(r.json()["prediction_id"])
        # A publish waited on would take publish_timeout_s (30 s) here; the log must not be waited on.
        assert time.monotonic() - started < 15
        lost = dropped() - before
        # kept: the buffer, plus the batch the log had taken before the broker stopped answering
        assert 200 - 2 * BUFFER - 1 <= lost <= 200 - BUFFER
        with_signal(own_broker, signal.SIGCONT)

        sent = set(ids)
        found: set[str] = set()

        async def handle(batch: list[Consumed[Any]]) -> None:
            found.update(c.value["prediction_id"] for c in batch)
            if len(found & sent) + lost >= len(sent):
                await loop.stop()

        async with Producer(s) as producer:
            loop: ConsumerLoop[Any] = ConsumerLoop(
                s, name="t", topics=["predictions"], group_id="t-log", decode=decode_json, handle=handle,
                producer=producer,
            )  # fmt: skip
            async with loop:
                await loop.run(timeout=60)
        # nothing silently lost: every prediction is on the topic or counted as dropped, and the first ones
        # (which filled the buffer) are among the published
        assert len(found & sent) + lost == len(sent)
        assert set(ids[:BUFFER]) <= found
