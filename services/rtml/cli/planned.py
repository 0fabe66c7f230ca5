"""Commands of the contract that later issues implement; they say so clearly and exit 2."""

from __future__ import annotations

from pathlib import Path

import typer

from rtml.cli.common import not_yet


def backfill(
    events: Path = typer.Argument(..., help="EVENTS.jsonl"),  # noqa: B008
    out: Path | None = typer.Option(None, help="where to write the point-in-time features"),  # noqa: B008
) -> None:
    """Replay past events through the same feature code, point in time (planned: issue 3)."""
    not_yet("backfill", 3)


def bench(kind: str = typer.Argument(..., help="predict, ingest or freshness")) -> None:
    """Load benchmarks that print a JSON summary (planned: issue 4)."""
    not_yet("bench", 4)
