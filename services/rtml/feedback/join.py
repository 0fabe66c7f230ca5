"""The prediction/outcome join as pure decisions: given what the join slot holds, what to do.

The atomic state change lives in ``join.lua`` and is deliberately mechanical, so every rule that needs
judgement is here and testable without Redis:

- ``join.lua`` keeps, per prediction_id and *lane*, one *slot* holding the first prediction record and
  the first outcome record seen (each with the *token* of the Kafka record it came from:
  ``topic:partition:offset``), and the ``claim``: the token of the record that completed the pair. A record
  claims the slot when its own side is stored (it was the first of its side, or this is its redelivery)
  and the other side is there.
- Lanes: ``/v1/recommend`` logs one prediction record per returned item, all sharing the response's
  prediction_id, so a prediction record's lane is its ``item_id``. An outcome naming an ``item_id`` joins
  that item's record; an outcome naming none joins the *first* record logged for the id (the only one for
  ``/v1/predict``, the top-ranked item for ``/v1/recommend``; records of one id share a partition, so
  "first" is well defined). A prediction logged without an item only matches outcomes naming no item.
- ``decide`` reads the slot as the script left it and returns the result, the metric to count, the example
  to publish and whether the outcome goes to the dead-letter topic.

Delivery guarantees. Exactly one record per prediction ever claims its slot, so at most one *distinct*
example (one label) is ever produced for a prediction, however many outcomes are sent. The claiming
record re-emits the same example whenever it is redelivered (a crash between the claim and the publish,
or a Kafka outage that makes the consumer retry the batch): examples are at-least-once, duplicates are
byte-identical and keyed by the same prediction_id, so a compacting or deduplicating reader sees one.
Counters (``OUTCOMES``, ``EXAMPLES``) move only on the first claim, so redelivery does not inflate them. The
quality sums take the claiming record on every delivery and count it exactly once themselves (per key, the last
offset of each source partition, see ``rtml.feedback.quality``): a crash or failure between the claim and the
quality write loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from rtml.core.schemas import Example, Outcome, PredictionLogged

Side = Literal["p", "o"]
JoinWindow = int | Callable[[str], int]  # ms, or ms per model name (see ``join_windows``)
PREDICTION: Side = "p"
OUTCOME: Side = "o"


class Result(StrEnum):
    """What happened to one consumed record. The ``OUTCOMES`` metric counts some of these (``counted``)."""

    JOINED = "joined"  # this record completed the pair: publish the example
    LATE = "late"  # completed the pair, but the outcome came after prediction ts + join_ttl
    UNMATCHED = "unmatched"  # an outcome parked until its prediction arrives
    DUPLICATE = "duplicate"  # another outcome for the same prediction was already taken
    PARKED = "parked"  # a prediction waiting for its outcome
    REDELIVERED = "redelivered"  # a record already applied (its pair was completed by the other side)
    IGNORED = "ignored"  # a second prediction record with an already known prediction_id


def prediction_lane(prediction: PredictionLogged) -> str:
    return f"i:{prediction.item_id}" if prediction.item_id is not None else "-"


def outcome_lane(outcome: Outcome) -> str:
    return f"i:{outcome.item_id}" if outcome.item_id is not None else "*"


@dataclass(frozen=True, slots=True)
class Slot:
    """The join slot of one prediction_id and lane after ``join.lua`` applied one record to it."""

    mine: bool  # the slot's entry for this record's side came from this very record
    stored_now: bool  # ... and was written by this call (first delivery)
    claim: str | None  # token of the record that completed the pair, if any
    claimed_now: bool  # this call completed the pair
    prediction: bytes | None  # the stored prediction record value (JSON)
    outcome: bytes | None  # the stored outcome record value (JSON)
    outcome_token: str | None = None  # token of the Kafka record the stored outcome came from


@dataclass(frozen=True, slots=True)
class Decision:
    result: Result
    count: str | None = None  # OUTCOMES label to increment, None for nothing
    example: Example | None = None  # publish on "examples"
    dead_letter_reason: str | None = None  # send the outcome to "deadletter" with this reason
    first: bool = False  # first time this example is produced: update the quality sums


def is_late(prediction: PredictionLogged, outcome: Outcome, join_ttl_ms: int) -> bool:
    """An outcome is late when its ts is after the prediction's ts plus the join window."""
    return outcome.ts > prediction.ts + join_ttl_ms


def join_windows(default_ms: int, rule_windows: dict[str, int]) -> Callable[[str], int]:
    """The join window of each model: ``RTML_JOIN_TTL``, or longer for a model whose label rule needs it
    (a rule's negative label comes at the end of its window plus grace: the join must still hold the
    prediction then, and must not call that label late)."""

    def window(model: str) -> int:
        return max(default_ms, rule_windows.get(model, 0))

    return window


def make_example(prediction: PredictionLogged, outcome: Outcome) -> Example:
    """The training row: the exact features and score the model used, with the observed label."""
    return Example(
        prediction_id=prediction.prediction_id,
        model=prediction.model,
        version=prediction.version,
        entities=prediction.entities,
        features=prediction.features,
        score=prediction.score,
        label=outcome.label,
        predicted_at=prediction.ts,
        labelled_at=outcome.ts,
        item_id=prediction.item_id,
        shadow=prediction.shadow,
    )


def decide(side: Side, token: str, slot: Slot, join_ttl_ms: JoinWindow) -> Decision:
    """What to do with one record (``side``, from the Kafka record ``token``) given its slot."""
    if slot.claim is not None and slot.claim == token:
        return _completed(slot, join_ttl_ms)
    if slot.claim is not None:
        # The pair was completed by another record.
        if slot.mine:
            return Decision(Result.REDELIVERED)
        if side == OUTCOME:
            return Decision(Result.DUPLICATE, count=Result.DUPLICATE.value)
        return Decision(Result.IGNORED)
    # Not paired yet: the other side is absent (the script claims as soon as both are there).
    if not slot.mine:
        if side == OUTCOME:
            return Decision(Result.DUPLICATE, count=Result.DUPLICATE.value)
        return Decision(Result.IGNORED)
    if side == OUTCOME:
        return Decision(Result.UNMATCHED, count=Result.UNMATCHED.value if slot.stored_now else None)
    return Decision(Result.PARKED)


def _completed(slot: Slot, join_window: JoinWindow) -> Decision:
    if slot.prediction is None or slot.outcome is None:
        raise ValueError("a claimed join slot must hold both a prediction and an outcome")
    prediction = PredictionLogged.model_validate_json(slot.prediction)
    outcome = Outcome.model_validate_json(slot.outcome)
    first = slot.claimed_now
    join_ttl_ms = join_window if isinstance(join_window, int) else join_window(prediction.model)
    if is_late(prediction, outcome, join_ttl_ms):
        reason = (
            f"late outcome: ts {outcome.ts} is {outcome.ts - prediction.ts} ms after prediction "
            f"{prediction.prediction_id} (ts {prediction.ts}); the join window is {join_ttl_ms} ms"
        )
        return Decision(Result.LATE, count=Result.LATE.value if first else None, dead_letter_reason=reason)
    return Decision(
        Result.JOINED,
        count=Result.JOINED.value if first else None,
        example=make_example(prediction, outcome),
        first=first,
    )
