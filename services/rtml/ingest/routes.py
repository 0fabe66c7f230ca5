"""``POST /v1/events``: validate, publish with acks=all, answer 202 only once the broker has them."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel

from rtml.core import metrics
from rtml.core.app import require
from rtml.core.errors import BadRequest
from rtml.core.kafka import Producer
from rtml.core.schemas import EventIn
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.ingest.validate import parse_events

router = APIRouter(prefix="/v1", tags=["ingest"])


class Accepted(BaseModel):
    accepted: int


_EVENT_SCHEMA = EventIn.model_json_schema(ref_template="#/components/schemas/{model}")
_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        _EVENT_SCHEMA,
                        {
                            "type": "object",
                            "properties": {"events": {"type": "array", "items": _EVENT_SCHEMA, "maxItems": 10_000}},
                            "required": ["events"],
                        },
                    ]
                }
            }
        },
    }
}


@router.post(
    "/events",
    status_code=202,
    response_model=Accepted,
    dependencies=[require("ingest")],
    openapi_extra=_BODY_DOC,
    responses={422: {"description": "invalid events, each named by index and field; nothing published"}},
)
async def post_events(request: Request) -> Accepted:
    """One event, or ``{"events": [...]}`` (<= 10,000). 202 once the broker acknowledged all of them."""
    settings: Settings = request.app.state.settings
    producer: Producer = request.app.state.producer
    body = await request.body()
    metrics.INGEST_BYTES.inc(len(body))
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    try:
        records = parse_events(
            data, now=now_ms(), max_future_ms=settings.max_future_s * 1000, max_events=settings.max_batch_events
        )
    except Exception:
        metrics.INGEST_REJECTED.inc()
        raise
    await producer.send_many("events", records)
    metrics.INGEST_EVENTS.inc(len(records))
    return Accepted(accepted=len(records))
