"""Producer and consumer loop when the broker is down: one DependencyUnavailable, the aiokafka client closed."""

from __future__ import annotations

import gc
import logging
import socket

import pytest

from rtml.core.errors import DependencyUnavailable
from rtml.core.kafka import ConsumerLoop, Producer, decode_json
from rtml.core.settings import Settings


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_a_failed_start_leaves_no_unclosed_client(
    recwarn: pytest.WarningsRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(kafka={"bootstrap": f"127.0.0.1:{closed_port()}"})
    producer = Producer(settings)
    with pytest.raises(DependencyUnavailable) as raised:
        await producer.start()
    assert raised.value.dependency == "kafka"
    await producer.stop()  # harmless after a failed start
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        del producer, raised  # the traceback holds the producer too
        gc.collect()  # aiokafka warns from __del__ when the client was never closed
    unclosed = [str(w.message) for w in recwarn if "Unclosed" in str(w.message)]
    assert not unclosed, unclosed
    assert "Unclosed" not in caplog.text


async def test_a_consumer_loop_that_cannot_start_leaves_no_unclosed_client(
    recwarn: pytest.WarningsRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(kafka={"bootstrap": f"127.0.0.1:{closed_port()}"})

    async def handle(batch: object) -> None:
        raise AssertionError("nothing to consume")

    loop: ConsumerLoop[object] = ConsumerLoop(
        settings, name="t", topics=["events"], group_id="t", decode=decode_json, handle=handle,
        producer=Producer(settings),
    )  # fmt: skip
    with pytest.raises(DependencyUnavailable):
        await loop.start()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        del loop
        gc.collect()
    unclosed = [str(w.message) for w in recwarn if "Unclosed AIOKafkaConsumer" in str(w.message)]
    assert not unclosed, unclosed
    assert "Unclosed AIOKafkaConsumer" not in caplog.text  # (the never-started producer may warn: not ours)
