"""``rtml backfill``: point-in-time features for history, through the same engine that serves them."""

from __future__ import annotations

from pathlib import Path

import typer

from rtml.cli.common import err, load_client_settings, quiet_logging, run
from rtml.core.config import load_config


def backfill(
    events: Path = typer.Argument(..., exists=True, dir_okay=False, help="EVENTS.jsonl: one event per line"),  # noqa: B008
    out: Path | None = typer.Option(None, help="output JSONL (default: EVENTS.features.jsonl)"),  # noqa: B008
    rows: Path | None = typer.Option(  # noqa: B008
        None, exists=True, dir_okay=False, help='JSONL of {"entity", "id", "ts"}: features at those points instead'
    ),
    redis_url: str | None = typer.Option(
        None, help="replay in this Redis (under a random key prefix) instead of a scratch redis-server"
    ),
) -> None:
    """Replay past events through the feature engine and write the features as of each event (or row)."""
    from rtml.features.backfill import run_backfill

    settings = load_client_settings()
    quiet_logging()
    config = load_config(settings.platform_config_path())
    target = out or events.with_name(events.stem + ".features.jsonl")
    with err.status("replaying…") as status:
        n = run(
            run_backfill(
                config, events, target, rows, redis_url=redis_url,
                on_progress=lambda k: status.update(f"replaying… {k} records written"),
            ),
            settings,
        )  # fmt: skip
    print(f"wrote {n} records to {target}")
