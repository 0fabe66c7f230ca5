"""``rtml serve NAME``: one service in the foreground (what a container runs)."""

from __future__ import annotations

import contextlib
import enum
import importlib
import logging
import os
import signal
import threading
import time

import typer
import uvicorn
from fastapi import FastAPI

from rtml.cli.common import CliError, configure_logging, load_settings, run
from rtml.core.kafka import create_topics
from rtml.core.settings import Settings

log = logging.getLogger(__name__)


class Service(enum.StrEnum):
    ingest = "ingest"
    features = "features"
    serving = "serving"
    feedback = "feedback"


def create_service_app(name: Service, settings: Settings) -> FastAPI:
    module = importlib.import_module(f"rtml.{name.value}.app")
    app: FastAPI = module.create_app(settings)
    return app


def _exit_with_parent(parent_pid: int) -> None:
    """Under ``rtml up``: stop gracefully if the parent disappears (killed -9), so no service is orphaned."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        log.warning("parent process %d is gone; shutting down", parent_pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(
    name: Service = typer.Argument(..., help="ingest, features, serving or feedback"),  # noqa: B008
    parent_pid: int | None = typer.Option(None, hidden=True, help="exit when this process is gone (rtml up)"),
) -> None:
    """Run one service until SIGTERM/SIGINT (graceful: in-flight requests finish, consumers commit)."""
    settings = load_settings()
    configure_logging(settings.log_level)
    run(create_topics(settings), settings)  # idempotent; a service may start alone in a container
    app = create_service_app(name, settings)
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port_of(name.value),
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        access_log=False,
        proxy_headers=False,  # nothing uses the client address; it costs a middleware on every request
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=4,
    )
    server = uvicorn.Server(config)
    # The app's lifespan runs gc.collect() + gc.freeze() once its resources are open (rtml.core.app).
    server.run()
    if not server.started:
        raise CliError(
            f"{name.value} did not start on {settings.host}:{settings.port_of(name.value)}; see the log above"
        )
