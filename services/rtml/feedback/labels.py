"""Labels derived from the event stream by each model's label rule (``models.<name>.label`` in rtml.yaml).

A rule says: a prediction gets ``positive`` when an event of one of ``events`` whose fields equal the
prediction's entities (``match``) has a ``ts`` in ``[prediction ts, prediction ts + within]``, and
``negative`` when none has by then. The derived label is published on ``outcomes`` (``source: "rule"``)
and joined like any caller's outcome, so one join decides what becomes an example: the first outcome
for a prediction wins (an explicit outcome sent before the rule decided makes the rule's a duplicate).

How it is computed (group ``feedback-labels`` over ``predictions`` and ``events``, any number of replicas):
- State per (model, match values) *pair* — e.g. (ctr, u1, t9) — in two keys under one hash tag, changed
  only by ``labels.lua``: the pair's predictions and their state (pending, or decided with who decided),
  and the matching events seen in the last window. Predictions and events meet in that script whichever
  reaches feedback first, so the result does not depend on the lag between the two topics.
- A pending prediction is also put in a *due index* (16 sorted sets per model, spread over the cluster),
  scored by its deadline plus ``RTML_LABEL_GRACE``: the time events already sent get to reach feedback.
  Every replica sweeps the due index each second; a sweep *leases* what it takes, so two replicas never
  decide the same prediction and a replica that dies mid-sweep leaves its lease to expire.
- Negative labels are given at deadline + grace; an event inside a prediction's window arriving after that
  is too late to change the label: it is counted (``rtml_rule_labels_total{result="late"}``), never silent,
  as long as it comes within the *horizon* (two windows plus grace after the deadline) while the pair's
  state is kept; state is bounded by TTLs of window + horizon after the pair's last write.

Delivery: the state records which Kafka record (or "sweep") decided each label; a redelivered record (a
crash before its outcomes were published or its offsets committed) finds its own decisions and publishes
them again, so no label is lost. A label published twice is a byte-equal duplicate that the join counts
once (the first outcome claims the prediction). Bad records are not dead-lettered here: the join consumer
(predictions) and the features consumer (events) already do that for the same records.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson
from aiokafka import ConsumerRecord

from rtml.core import metrics
from rtml.core.config import LabelRule, PlatformConfig
from rtml.core.kafka import Consumed, Producer, encode
from rtml.core.redis import Call, Keys, Redis, Scripts, script_source, text
from rtml.core.schemas import MAX_ID, Outcome
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms

log = logging.getLogger(__name__)

TOPICS = ("predictions", "events")
GROUP_ID = "feedback-labels"
DUE_BUCKETS = 16
SWEEP_TOKEN = "sweep"  # noqa: S105 -- who decided a negative label, not a secret
SWEEP_LEASE_MS = 30_000
SWEEP_LIMIT = 1_000  # members per bucket per sweep round
SWEEP_INTERVAL_S = 1.0
MAX_ENTRIES = 64  # predictions per pair before decided ones are pruned (see labels.lua)
TTL_MARGIN_MS = 60_000
_SEP = "\x1f"


@dataclass(frozen=True, slots=True)
class Rule:
    """One model's label rule, with what the hot path needs precomputed."""

    model: str
    rule: LabelRule
    keys: tuple[str, ...]  # prediction entity keys, in declared order
    paths: tuple[str, ...]  # the event field each must equal

    def pair_of_prediction(self, entities: Mapping[str, Any]) -> str | None:
        """The pair's match values, joined by ``|``; None when an entity the rule needs is missing."""
        values = []
        for key in self.keys:
            v = entities.get(key)
            if v is None or isinstance(v, dict | list):
                return None
            values.append(str(v))
        return "|".join(values)

    def pair_of_event(self, event: Mapping[str, Any]) -> str | None:
        values = []
        for path in self.paths:
            if path.startswith("properties."):
                props = event.get("properties")
                v = props.get(path[len("properties.") :]) if isinstance(props, dict) else None
            else:
                v = event.get(path)
            if v is None or isinstance(v, dict | list | bool):
                return None
            values.append(str(v))
        return "|".join(values)


def rules_of(config: PlatformConfig) -> dict[str, Rule]:
    return {
        name: Rule(name, m.label, tuple(m.label.match), tuple(m.label.match.values()))
        for name, m in config.models.items()
        if m.label is not None
    }


@dataclass(frozen=True, slots=True)
class PredictionSeen:
    rule: Rule
    pair: str
    prediction_id: str
    item_id: str | None
    ts: int


@dataclass(frozen=True, slots=True)
class EventSeen:
    matches: tuple[tuple[Rule, str], ...]  # every rule this event can decide, with its pair
    event_id: str
    ts: int


Seen = PredictionSeen | EventSeen | None


def _epoch_ms(ts: Any) -> TypeGuard[int]:
    """Whether ``ts`` is a time the topics carry: an int in int64 (what ``Event``/``PredictionLogged`` accept)."""
    return isinstance(ts, int) and not isinstance(ts, bool) and -(2**63) <= ts < 2**63


