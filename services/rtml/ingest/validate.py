"""Validation of ``POST /v1/events`` bodies (pure): every bad event is named by index and field.

The output is what ingest publishes: ``(key, value)`` records, the value an :class:`~rtml.core.schemas.Event`
as JSON (``event_id`` filled in, ``ts`` in epoch ms, ``received_at``), the key the user id (per-user order).
"""

from __future__ import annotations

import os
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from rtml.core.errors import MAX_DETAILS, InvalidInput, PayloadTooLarge
from rtml.core.schemas import EventIn

Record = tuple[bytes | None, bytes]
_BATCH = TypeAdapter(list[EventIn])


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(event)"


def parse_events(data: Any, *, now: int, max_future_ms: int, max_events: int) -> list[Record]:
    """One event object or ``{"events": [...]}`` -> the records to publish; all or nothing."""
    if isinstance(data, dict) and "events" in data:
        if set(data) != {"events"}:
            raise InvalidInput("a batch body has only the key 'events'")
        items = data["events"]
        if not isinstance(items, list):
            raise InvalidInput("'events' must be a list of event objects")
        if len(items) > max_events:
            raise PayloadTooLarge(f"a batch holds at most {max_events} events, got {len(items)}")
        single = False
    elif isinstance(data, dict):
        items, single = [data], True
    else:
        raise InvalidInput('the body must be an event object or {"events": [...]}')

    try:
        valid = _BATCH.validate_python(items)  # one pass in pydantic-core for the whole batch
    except ValidationError:
        valid = None
    if valid is None:
        raise _invalid(single, _errors_one_by_one(items, now, max_future_ms))
    ids = os.urandom(16 * len(valid)).hex()  # one syscall for all the missing event_ids
    limit = now + max_future_ms
    records: list[Record] = []
    for i, ev in enumerate(valid):
        ts = now if ev.ts is None else ev.ts
        if ts > limit:
            raise _invalid(single, _errors_one_by_one(items, now, max_future_ms))
        user = ev.user_id
        value = orjson.dumps(
            {"event_id": ev.event_id or ids[32 * i : 32 * i + 32], "type": ev.type, "user_id": user,
             "item_id": ev.item_id, "ts": ts, "received_at": now, "properties": ev.properties}
        )  # fmt: skip
        records.append((None if user is None else user.encode(), value))
    return records


def _errors_one_by_one(items: list[Any], now: int, max_future_ms: int) -> list[dict[str, Any]]:
    """Every problem of every event, by index and field (the slow path: only for a batch that is refused)."""
    errors: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            ev = EventIn.model_validate(item)
        except ValidationError as exc:
            for err in exc.errors():
                msg = err["msg"].removeprefix("Value error, ")
                errors.append({"index": index, "field": _field(err["loc"]), "message": msg})
            continue
        if ev.ts is not None and ev.ts > now + max_future_ms:
            errors.append({"index": index, "field": "ts",
                           "message": f"ts is more than {max_future_ms // 1000} s in the future"})  # fmt: skip
    return errors


def _invalid(single: bool, errors: list[dict[str, Any]]) -> InvalidInput:
    what = "the event is invalid" if single else f"{len({e['index'] for e in errors})} event(s) are invalid"
    first = errors[0]
    listed = "" if len(errors) <= MAX_DETAILS else f"; {len(errors)} problems, the first {MAX_DETAILS} listed"
    first_text = f"index {first['index']}, {first['field']}: {first['message']}"
    return InvalidInput(f"{what}; nothing was published (first: {first_text}){listed}", details=errors[:MAX_DETAILS])
