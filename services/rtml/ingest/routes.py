"""``POST /v1/events``: validate, publish with acks=all, answer 202 only once the broker has them.

Admission (per process, ``Admission``): past ``RTML_INGEST_MAX_IN_FLIGHT`` requests in flight the next one is
answered 503 ``overloaded`` with ``Retry-After`` at once, before its body is read; past
``RTML_INGEST_MAX_PENDING_EVENTS`` events waiting for the broker's acks, a request is refused the same way once
its events are counted; with ``RTML_MAX_LOOP_LAG_MS`` set, past the lower cap on requests in flight that the
event loop's lag sets while the loop is that far behind on its own work (``rtml.core.looplag``), requests are
refused the same way before their body is read. All are
counted in ``rtml_ingest_shed_total``. So a burst beyond what the broker acknowledges costs bounded memory and
quick refusals, not a queue that times everyone out.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel

from rtml.core import metrics
from rtml.core.app import require
from rtml.core.errors import BadRequest, Overloaded
from rtml.core.kafka import Producer
from rtml.core.looplag import LoopLag
from rtml.core.schemas import EventIn
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.ingest.validate import parse_events

router = APIRouter(prefix="/v1", tags=["ingest"])


class Admission:
    """The in-flight counts of one ingest process (one event loop: plain integers, no lock), and its loop's lag
    (``rtml.core.looplag``: the cap on requests in flight while the process is behind on its own work)."""

    def __init__(self, max_in_flight: int, max_pending_events: int, lag: LoopLag) -> None:
        self.max_in_flight = max_in_flight
        self.max_pending_events = max_pending_events
        self.lag = lag
        self.in_flight = 0
        self.pending_events = 0
        lag.watch(lambda: self.in_flight)  # its cap halves from what is in flight

    @property
    def full(self) -> bool:
        return self.in_flight >= self.max_in_flight or not self.lag.admits(self.in_flight)

    def refusal(self) -> Overloaded:
        """The 503 for a request that finds the process full, counted as shed."""
        metrics.INGEST_SHED.inc()
        if self.in_flight >= self.max_in_flight:
            return Overloaded(f"more than {self.max_in_flight} ingest requests in flight; retry shortly")
        return self.lag.refusal()

    def enter(self) -> None:
        if self.full:
            raise self.refusal()
        self.in_flight += 1
        metrics.INGEST_IN_FLIGHT.set(self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1
        metrics.INGEST_IN_FLIGHT.set(self.in_flight)

    def reserve(self, events: int) -> None:
        """Count ``events`` as waiting for acks, or refuse them (one request always fits when none wait)."""
        if self.pending_events and self.pending_events + events > self.max_pending_events:
            metrics.INGEST_SHED.inc()
            raise Overloaded(f"more than {self.max_pending_events} events waiting for the broker; retry shortly")
        self.pending_events += events
        metrics.INGEST_PENDING_EVENTS.set(self.pending_events)

    def release(self, events: int) -> None:
        self.pending_events -= events
        metrics.INGEST_PENDING_EVENTS.set(self.pending_events)


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
                            "additionalProperties": False,  # parse_events refuses any other key (422)
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
    responses={
        422: {"description": "invalid events, each named by index and field; nothing published"},
        503: {
            "description": "overloaded (too many requests or events in flight, or more than the process takes "
            "while behind on its own work) or the broker did not acknowledge: nothing of the request is "
            "acknowledged; retry after Retry-After seconds"
        },
    },
)
async def post_events(request: Request) -> Accepted:
    """One event, or ``{"events": [...]}`` (<= 10,000). 202 once the broker acknowledged all of them."""
    admission: Admission = request.app.state.admission
    admission.enter()  # 503 at once past the limit, before the body is read
    try:
        return await _accept(request, admission)
    finally:
        admission.leave()


async def _accept(request: Request, admission: Admission) -> Accepted:
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
    admission.reserve(len(records))
    try:
        await producer.send_many("events", records)
    finally:
        admission.release(len(records))
    metrics.INGEST_EVENTS.inc(len(records))
    return Accepted(accepted=len(records))
