"""``rtml train``: train scikit-learn, export ONNX, register (and promote) a version in the registry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from rtml.cli.common import CliError, err, load_client_settings, quiet_logging, run
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms, parse_duration_ms

if TYPE_CHECKING:
    from rtml.feedback.retrain import ExampleSource


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
    from_topic: bool = typer.Option(
        False,
        "--from-topic",
        help="train on the examples topic (rtml.examples), read from its start until no record came for 3 s "
        "(rtml.feedback.examples.TOPIC_IDLE_S); otherwise as --from-examples",
    ),  # fmt: skip
    from_examples: bool = typer.Option(
        False,
        "--from-examples",
        help="train on the examples store (RTML_EXAMPLES_DIR): the exact features served, with their labels; "
        "time-ordered holdout, compared with the live version",
    ),  # fmt: skip
    since: str | None = typer.Option(
        None,
        help="with --from-examples/--from-topic: only examples predicted in this recent span (e.g. 2h); default: the "
        "model's retrain.train_window, else all",
    ),  # fmt: skip
    then: str = typer.Option(
        "shadow",
        help="with --from-examples/--from-topic: shadow (start the candidate in shadow; online quality decides), "
        "promote (make it live now) or none (only register it)",
    ),  # fmt: skip
    model: str = typer.Option("ctr", help="model name declared in rtml.yaml"),
    promote: bool = typer.Option(True, help="make the new version live"),
    if_none_live: bool = typer.Option(
        False,
        "--if-none-live",
        help="train (synthetic data) and promote every model of the platform config that has no live version; "
        "--model, --examples and --no-promote do not apply",
    ),
) -> None:
    """Train a model on synthetic data, --examples, the examples store or the examples topic, export ONNX and
    register a version."""
    from rtml.serving.registry import train_and_register

    if from_topic and from_examples:
        raise CliError("give either --from-examples or --from-topic, not both")
    if examples is not None and (from_topic or from_examples):
        raise CliError(f"give either --examples PATH or {'--from-topic' if from_topic else '--from-examples'}, "
                       "not both")  # fmt: skip
    settings = load_client_settings()
    quiet_logging()
    if from_examples or from_topic:
        if then not in ("shadow", "promote", "none"):
            raise CliError(f"--then must be shadow, promote or none, not {then!r}")
        since_ms = None
        if since is not None:
            try:
                since_ms = now_ms() - parse_duration_ms(since)
            except ValueError as exc:
                raise CliError(f"--since: {exc}") from None
        if from_topic:
            done = _train_from_topic(settings, model, then, since_ms)
        else:
            with err.status(f"training {model} on the examples store…"):
                done = run(_from_examples(settings, model, then, since_ms), settings)
        m = done.metrics
        compared = (f"; live version {done.compared_with}: auc {_num(m.get('live_auc'))}, "
                    f"log loss {_num(m.get('live_logloss'))}" if done.compared_with else "")  # fmt: skip
        print(f"registered {model} version {done.version} from {m.get('n_train', 0) + m.get('n_holdout', 0)} "
              f"examples; newest {m.get('n_holdout')} held out: auc {_num(m.get('auc'))}, "
              f"log loss {_num(m.get('logloss'))}{compared}")  # fmt: skip
        if done.promoted:
            print(f"version {done.version} is live")
        elif done.rollout is not None:
            print(f"version {done.version} serves in shadow (rollout {done.rollout.id}); the rollout policy "
                  "decides from online quality: rtml models rollout " + model)  # fmt: skip
        return
    if if_none_live:  # what the compose trainer runs on every start: never piles up versions
        with err.status("checking the models…"):
            lines = run(ensure_live_models(settings), settings)
        print("\n".join(lines))
        return
    with err.status(f"training {model}…"):
        version = run(train_and_register(settings, model, examples, promote), settings)
    print(f"registered {model} version {version}{' (live)' if promote else ''}")


def _train_from_topic(settings: Settings, model: str, then: str, since_ms: int | None) -> Any:
    """Read the examples topic with the rows read as progress, train; say what was skipped (stderr)."""
    from rtml.feedback.retrain import TopicSource

    topic = settings.topic("examples")
    with err.status(f"training {model} from {topic}: reading…") as status:

        def progress(records: int) -> None:
            status.update(f"training {model} from {topic}: {records} records read…")

        source = TopicSource(settings, progress=progress)
        done = run(_from_examples(settings, model, then, since_ms, source), settings)
    if source.found is not None and source.found.malformed:
        err.print(f"rtml: warning: {source.found.summary()}; they are not trained on", markup=False)
    return done


async def _from_examples(
    settings: Settings, model: str, then: str, since_ms: int | None, source: ExampleSource | None = None
) -> Any:
    from rtml.core.kafka import Producer
    from rtml.core.redis import connect
    from rtml.feedback.retrain import retrain_from_examples
    from rtml.serving.train import current_user

    redis = connect(settings)
    try:
        async with Producer(settings) as producer:
            return await retrain_from_examples(settings, redis, model, then=then, since_ms=since_ms,  # type: ignore[arg-type]
                                               producer=producer, by=f"rtml train ({current_user()})",
                                               source=source)  # fmt: skip
    finally:
        await redis.aclose()


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"
