from __future__ import annotations

import pytest

from rtml.core.errors import InvalidInput, PayloadTooLarge
from rtml.core.schemas import Event
from rtml.ingest.validate import parse_events

NOW = 1_800_000_000_000


def parse(data: object) -> list[Event]:
    """The published records, decoded as the consumers decode them (so the wire format is what is tested)."""
    records = parse_events(data, now=NOW, max_future_ms=300_000, max_events=3)
    events = [Event.model_validate_json(value) for _, value in records]
    assert [key for key, _ in records] == [None if e.user_id is None else e.user_id.encode() for e in events]
    return events


def test_single_event_gets_an_id_and_receive_time() -> None:
    [e] = parse({"type": "view", "user_id": "u1", "properties": {"amount": 2.5, "n": 3, "ok": True}})
    assert e.ts == NOW and e.received_at == NOW and len(e.event_id) == 32
    assert (e.type, e.user_id, e.item_id, e.properties) == ("view", "u1", None, {"amount": 2.5, "n": 3, "ok": True})


def test_generated_ids_are_distinct_and_given_ids_kept() -> None:
    a, b, c = parse({"events": [{"type": "v"}, {"type": "v"}, {"type": "v", "event_id": "mine"}]})
    assert a.event_id != b.event_id and c.event_id == "mine"


def test_rfc3339_and_epoch_ms_timestamps() -> None:
    a, b = parse({"events": [{"type": "v", "ts": "2027-01-15T08:00:00+01:00"}, {"type": "v", "ts": 1234}]})
    assert a.ts == NOW - 3_600_000  # 08:00+01:00 is an hour before NOW
    assert b.ts == 1234


def test_rfc3339_offset_is_applied() -> None:
    [a] = parse({"type": "v", "ts": "2020-01-01T01:00:00+01:00"})
    [b] = parse({"type": "v", "ts": "2020-01-01T00:00:00Z"})
    assert a.ts == b.ts == 1_577_836_800_000


def test_future_within_five_minutes_is_accepted_beyond_is_not() -> None:
    parse({"type": "v", "ts": NOW + 300_000})
    with pytest.raises(InvalidInput) as exc:
        parse({"type": "v", "ts": NOW + 300_001})
    assert exc.value.details == [{"index": 0, "field": "ts", "message": "ts is more than 300 s in the future"}]
    with pytest.raises(InvalidInput) as exc:  # every bad event is named, not only the first
        parse({"events": [{"type": "v", "ts": NOW + 400_000}, {"type": "v"}, {"type": ""}]})
    assert [(d["index"], d["field"]) for d in exc.value.details] == [(0, "ts"), (2, "type")]


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"user_id": "u"}, "type"),
        ({"type": ""}, "type"),
        ({"type": "v", "user_id": 7}, "user_id"),
        ({"type": "v", "ts": True}, "ts"),
        ({"type": "v", "ts": "2020-01-01T00:00:00"}, "ts"),  # no offset
        ({"type": "v", "properties": {"a": {"nested": 1}}}, "properties.a"),
        ({"type": "v", "extra": 1}, "extra"),
        ({"type": "v", "ts": -(10**30)}, "ts"),  # would not fit the published JSON (64-bit)
        ({"type": "v", "properties": {"big": 10**20}}, "properties"),
    ],
)
def test_each_bad_field_is_named(event: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse({"events": [{"type": "ok"}, event]})
    assert exc.value.details
    assert {d["index"] for d in exc.value.details} == {1}
    assert any(d["field"].startswith(field) for d in exc.value.details), exc.value.details


def test_batch_limits_and_shapes() -> None:
    with pytest.raises(PayloadTooLarge):
        parse({"events": [{"type": "v"}] * 4})
    with pytest.raises(InvalidInput):
        parse({"events": {"type": "v"}})
    with pytest.raises(InvalidInput):
        parse("view")
    assert parse({"events": []}) == []
