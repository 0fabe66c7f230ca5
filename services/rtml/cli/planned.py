"""Commands of the contract that later issues implement; they say so clearly and exit 2."""

from __future__ import annotations

import typer

from rtml.cli.common import not_yet


def bench(kind: str = typer.Argument(..., help="predict, ingest or freshness")) -> None:
    """Load benchmarks that print a JSON summary (planned: issue 4)."""
    not_yet("bench", 4)
