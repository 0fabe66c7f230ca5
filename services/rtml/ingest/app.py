"""The ingest service: HTTP events -> ``rtml.events``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from rtml.core import metrics
from rtml.core.app import ReadinessCheck, build_app, error_response
from rtml.core.errors import RtmlError
from rtml.core.kafka import Producer
from rtml.core.settings import Settings
from rtml.ingest.routes import Admission, router

if TYPE_CHECKING:
    from rtml.core.early import Headers  # a type only: the app does not need uvicorn's protocol

EVENTS_PATH = "/v1/events"
_EVENTS_PATH_BYTES = EVENTS_PATH.encode()


class IngestApp(FastAPI):
    """The ingest app, with the refusal of an overloaded ``POST /v1/events`` answered before FastAPI's stack.

    Under overload most requests are refused, so a refusal must cost far less than an admitted request: going
    through the middleware stack, the router and the dependencies would spend the CPU the admitted ones need
    (measured: admitted throughput halved at 2x). When the process is full (``Admission.full``) and the
    caller's key is good, the 503 is written here (counted like the route would: shed and request metrics).
    Otherwise the route admits or refuses as usual (``Admission.enter``); a caller without a valid key still
    gets its 401/403 from there. Under ``rtml serve`` the HTTP protocol asks ``early_refusal`` first and
    writes the same 503 before a task exists (``rtml.core.early``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == EVENTS_PATH and scope["method"] == "POST":
            admission: Admission = self.state.admission
            if admission.full and self.state.api_keys.allows(scope["headers"], "ingest"):
                await self._refuse(admission, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def early_refusal(self, method: bytes, path: bytes, headers: Headers) -> RtmlError | None:
        """The 503 ``__call__`` would write for this request, counted the same way; None to go on."""
        if method != b"POST" or path != _EVENTS_PATH_BYTES:
            return None
        started = time.perf_counter()
        admission: Admission = self.state.admission
        if not admission.full or not self.state.api_keys.allows(headers, "ingest"):
            return None
        exc = admission.refusal()
        _count(exc, started)
        return exc

    async def _refuse(self, admission: Admission, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        exc = admission.refusal()
        await error_response(exc)(scope, receive, send)
        _count(exc, started)


def _count(exc: RtmlError, started: float) -> None:
    """Request metrics of a refusal answered before the route (as the route's would be)."""
    metrics.HTTP_REQUEST_SECONDS.labels("ingest", EVENTS_PATH, "POST").observe(time.perf_counter() - started)
    metrics.HTTP_REQUESTS.labels("ingest", EVENTS_PATH, "POST", str(exc.status)).inc()


@contextlib.asynccontextmanager
async def _open(app: FastAPI, settings: Settings) -> AsyncIterator[dict[str, ReadinessCheck]]:
    async with Producer(settings) as producer:
        app.state.producer = producer
        yield {"kafka": producer.ping}


def create_app(settings: Settings) -> IngestApp:
    app = build_app("ingest", settings, _open, app_class=IngestApp)
    assert isinstance(app, IngestApp)
    app.state.admission = Admission(
        settings.ingest_max_in_flight, settings.ingest_max_pending_events, app.state.loop_lag
    )
    app.include_router(router)
    return app
