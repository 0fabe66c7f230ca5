"""Admission for the request path: a per-request deadline, and a cap on requests in flight.

Web apps call predict on their own request path, so a slow answer is worse than a quick fallback:

- **Deadline.** ``X-Request-Timeout-Ms`` (else ``RTML_PREDICT_TIMEOUT_MS``) sets when the request must be
  answered. The feature read gets what is left of it; when Redis is slower, the read is abandoned and the
  model scores with defaults, ``degraded: true`` (see ``Predictor``). The deadline travels in a context
  variable, so the route code stays unaware of it.
- **Shedding.** Past ``RTML_PREDICT_MAX_IN_FLIGHT`` requests in this process, the next one is answered 503 with
  ``Retry-After`` at once instead of queueing into everyone's timeouts.

A pure ASGI middleware: it costs a few attribute lookups per request, not a task.
"""

from __future__ import annotations

import asyncio
import contextvars

from starlette.types import ASGIApp, Receive, Scope, Send

from rtml.core import metrics
from rtml.core.app import error_response
from rtml.core.errors import BadRequest, Overloaded

HEADER = b"x-request-timeout-ms"
MAX_TIMEOUT_MS = 60_000

# loop.time() by which the current request must be answered; None outside admitted requests
DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("rtml_deadline", default=None)


def remaining_s() -> float | None:
    """Seconds left before the current request's deadline (may be <= 0); None when there is none."""
    deadline = DEADLINE.get()
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, *, paths: tuple[str, ...], max_in_flight: int, timeout_ms: int) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.max_in_flight = max_in_flight
        self.default_timeout_s = timeout_ms / 1000
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            metrics.SERVING_SHED.labels(route=scope["path"]).inc()
            msg = f"more than {self.max_in_flight} requests in flight; retry shortly"
            await error_response(Overloaded(msg))(scope, receive, send)
            return
        timeout_s = self.default_timeout_s
        for name, value in scope["headers"]:
            if name == HEADER:
                try:
                    ms = int(value)
                except ValueError:
                    ms = 0
                if not 1 <= ms <= MAX_TIMEOUT_MS:
                    err = BadRequest(f"X-Request-Timeout-Ms must be a whole number of ms from 1 to {MAX_TIMEOUT_MS}")
                    await error_response(err)(scope, receive, send)
                    return
                timeout_s = ms / 1000
        token = DEADLINE.set(asyncio.get_running_loop().time() + timeout_s)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            DEADLINE.reset(token)
