"""``rtml train``: train scikit-learn, export ONNX, register (and promote) a version in the registry."""

from __future__ import annotations

from pathlib import Path

import typer

from rtml.cli.common import err, load_settings, not_yet, quiet_logging, run


def train(
    examples: Path | None = typer.Option(  # noqa: B008
        None, exists=True, dir_okay=False, help="JSONL of labelled examples (default: synthetic data)"
    ),
    from_topic: bool = typer.Option(False, "--from-topic", help="train on rtml.examples (planned: issue 5)"),
    model: str = typer.Option("ctr", help="model name declared in rtml.yaml"),
    promote: bool = typer.Option(True, help="make the new version live"),
) -> None:
    """Train a model on synthetic data or --examples, export ONNX and register a version."""
    if from_topic:
        not_yet("train --from-topic", 5)
    from rtml.serving.registry import train_and_register

    settings = load_settings()
    quiet_logging()
    with err.status(f"training {model}…"):
        version = run(train_and_register(settings, model, examples, promote), settings)
    print(f"registered {model} version {version}{' (live)' if promote else ''}")
