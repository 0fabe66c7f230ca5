"""``rtml serve NAME``: one service in the foreground (what a container runs)."""

from __future__ import annotations

import asyncio
import enum
import importlib
import logging

import typer
import uvicorn

from rtml.core.kafka import create_topics
from rtml.core.settings import Settings

log = logging.getLogger(__name__)


class Service(enum.StrEnum):
    ingest = "ingest"
    features = "features"
    serving = "serving"
    feedback = "feedback"


def serve(name: Service = typer.Argument(..., help="ingest, features, serving or feedback")) -> None:  # noqa: B008
    """Run one service until SIGTERM/SIGINT."""
    from rtml.cli.main import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    asyncio.run(create_topics(settings))  # idempotent; a service may start alone in a container
    module = importlib.import_module(f"rtml.{name.value}.app")
    app = module.create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port_of(name.value),
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise typer.Exit(3)
