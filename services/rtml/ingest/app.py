"""The ingest service: HTTP events -> ``rtml.events``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from rtml.core.app import ReadinessCheck, build_app
from rtml.core.kafka import Producer
from rtml.core.settings import Settings
from rtml.ingest.routes import Admission, router


@contextlib.asynccontextmanager
async def _open(app: FastAPI, settings: Settings) -> AsyncIterator[dict[str, ReadinessCheck]]:
    async with Producer(settings) as producer:
        app.state.producer = producer
        yield {"kafka": producer.ping}


def create_app(settings: Settings) -> FastAPI:
    app = build_app("ingest", settings, _open)
    app.state.admission = Admission(settings.ingest_max_in_flight, settings.ingest_max_pending_events)
    app.include_router(router)
    return app
