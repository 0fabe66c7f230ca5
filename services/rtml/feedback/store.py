"""Redis side of the join: one slot hash per prediction_id, changed only by ``join.lua``.

Layout: ``<prefix>{p:<prediction_id>}:join`` (a small hash, fields per lane, see join.lua), TTL ``join_ttl``
after its last write, so the join state is bounded by the traffic of one join window. Every key of one
prediction shares its ``{p:<id>}`` hash tag, so the script stays valid on Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rtml.core.redis import Keys, Redis, guarded, load_script
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
        self._script = load_script(redis, "rtml.feedback", "join.lua")

    async def apply(self, records: Sequence[Apply]) -> list[Slot]:
        """Apply the records in order (one pipelined round trip); each script call is atomic."""
        if not records:
            return []

        async def go() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for r in records:
                    await self._script(
                        keys=[slot_key(self.keys, r.prediction_id)],
                        args=[r.side, r.lane, r.value, r.token, self.join_ttl_ms],
                        client=pipe,
                    )
                return list(await pipe.execute())

        replies = await guarded(go(), "join script")
        return [_slot(reply) for reply in replies]
