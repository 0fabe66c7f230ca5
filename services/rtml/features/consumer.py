"""The features consumer: ``rtml.events`` -> FeatureStore.apply, one micro-batch per poll.

Offsets are committed only after the batch is in Redis; a crash before that redelivers the batch and the
per-entity seen-sets make the replay a no-op, so every event counts exactly once.
"""

from __future__ import annotations

from aiokafka import ConsumerRecord

from rtml.core import metrics
from rtml.core.kafka import Consumed, ConsumerLoop, Producer
from rtml.core.schemas import Event
from rtml.core.settings import Settings
from rtml.features.store import FeatureStore


def decode_event(record: ConsumerRecord) -> Event:
    if record.value is None:
        raise ValueError("empty record")
    return Event.model_validate_json(record.value)


def features_consumer(settings: Settings, store: FeatureStore, producer: Producer) -> ConsumerLoop[Event]:
    for name, feature in store.config.features.items():  # counter series at 0, so rate() sees the first one
        if not feature.lifetime:
            metrics.FEATURE_EVENTS_LATE.labels(feature=name)

    async def handle(batch: list[Consumed[Event]]) -> None:
        await store.apply([c.value for c in batch])

    return ConsumerLoop(
        settings,
        name="features",
        topics=["events"],
        group_id="features",
        decode=decode_event,
        handle=handle,
        producer=producer,
        max_in_flight=2,  # plan the next batch while Redis applies this one
    )
