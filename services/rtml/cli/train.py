"""``rtml train``: train scikit-learn, export ONNX, register (and promote) a version in the registry."""

from __future__ import annotations

from pathlib import Path

import typer

from rtml.cli.common import err, load_client_settings, not_yet, quiet_logging, run
from rtml.core.settings import Settings


async def ensure_live_models(settings: Settings) -> list[str]:
    """Train, register and promote every model of the platform config that has no live version (what
    ``rtml up`` and ``rtml train --if-none-live`` do); one line per configured model saying where it stands."""
    from rtml.serving.registry import configured_live_versions, ensure_models

    trained = await ensure_models(settings)
    live = await configured_live_versions(settings)
    return [model_status(name, trained.get(name), version) for name, version in live.items()]


def model_status(name: str, trained: str | None, live: str | None) -> str:
    if trained is not None:
        return f"trained and registered model {name}, version {trained} (live)"
    if live is not None:
        return f"model {name}: version {live} is live"
    return f"model {name}: no live version yet (another process is training it)"


def train(
    examples: Path | None = typer.Option(  # noqa: B008
        None, exists=True, dir_okay=False, help="JSONL of labelled examples (default: synthetic data)"
    ),
    from_topic: bool = typer.Option(False, "--from-topic", help="train on rtml.examples (planned: issue 5)"),
    model: str = typer.Option("ctr", help="model name declared in rtml.yaml"),
    promote: bool = typer.Option(True, help="make the new version live"),
    if_none_live: bool = typer.Option(
        False,
        "--if-none-live",
        help="train (synthetic data) and promote every model of the platform config that has no live version; "
        "--model, --examples and --no-promote do not apply",
    ),
) -> None:
    """Train a model on synthetic data or --examples, export ONNX and register a version."""
    if from_topic:
        not_yet("train --from-topic", 5)
    from rtml.serving.registry import train_and_register

    settings = load_client_settings()
    quiet_logging()
    if if_none_live:  # what the compose trainer runs on every start: never piles up versions
        with err.status("checking the models…"):
            lines = run(ensure_live_models(settings), settings)
        print("\n".join(lines))
        return
    with err.status(f"training {model}…"):
        version = run(train_and_register(settings, model, examples, promote), settings)
    print(f"registered {model} version {version}{' (live)' if promote else ''}")
