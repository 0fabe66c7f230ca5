"""The join consumer: reads ``predictions`` and ``outcomes``, joins them by prediction_id, emits ``examples``.

Per batch: one pipelined round trip applies every record to its slot (``join.lua``), ``join.decide``
turns each slot into a decision, then the quality sums are updated and the examples published (acks=all)
before the consumer loop commits the batch. Any retriable failure (Redis or Kafka down) makes the loop
retry the whole batch; re-applying it is safe, see ``rtml.feedback.join`` for the delivery guarantees.
Records that do not validate as ``PredictionLogged`` / ``Outcome`` go to the dead-letter topic from ``decode``
(the consumer loop does that for any error raised there, and for another ``rtml-schema`` version before it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiokafka import ConsumerRecord

from rtml.core import metrics
from rtml.core.config import load_config
from rtml.core.errors import UnprocessableRecord
from rtml.core.kafka import Consumed, Producer, encode
from rtml.core.redis import Keys, Redis
from rtml.core.schemas import Outcome, PredictionLogged
from rtml.core.settings import Settings
from rtml.feedback import quality
from rtml.feedback.join import (
    OUTCOME,
    PREDICTION,
    Decision,
    Side,
    Slot,
    decide,
    join_windows,
    outcome_lane,
    prediction_lane,
)
from rtml.feedback.store import Apply, JoinStore

log = logging.getLogger(__name__)

TOPICS = ("predictions", "outcomes")
RULE_MARGIN_MS = 5 * 60_000  # a rule's join window: its window + grace + this (the sweep's and Kafka's lag)
GROUP_ID = "feedback"


@dataclass(frozen=True, slots=True)
class Incoming:
    side: Side
    prediction_id: str
    lane: str
    value: bytes  # the record value as received, stored in the slot as is
    ttl_ms: int  # how long the join slot lives: the prediction's model's join window


@dataclass(frozen=True, slots=True)
class ParkedRecord:
    """Enough of a ConsumerRecord to dead-letter an outcome that was parked by an earlier batch."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


def token(record: ConsumerRecord) -> str:
    """A record's identity, stable across redeliveries."""
    return f"{record.topic}:{record.partition}:{record.offset}"


def parked_record(tok: str, prediction_id: str, value: bytes) -> ParkedRecord:
    topic, partition, offset = tok.rsplit(":", 2)
    return ParkedRecord(topic, int(partition), int(offset), prediction_id.encode(), value)


class Joiner:
    def __init__(self, settings: Settings, redis: Redis, producer: Producer) -> None:
        self.settings = settings
        self.redis = redis
        self.producer = producer
        self.keys = Keys(settings.redis.key_prefix)
        config = load_config(settings.platform_config_path())
        rules = {name: m.label.within_ms + settings.label_grace + RULE_MARGIN_MS
                 for name, m in config.models.items() if m.label is not None}  # fmt: skip
        self.join_window = join_windows(settings.join_ttl, rules)
        # an outcome that comes first does not say its model: its slot lives as long as any model's
        self._outcome_ttl = max([settings.join_ttl, *rules.values()])
        self.store = JoinStore(redis, self.keys, settings.join_ttl)
        self.quality = quality.QualityStore(redis, self.keys, config)
        self._predictions = settings.topic("predictions")
        self._outcomes = settings.topic("outcomes")

    def decode(self, record: ConsumerRecord) -> Incoming:
        """Validate a record; any error here sends it to the dead-letter topic with the reason (a null value,
        not JSON, not the topic's shape, a NaN or infinity, out of bounds)."""
        if record.value is None:
            raise UnprocessableRecord("empty record value")
        value = bytes(record.value)
        if record.topic == self._predictions:
            p = PredictionLogged.model_validate_json(value)
            return Incoming(PREDICTION, p.prediction_id, prediction_lane(p), value, self.join_window(p.model))
        if record.topic == self._outcomes:
            o = Outcome.model_validate_json(value)
            return Incoming(OUTCOME, o.prediction_id, outcome_lane(o), value, self._outcome_ttl)
        raise UnprocessableRecord(f"feedback does not consume topic {record.topic}")

    async def handle(self, batch: list[Consumed[Incoming]]) -> None:
        applies = [
            Apply(c.value.side, c.value.prediction_id, c.value.lane, c.value.value, token(c.record), c.value.ttl_ms)
            for c in batch
        ]
        slots = await self.store.apply(applies)
        decisions = [decide(a.side, a.token, s, self.join_window) for a, s in zip(applies, slots, strict=True)]

        # the claiming records (an example), each with its place in its partition: the quality sums count each
        # record once per stream (``QualityStore.record``), so a replayed claim adds only what they lack
        claimed = [(d.example, (f"{c.record.topic}:{c.record.partition}", c.record.offset), not d.first)
                   for c, d in zip(batch, decisions, strict=True) if d.example is not None]  # fmt: skip
        examples = [ex for ex, _, _ in claimed]
        # Counted and summed before publishing: a failed publish retries the batch, then ``first`` is False.
        self._count(decisions)
        await self.quality.record(examples, sources=[src for _, src, _ in claimed],
                                  replayed=[again for _, _, again in claimed])  # fmt: skip
        if examples:
            await self.producer.send_many("examples", [(ex.prediction_id.encode(), encode(ex)) for ex in examples])
        for c, a, slot, d in zip(batch, applies, slots, decisions, strict=True):
            if d.dead_letter_reason is not None:
                await self.producer.dead_letter(self._outcome_record(c, a, slot), d.dead_letter_reason)

    def _outcome_record(self, c: Consumed[Incoming], a: Apply, slot: Slot) -> ConsumerRecord | ParkedRecord:
        if a.side == OUTCOME or slot.outcome is None or slot.outcome_token is None:
            return c.record
        # The prediction completed the pair; the late outcome is the one parked before it.
        return parked_record(slot.outcome_token, a.prediction_id, slot.outcome)

    @staticmethod
    def _count(decisions: list[Decision]) -> None:
        for d in decisions:
            if d.count is not None:
                metrics.OUTCOMES.labels(result=d.count).inc()
            if d.example is not None and d.first:
                metrics.EXAMPLES.labels(model=d.example.model).inc()
