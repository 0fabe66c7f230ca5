"""Validation of ``POST /v1/events`` bodies (pure): every bad event is named by index and field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from rtml.core.errors import InvalidInput, PayloadTooLarge
from rtml.core.schemas import Event, EventIn, normalize_event


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(event)"


def parse_events(data: Any, *, now: int, max_future_ms: int, max_events: int) -> list[Event]:
    """One event object or ``{"events": [...]}`` -> normalised events; all or nothing."""
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

    events: list[Event] = []
    errors: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        try:
            ev = EventIn.model_validate(item)
            events.append(normalize_event(ev, now, max_future_ms))
        except ValidationError as exc:
            for err in exc.errors():
                msg = err["msg"].removeprefix("Value error, ")
                errors.append({"index": index, "field": _field(err["loc"]), "message": msg})
        except ValueError as exc:  # normalize_event: the clock-dependent checks are about ts
            errors.append({"index": index, "field": "ts", "message": str(exc)})
    if errors:
        what = "the event is invalid" if single else f"{len({e['index'] for e in errors})} event(s) are invalid"
        first = errors[0]
        raise InvalidInput(
            f"{what}; nothing was published (first: index {first['index']}, {first['field']}: {first['message']})",
            details=errors,
        )
    return events
