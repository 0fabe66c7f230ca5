"""``rtml up``: the whole platform on one machine, in the foreground, stopped cleanly by Ctrl-C/SIGTERM.

Order: infra (embedded broker and redis-server unless their variables are set) -> topics -> demo model if
none is live -> the four services as separate processes -> (``--demo``) the simulators. Shutdown runs the
other way round and finishes within 10 s: clients, services (SIGTERM, then SIGKILL after 6 s), infra.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import httpx
import typer
from rich.console import Console

from rtml.core import embedded
from rtml.core.errors import RtmlError
from rtml.core.kafka import create_topics
from rtml.core.settings import SERVICES, Settings

out = Console()
err = Console(stderr=True)
SERVICE_STOP_S = 6.0


class UpError(RtmlError):
    code = "up"


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _rtml(*args: str) -> list[str]:
    return [sys.executable, "-m", "rtml.cli.main", *args]


def _wait_ready(children: list[Child], settings: Settings, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = {c.name: c for c in children}
    with httpx.Client(timeout=1.0) as client:
        while pending:
            for name, child in list(pending.items()):
                if not child.alive():
                    raise UpError(f"{name} exited with code {child.proc.returncode}; see {child.log_path}")
                url = f"http://{settings.host}:{settings.port_of(name)}/readyz"  # type: ignore[arg-type]
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        del pending[name]
            if not pending:
                return
            if time.monotonic() > deadline:
                name, child = next(iter(pending.items()))
                raise UpError(f"{name} is not ready after {timeout_s:.0f} s; see {child.log_path}")
            time.sleep(0.2)


async def _prepare(settings: Settings) -> str | None:
    from rtml.serving.registry import ensure_demo_model

    await create_topics(settings)
    return await ensure_demo_model(settings)


def up(
    demo: bool = typer.Option(False, "--demo", help="also run the clickstream and outcome simulators"),
    no_embedded: bool = typer.Option(
        False,
        "--no-embedded",
        help="never start the embedded broker or Redis; RTML_KAFKA_BOOTSTRAP and RTML_REDIS_URL must be set",
    ),
    run_dir: Path = typer.Option(Path(".rtml"), help="where logs go"),  # noqa: B008
) -> None:
    """The whole platform on this machine: broker, Redis, four services (and simulators with --demo)."""
    settings = Settings()
    if no_embedded and not (settings.kafka.bootstrap and settings.redis.url):
        raise UpError("--no-embedded needs RTML_KAFKA_BOOTSTRAP and RTML_REDIS_URL")
    log_dir = (run_dir / "logs").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    infra: list[embedded.Managed] = []
    children: list[Child] = []
    clients: list[Child] = []
    code = 0
    try:
        env = dict(os.environ)
        bootstrap, redis_url = settings.kafka.bootstrap, settings.redis.url
        if not bootstrap:
            broker = embedded.start_broker(9092, log_dir)
            infra.append(broker)
            bootstrap = f"127.0.0.1:{broker.port}"
        if not redis_url:
            server = embedded.start_redis(6379, log_dir)
            infra.append(server)
            redis_url = f"redis://127.0.0.1:{server.port}/0"
        env["RTML_KAFKA_BOOTSTRAP"], env["RTML_REDIS_URL"] = bootstrap, redis_url
        settings = settings.model_copy(
            update={
                "kafka": settings.kafka.model_copy(update={"bootstrap": bootstrap}),
                "redis": settings.redis.model_copy(update={"url": redis_url}),
            }
        )
        with err.status("creating topics, checking the demo model…"):
            trained = asyncio.run(_prepare(settings))
        if trained:
            err.print(f"trained and registered demo model ctr version {trained}")

        children = [Child(name, _rtml("serve", name), env, log_dir) for name in SERVICES]
        with err.status("starting services…"):
            _wait_ready(children, settings, timeout_s=90)

        started = {m.name for m in infra}
        for name in SERVICES:
            out.print(f"{name:<9} http://{settings.host}:{settings.port_of(name)}", highlight=False)
        out.print(f"{'kafka':<9} {bootstrap}{' (embedded)' if 'broker' in started else ''}", highlight=False)
        out.print(f"{'redis':<9} {redis_url}{' (embedded)' if 'redis' in started else ''}", highlight=False)
        out.print(f"{'logs':<9} {log_dir}", highlight=False)
        sys.stdout.flush()

        if demo:
            clients.append(Child("simulate", _rtml("simulate", "--via", "http", "--rate", "50"), env, log_dir))
            clients.append(Child("outcomes", _rtml("simulate-outcomes", "--rate", "2"), env, log_dir))
            out.print("demo: clickstream at 50 events/s and outcomes at 2 rounds/s", highlight=False)

        while not stop.wait(0.25):
            dead = [c for c in children if not c.alive()]
            if dead:
                c = dead[0]
                err.print(f"rtml: {c.name} exited with code {c.proc.returncode}; see {c.log_path}")
                code = 1
                break
    finally:
        _shutdown(clients, children, infra)
    if code:
        raise typer.Exit(code)


def _shutdown(clients: list[Child], children: list[Child], infra: list[embedded.Managed]) -> None:
    for c in clients:
        c.terminate()
    for c in clients:
        c.wait_or_kill(time.monotonic() + 1.0)
    for c in children:
        c.terminate()
    deadline = time.monotonic() + SERVICE_STOP_S
    for c in children:
        c.wait_or_kill(deadline)
    for m in reversed(infra):
        m.stop(timeout_s=1.0)
