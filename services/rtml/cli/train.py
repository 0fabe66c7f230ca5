"""``rtml train``: train scikit-learn, export ONNX, register (and promote) a version in the registry."""

from __future__ import annotations

from pathlib import Path

import typer

from rtml.cli.common import err, load_client_settings, not_yet, quiet_logging, run


def train(
    examples: Path | None = typer.Option(  # noqa: B008
        None, exists=True, dir_okay=False, help="JSONL of labelled examples (default: synthetic data)"
    ),
    from_topic: bool = typer.Option(False, "--from-topic", help="train on rtml.examples (planned: issue 5)"),
    model: str = typer.Option("ctr", help="model name declared in rtml.yaml"),
    promote: bool = typer.Option(True, help="make the new version live"),
    if_none_live: bool = typer.Option(
        False, "--if-none-live", help="only train the demo model ctr, and only when it has no live version"
    ),
) -> None:
    """Train a model on synthetic data or --examples, export ONNX and register a version."""
    if from_topic:
        not_yet("train --from-topic", 5)
    from rtml.serving.registry import ensure_demo_model, train_and_register

    settings = load_client_settings()
    quiet_logging()
    if if_none_live:  # what the compose trainer runs on every start: never piles up versions
        with err.status("checking the demo model…"):
            trained = run(ensure_demo_model(settings), settings)
        print(f"registered ctr version {trained} (live)" if trained else "a live ctr version exists; nothing to do")
        return
    with err.status(f"training {model}…"):
        version = run(train_and_register(settings, model, examples, promote), settings)
    print(f"registered {model} version {version}{' (live)' if promote else ''}")
