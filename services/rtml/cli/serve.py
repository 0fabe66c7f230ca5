"""``rtml serve NAME``: one service in the foreground (what a container runs).

``RTML_WORKERS`` (or ``--workers``) N > 1 runs N uvicorn worker processes on the one port, each with the whole
service (its own producer, Redis pool and consumer-group members: the group spreads the partitions over them).
The workers keep their metrics in prometheus-client's multiprocess mode, in a fresh directory made for this run
(``PROMETHEUS_MULTIPROC_DIR``, removed when it ends), so ``GET /metrics`` on any worker shows the service's
totals (see rtml.core.metrics). With one worker (the default) the service runs in this process, as before.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import inspect
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
import uvicorn
from fastapi import FastAPI
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess

from rtml.cli.common import CliError, configure_logging, load_settings, run
from rtml.core.early import RefusingHttpToolsProtocol
from rtml.core.kafka import create_topics
from rtml.core.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own switch, read at its import in each worker


class Service(enum.StrEnum):
    ingest = "ingest"
    features = "features"
    serving = "serving"
    feedback = "feedback"


def create_service_app(name: Service, settings: Settings) -> FastAPI:
    module = importlib.import_module(f"rtml.{name.value}.app")
    app: FastAPI = module.create_app(settings)
    return app


def _worker_app(name: Service) -> FastAPI:
    """The app of one worker process: settings from the environment it inherited from ``rtml serve``."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return create_service_app(name, settings)


# uvicorn starts workers by import string (they are spawned, not forked): one factory per service.
def ingest_app() -> FastAPI:
    return _worker_app(Service.ingest)


def features_app() -> FastAPI:
    return _worker_app(Service.features)


def serving_app() -> FastAPI:
    return _worker_app(Service.serving)


def feedback_app() -> FastAPI:
    return _worker_app(Service.feedback)


def _exit_with_parent(parent_pid: int) -> None:
    """Under ``rtml up``: stop gracefully if the parent disappears (killed -9), so no service is orphaned."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        log.warning("parent process %d is gone; shutting down", parent_pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# How long an idle keep-alive connection stays open. Longer than clients keep theirs (httpx: 5 s) and than load
# balancers do (AWS ALB: 60 s), so that they, not rtml, close an idle one: a server closing first races every
# client reusing it (the request leaves as the connection closes; the caller gets a connection error, not an
# answer). uvicorn's default, 5 s, lost that race in CI. 75 s is nginx's default.
KEEP_ALIVE_S = 75


def _uvicorn_options(settings: Settings, name: Service) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port_of(name.value),
        "loop": "uvloop",
        "http": RefusingHttpToolsProtocol,  # httptools, with load refusals written before a task exists
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "proxy_headers": False,  # nothing uses the client address; it costs a middleware on every request
        "server_header": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "timeout_keep_alive": KEEP_ALIVE_S,
    }


class _Server(uvicorn.Server):
    """uvicorn re-raises the SIGTERM/SIGINT it handled once its graceful shutdown is over, so the process dies
    of the signal (exit status -15, 143 in a shell) even after draining requests and committing offsets.
    ``rtml serve`` exits 0 then instead: a clean stop reads as one (a container is "Completed", not "Error"),
    and a process killed before or during its shutdown still shows the signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()


class _Supervisor(Multiprocess):
    """uvicorn's worker supervisor (restarts a worker that died, SIGHUP replaces them all, SIGTTIN/SIGTTOU add
    and remove one) plus prometheus-client's bookkeeping: every worker that is gone, whatever the way, is
    marked dead so its "live" gauges stop counting (a worker that exits cleanly also does it itself)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], metrics_dir: Path) -> None:
        kwargs: dict[str, Any] = {"config": config, "sockets": sockets}
        if "target" in inspect.signature(Multiprocess.__init__).parameters:  # uvicorn < 0.3x took the target
            kwargs["target"] = uvicorn.Server(config).run
        super().__init__(**kwargs)
        self.metrics_dir = metrics_dir

    def _reap(self, before: set[int | None]) -> None:
        for pid in before - {p.pid for p in self.processes}:
            if pid is not None:
                mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]

    def keep_subprocess_alive(self) -> None:
        before = {p.pid for p in self.processes}
        super().keep_subprocess_alive()
        self._reap(before)

    def restart_all(self) -> None:
        before = {p.pid for p in self.processes}
        super().restart_all()
        self._reap(before)

    def handle_ttou(self) -> None:
        before = {p.pid for p in self.processes}
        super().handle_ttou()
        self._reap(before)


def _serve_workers(name: Service, settings: Settings, workers: int) -> None:
    """N worker processes behind one socket, metrics in a fresh multiprocess directory for this run."""
    metrics_dir = Path(tempfile.mkdtemp(prefix=f"rtml-{name.value}-metrics-"))  # new, hence empty
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(metrics_dir)  # inherited by the spawned workers
    try:
        config = uvicorn.Config(f"rtml.cli.serve:{name.value}_app", factory=True, workers=workers,
                                **_uvicorn_options(settings, name))  # fmt: skip
        try:
            sock = config.bind_socket()
        except SystemExit:  # uvicorn logged why (address in use, permission)
            raise CliError(f"{name.value} cannot listen on {settings.host}:{settings.port_of(name.value)}; "
                           "see the log above") from None  # fmt: skip
        try:
            supervisor = _Supervisor(config, [sock], metrics_dir)
            supervisor.run()
        finally:
            sock.close()
        if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
            raise CliError(f"{name.value} workers did not start; see the log above")
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(metrics_dir, ignore_errors=True)


def serve(
    name: Service = typer.Argument(..., help="ingest, features, serving or feedback"),  # noqa: B008
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="uvicorn worker processes (default RTML_WORKERS, 1)", show_default=False
    ),
    parent_pid: int | None = typer.Option(None, hidden=True, help="exit when this process is gone (rtml up)"),
) -> None:
    """Run one service until SIGTERM/SIGINT (graceful: in-flight requests finish, consumers commit)."""
    settings = load_settings()
    configure_logging(settings.log_level)
    run(create_topics(settings), settings)  # idempotent; a service may start alone in a container
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    n = settings.workers if workers is None else workers
    if n > 1:
        _serve_workers(name, settings, n)
        return
    app = create_service_app(name, settings)
    server = _Server(uvicorn.Config(app, **_uvicorn_options(settings, name)))
    # The app's lifespan runs gc.collect() + gc.freeze() once its resources are open (rtml.core.app).
    server.run()
    if not server.started:
        raise CliError(
            f"{name.value} did not start on {settings.host}:{settings.port_of(name.value)}; see the log above"
        )
