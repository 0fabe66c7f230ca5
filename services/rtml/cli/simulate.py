"""``rtml simulate``: the synthetic clickstream; ``rtml simulate-outcomes`` (hidden): the outcome simulator."""

from __future__ import annotations

import asyncio
import logging
import signal
from enum import StrEnum

import httpx
import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from rtml.cli.common import err, load_client_settings, quiet_logging, run
from rtml.core.errors import RtmlError
from rtml.core.kafka import Producer, create_topics
from rtml.core.settings import Settings
from rtml.simulate.outcomes import run_outcomes
from rtml.simulate.senders import HttpSender, KafkaSender, Sender, run_clickstream
from rtml.simulate.world import Clickstream, World

log = logging.getLogger(__name__)


class Via(StrEnum):
    http = "http"
    kafka = "kafka"


def _stop_on_signals() -> asyncio.Event:
    """SIGINT/SIGTERM end the run after the current batch, so the summary line is still printed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _clickstream(
    settings: Settings, stream: Clickstream, via: Via, url: str, rate: float, duration: float | None, keep_going: bool
) -> int:
    stop = _stop_on_signals()
    total = rate * duration if duration else None
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed:.0f} events"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"{rate:g} events/s via {via.value}", total=total)
        errors = 0

        def on_error(exc: RtmlError) -> None:
            nonlocal errors
            errors += 1
            if errors == 1 or errors % 50 == 0:
                progress.console.print(f"send failed ({errors} so far), batch dropped: {exc.message}")

        async def go(sender: Sender) -> int:
            return await run_clickstream(
                sender, stream, rate=rate, duration_s=duration, stop=stop,
                on_sent=lambda n: progress.advance(task, n), on_error=on_error if keep_going else None,
            )  # fmt: skip

        if via is Via.kafka:
            await create_topics(settings)
            async with Producer(settings) as producer:
                return await go(KafkaSender(producer, settings))
        async with httpx.AsyncClient(timeout=10.0) as client:
            return await go(HttpSender(client, url))


def simulate(
    rate: float = typer.Option(100.0, min=0.1, help="events per second"),
    users: int = typer.Option(1000, min=1, help="simulated users u0..uN-1"),
    items: int = typer.Option(200, min=1, help="simulated items t0..tN-1"),
    duration: float = typer.Option(60.0, min=0.0, help="seconds; 0 = until Ctrl-C"),
    via: Via = typer.Option(Via.http, help="POST to ingest, or publish to Kafka in ingest's shape"),  # noqa: B008
    seed: int = typer.Option(0, help="same seed, same users, items and events"),
    ingest_url: str | None = typer.Option(None, help="default http://RTML_HOST:RTML_INGEST_PORT"),
    keep_going: bool = typer.Option(False, "--keep-going", hidden=True, help="drop failed batches, go on"),
) -> None:
    """Synthetic clickstream (views, clicks, purchases with an amount) at a steady rate."""
    settings = load_client_settings()
    quiet_logging()
    stream = Clickstream(World(users, items, seed))
    url = ingest_url or f"http://{settings.host}:{settings.ingest_port}"
    sent = run(_clickstream(settings, stream, via, url, rate, duration or None, keep_going), settings)
    err.print(f"sent {sent} events via {via.value}")


def simulate_outcomes(
    rate: float = typer.Option(2.0, min=0.1, help="recommendation rounds per second"),
    users: int = typer.Option(1000, min=1),
    items: int = typer.Option(200, min=1),
    duration: float = typer.Option(0.0, min=0.0, help="seconds; 0 = until Ctrl-C"),
    seed: int = typer.Option(0),
) -> None:
    """Recommend, click by the simulated ground truth, report outcomes (used by ``rtml up --demo``)."""
    s = load_client_settings()
    base = f"http://{s.host}"

    async def go() -> int:
        return await run_outcomes(
            World(users, items, seed),
            serving_url=f"{base}:{s.serving_port}",
            feedback_url=f"{base}:{s.feedback_port}",
            ingest_url=f"{base}:{s.ingest_port}",
            rate=rate,
            duration_s=duration or None,
            seed=seed,
            stop=_stop_on_signals(),
        )

    quiet_logging()
    posted = run(go(), s)
    err.print(f"posted {posted} outcomes")
