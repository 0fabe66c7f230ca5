"""Redis side of the join: one slot hash per prediction_id, changed only by ``join.lua``.

Layout: ``<prefix>{p:<prediction_id>}:join`` (a small hash, fields per lane, see join.lua), TTL ``join_ttl``
after its last write, so the join state is bounded by the traffic of one join window. Every key of one
prediction shares its ``{p:<id>}`` hash tag, so the script stays valid on Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rtml.core import metrics
from rtml.core.redis import Call, Keys, Redis, Scripts, script_source
from rtml.feedback.join import Side, Slot


def slot_key(keys: Keys, prediction_id: str) -> str:
    return f"{keys.prediction(prediction_id)}:join"


@dataclass(frozen=True, slots=True)
class Apply:
    """One record to apply: its side, prediction_id, lane (see join.py), raw JSON value and Kafka token."""

    side: Side
    prediction_id: str
    lane: str
    value: bytes
    token: str
    ttl_ms: int | None = None  # the slot's TTL (the model's join window); None: the store's default


def _slot(reply: Sequence[Any]) -> Slot:
    mine, stored_now, claim, claimed_now, prediction, outcome, outcome_token = reply
    return Slot(
        mine=bool(mine),
        stored_now=bool(stored_now),
        claim=None if claim is None else bytes(claim).decode(),
        claimed_now=bool(claimed_now),
        prediction=None if prediction is None else bytes(prediction),
        outcome=None if outcome is None else bytes(outcome),
        outcome_token=None if outcome_token is None else bytes(outcome_token).decode(),
    )


class JoinStore:
    def __init__(self, redis: Redis, keys: Keys, join_ttl_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.join_ttl_ms = join_ttl_ms
        self.scripts = Scripts(redis, {"join": script_source("rtml.feedback", "join.lua")})

    async def aclose(self) -> None:
        await self.scripts.aclose()

    async def apply(self, records: Sequence[Apply]) -> list[Slot]:
        """Apply the records in order (one round trip); each script call is atomic."""
        if not records:
            return []
        ttl = self.join_ttl_ms
        calls: list[Call] = [
            ("join", [slot_key(self.keys, r.prediction_id)], [r.side, r.lane, r.value, r.token, r.ttl_ms or ttl])
            for r in records
        ]
        with metrics.REDIS_SECONDS.labels(op="join").time():
            replies = await self.scripts.run(calls, "join script")
        return [_slot(reply) for reply in replies]