def field_of(prediction_id: str, item_id: str | None) -> str:
    return f"{prediction_id}|{item_id or ''}"


def parse_field(field: str) -> tuple[str, str | None]:
    prediction_id, _, item = field.partition("|")
    return prediction_id, item or None


def token(record: ConsumerRecord) -> str:
    return f"{record.topic}:{record.partition}:{record.offset}"


class LabelKeys:
    """Key names: a pair's two keys share the tag ``{lbl:<model>:<values>}``; the due index has its own."""

    def __init__(self, keys: Keys) -> None:
        self.prefix = keys.prefix

    @staticmethod
    def tag(model: str, pair: str) -> str:
        return f"lbl:{model}:{pair}"

    def pair_keys(self, tag: str) -> list[str]:
        return [f"{self.prefix}{{{tag}}}:p", f"{self.prefix}{{{tag}}}:e"]

    def due(self, model: str, bucket: int) -> str:
        return f"{self.prefix}{{lbl-due:{model}:{bucket}}}"

    @staticmethod
    def bucket(tag: str) -> int:
        return zlib.crc32(tag.encode()) % DUE_BUCKETS


class LabelRules:
    """The label consumer's decode/handle and the sweeper, sharing the scripts and the producer."""

    def __init__(self, settings: Settings, config: PlatformConfig, redis: Redis, producer: Producer) -> None:
        self.settings = settings
        self.rules = rules_of(config)
        self.producer = producer
        self.keys = LabelKeys(Keys(settings.redis.key_prefix))
        self.grace = settings.label_grace
        self.scripts = Scripts(redis, {
            "pair": script_source("rtml.feedback", "labels.lua"),
            "due": script_source("rtml.feedback", "labels_due.lua"),
        })  # fmt: skip
        self._by_event_type: dict[str, list[Rule]] = defaultdict(list)
        for r in self.rules.values():
            for t in r.rule.events:
                self._by_event_type[t].append(r)
        self._predictions = settings.topic("predictions")
        self._counters: dict[tuple[str, str], Any] = {}

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def horizon(self, rule: Rule) -> int:
        """How long after its deadline a decided label is remembered, so a later event in its window is
        counted as late (beyond it the pair's state is gone and such an event is just an event)."""
        return 2 * (rule.rule.within_ms + self.grace)

    def ttl(self, rule: Rule) -> int:
        return rule.rule.within_ms + self.horizon(rule) + TTL_MARGIN_MS

    def _count(self, model: str, result: str, n: int = 1) -> None:
        child = self._counters.get((model, result))
        if child is None:
            child = self._counters[(model, result)] = metrics.RULE_LABELS.labels(model, result)
        child.inc(n)

    async def aclose(self) -> None:
        await self.scripts.aclose()

    # -- the consumer ------------------------------------------------------------------------------------
    def decode(self, record: ConsumerRecord) -> Seen:
        """What a record means for the rules; None for anything no rule cares about or cannot read."""
        if record.value is None:
            return None
        try:
            doc = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict):
            return None
        if record.topic == self._predictions:
            return self._prediction(doc)
        return self._event(doc)

    def _prediction(self, doc: dict[str, Any]) -> PredictionSeen | None:
        rule = self.rules.get(doc.get("model"))  # type: ignore[arg-type]
        pid, ts, entities, item = doc.get("prediction_id"), doc.get("ts"), doc.get("entities"), doc.get("item_id")
        if rule is None or not isinstance(pid, str) or not pid or "|" in pid or not isinstance(entities, dict):
            return None
        if len(pid) > MAX_ID:  # not a prediction (the join dead-letters it): its label could not be published
            return None
        if not _epoch_ms(ts) or not (item is None or isinstance(item, str)):
            return None
        pair = rule.pair_of_prediction(entities)
        if pair is None:
            self._count(rule.model, "unkeyed")  # the rule cannot say anything about this prediction
            return None
        return PredictionSeen(rule, pair, pid, item, ts)

    def _event(self, doc: dict[str, Any]) -> EventSeen | None:
        rules = self._by_event_type.get(doc.get("type"))  # type: ignore[arg-type]
        event_id, ts = doc.get("event_id"), doc.get("ts")
        if not rules or not isinstance(event_id, str) or not _epoch_ms(ts):
            return None
        matches = tuple((r, pair) for r in rules if (pair := r.pair_of_event(doc)) is not None)
        return EventSeen(matches, event_id, ts) if matches else None

    async def handle(self, batch: list[Consumed[Seen]]) -> None:
        """Apply the batch (one round trip), publish the labels it decided, then the loop commits."""
        calls: list[Call] = []
        meta: list[tuple[str, Any]] = []
        due: dict[str, list[Any]] = defaultdict(list)
        for c in batch:
            seen, tok = c.value, token(c.record)
            if isinstance(seen, PredictionSeen):
                r = seen.rule
                tag = self.keys.tag(r.model, seen.pair)
                field = field_of(seen.prediction_id, seen.item_id)
                deadline = seen.ts + r.rule.within_ms
                calls.append(("pair", self.keys.pair_keys(tag), [
                    "predict", field, seen.ts, deadline, tok, self.ttl(r), self.horizon(r), MAX_ENTRIES,
                ]))  # fmt: skip
                meta.append(("p", (r, field)))
                # in the due index whatever the script decides: a decided member is dropped by its sweep
                due[self.keys.due(r.model, self.keys.bucket(tag))] += [deadline + self.grace, f"{tag}{_SEP}{field}"]
            elif isinstance(seen, EventSeen):
                for r, pair in seen.matches:
                    tag = self.keys.tag(r.model, pair)
                    calls.append(("pair", self.keys.pair_keys(tag), [
                        "event", seen.event_id, seen.ts, tok, self.ttl(r), r.rule.within_ms + self.grace,
                        self.horizon(r),
                    ]))  # fmt: skip
                    meta.append(("e", r))
        if not calls:
            return
        for key, members in due.items():
            for i in range(0, len(members), 2_000):
                calls.append(("due", [key], ["add", *members[i : i + 2_000]]))
        replies = await self.scripts.run(calls, "label rules")
        labels: list[tuple[Rule, str, bool, int]] = []  # (rule, field, positive, label ts)
        for (kind, info), reply in zip(meta, replies[: len(meta)], strict=True):
            if kind == "p":
                rule, field = info
                if text(reply[0]) == "+":
                    labels.append((rule, field, True, int(reply[1])))
            else:
                labels.extend(self._event_labels(info, reply))
        await self._publish(labels)

    def _event_labels(self, rule: Rule, reply: Sequence[Any]) -> list[tuple[Rule, str, bool, int]]:
        out = []
        for i in range(0, len(reply) - 2, 3):
            if text(reply[i + 1]) == "+":
                out.append((rule, text(reply[i]), True, int(reply[i + 2])))
        late = int(reply[-1])
        if late:
            self._count(rule.model, "late", late)
        return out

    async def _publish(self, labels: Iterable[tuple[Rule, str, bool, int]]) -> None:
        received = now_ms()
        records = []
        for rule, field, positive, ts in labels:
            value = rule.rule.positive if positive else rule.rule.negative
            self._count(rule.model, "positive" if positive else "negative")
            if value is None:
                continue
            pid, item = parse_field(field)
            outcome = Outcome(prediction_id=pid, label=value, item_id=item, ts=ts, received_at=received,
                              source="rule")  # fmt: skip
            records.append((pid.encode(), encode(outcome)))
        if records:
            await self.producer.send_many("outcomes", records)

    # -- the sweeper -------------------------------------------------------------------------------------
    async def sweep(self, now: int | None = None) -> int:
        """Give the negative label to every prediction whose deadline + grace has passed (``now``: wall clock
        ms unless given); returns how many due entries it took (decided by it or, earlier, by an event)."""
        if not self.rules:
            return 0
        now = now_ms() if now is None else now
        buckets = [(r, self.keys.due(r.model, b)) for r in self.rules.values() for b in range(DUE_BUCKETS)]
        taken = await self.scripts.run(
            [("due", [key], ["take", now, SWEEP_LEASE_MS, SWEEP_LIMIT]) for _, key in buckets], "label sweep"
        )
        calls: list[Call] = []
        meta: list[tuple[Rule, str, str, str]] = []  # (rule, due key, member, field)
        for (rule, key), members in zip(buckets, taken, strict=True):
            for raw in members:
                member = text(raw)
                tag, _, field = member.partition(_SEP)
                calls.append(("pair", self.keys.pair_keys(tag), ["expire", field, SWEEP_TOKEN, now]))
                meta.append((rule, key, member, field))
        if not calls:
            return 0
        replies = await self.scripts.run(calls, "label sweep")
        labels = [
            (rule, field, False, int(reply[1]))
            for (rule, _, _, field), reply in zip(meta, replies, strict=True)
            if text(reply[0]) == "-"
        ]
        await self._publish(labels)  # before ``done``: a failure here leaves the lease to run out and retry
        done: dict[str, list[str]] = defaultdict(list)
        for _, key, member, _ in meta:
            done[key].append(member)
        await self.scripts.run([("due", [k], ["done", *ms]) for k, ms in done.items()], "label sweep")
        return len(meta)

    async def sweep_forever(self, interval_s: float = SWEEP_INTERVAL_S) -> None:
        """Sweep every ``interval_s`` until cancelled; a failed round (Redis or Kafka down) is retried."""
        while True:
            try:
                backlog = True
                while backlog:  # at least one bucket was full: keep going before sleeping
                    backlog = await self.sweep() >= SWEEP_LIMIT
            except Exception as exc:  # noqa: BLE001 -- leased members come back; the next round retries
                log.warning("label sweep failed: %r", exc)
            await asyncio.sleep(interval_s)
