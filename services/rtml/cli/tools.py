"""``rtml simulate``, ``rtml train`` and the commands planned for later issues."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

import httpx
import typer
from rich.console import Console

from rtml.core.kafka import Producer, create_topics
from rtml.core.settings import Settings
from rtml.simulate.outcomes import run_outcomes
from rtml.simulate.senders import HttpSender, KafkaSender, Sender, run_clickstream
from rtml.simulate.world import Clickstream, World

err = Console(stderr=True)


class Via(StrEnum):
    http = "http"
    kafka = "kafka"


def simulate(
    rate: float = typer.Option(100.0, min=0.1, help="events per second"),
    users: int = typer.Option(1000, min=1),
    items: int = typer.Option(200, min=1),
    duration: float = typer.Option(0.0, min=0.0, help="seconds; 0 = until Ctrl-C"),
    via: Via = typer.Option(Via.http, help="post to ingest over HTTP, or publish straight to Kafka"),  # noqa: B008
    seed: int = typer.Option(0),
    ingest_url: str | None = typer.Option(None, help="default http://HOST:RTML_INGEST_PORT"),
) -> None:
    """Synthetic clickstream (views, clicks, purchases) at a steady rate."""
    settings = Settings()
    stream = Clickstream(World(users, items, seed))
    url = ingest_url or f"http://{settings.host}:{settings.ingest_port}"

    async def go() -> int:
        with err.status("simulating…") as status:
            total = 0

            def progress(n: int) -> None:
                nonlocal total
                total += n
                status.update(f"sent {total} events via {via.value}")

            if via is Via.kafka:
                await create_topics(settings)
                async with Producer(settings) as producer:
                    return await _run(KafkaSender(producer, settings), stream, rate, duration, progress)
            async with httpx.AsyncClient(timeout=10.0) as client:
                return await _run(HttpSender(client, url), stream, rate, duration, progress)

    sent = asyncio.run(go())
    err.print(f"sent {sent} events")


async def _run(
    sender: Sender, stream: Clickstream, rate: float, duration: float, progress: Callable[[int], None]
) -> int:
    return await run_clickstream(sender, stream, rate=rate, duration_s=duration or None, on_sent=progress)


def simulate_outcomes(
    rate: float = typer.Option(2.0, min=0.1, help="recommendation rounds per second"),
    users: int = typer.Option(1000, min=1),
    items: int = typer.Option(200, min=1),
    duration: float = typer.Option(0.0, min=0.0),
    seed: int = typer.Option(0),
) -> None:
    """Recommend, then click by the simulated ground truth and report outcomes (used by ``up --demo``)."""
    s = Settings()
    base = f"http://{s.host}"
    posted = asyncio.run(
        run_outcomes(
            World(users, items, seed),
            serving_url=f"{base}:{s.serving_port}",
            feedback_url=f"{base}:{s.feedback_port}",
            ingest_url=f"{base}:{s.ingest_port}",
            rate=rate,
            duration_s=duration or None,
            seed=seed,
        )
    )
    err.print(f"posted {posted} outcomes")


def train(
    examples: Path | None = typer.Option(None, exists=True, dir_okay=False, help="JSONL of {features, label}"),  # noqa: B008
    from_topic: bool = typer.Option(False, "--from-topic", help="train on rtml.examples (not yet)"),
    model: str = typer.Option("ctr", help="model name from rtml.yaml"),
    promote: bool = typer.Option(True, help="make the new version live"),
    if_none_live: bool = typer.Option(False, "--if-none-live", help="only train the demo model when none is live"),
) -> None:
    """Train scikit-learn, export ONNX, register a version (synthetic data unless --examples)."""
    if from_topic:
        _not_yet("train --from-topic", 5)
    from rtml.serving.registry import ensure_demo_model, train_and_register

    settings = Settings()
    if if_none_live:
        trained = asyncio.run(ensure_demo_model(settings))
        print(f"registered ctr version {trained} (live)" if trained else "a live ctr version exists; nothing to do")
        return
    with err.status(f"training {model}…"):
        version = asyncio.run(train_and_register(settings, model, examples, promote))
    print(f"registered {model} version {version}{' (live)' if promote else ''}")


def backfill(events: Path = typer.Argument(..., help="EVENTS.jsonl"), out: Path | None = None) -> None:  # noqa: B008
    """Replay past events through the feature code, point in time (planned: issue 3)."""
    _not_yet("backfill", 3)


def bench(kind: str = typer.Argument(..., help="predict, ingest or freshness")) -> None:
    """Load benchmarks that print a JSON summary (planned: issue 4)."""
    _not_yet("bench", 4)


def _not_yet(what: str, issue: int) -> None:
    print(f"rtml: '{what}' is not implemented yet (planned in issue {issue})", file=sys.stderr)
    raise typer.Exit(2)
