"""``rtml simulate``: the synthetic clickstream; ``rtml simulate-outcomes`` (hidden): the outcome simulator."""

from __future__ import annotations

import asyncio
import logging
import signal
from enum import StrEnum

import httpx
import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from rtml.cli.common import CliError, err, load_client_settings, quiet_logging, run
from rtml.core.errors import RtmlError
from rtml.core.kafka import Producer, create_topics
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms, parse_duration_ms
from rtml.simulate.outcomes import OutcomeRun, run_outcomes
from rtml.simulate.senders import HttpSender, KafkaSender, PurchaseScorer, ScoringSender, Sender, run_clickstream
from rtml.simulate.world import CHARGEBACK_DELAY_MS, Clickstream, World

log = logging.getLogger(__name__)


class Via(StrEnum):
    http = "http"
    kafka = "kafka"


class Drift(StrEnum):
    taste = "taste"
    fraud = "fraud"
    both = "both"


DRIFT_KINDS = {Drift.taste: frozenset({"taste"}), Drift.fraud: frozenset({"fraud"}),
               Drift.both: frozenset({"taste", "fraud"})}  # fmt: skip


def option_duration_ms(option: str, value: str, *, allow_zero: bool = False) -> int:
    """``--chargeback-delay 5s`` -> 5000; a bad value is a one-line usage error naming the option."""
    if allow_zero and value.strip() in ("0", "0s", "0ms"):
        return 0
    try:
        return parse_duration_ms(value)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}", exit_code=2) from None


def drift_plan(drift_at: float | None, drift: Drift | None, start_ms: int) -> tuple[int | None, frozenset[str]]:
    """``(drift_at_ms, kinds)`` for ``World`` from ``--drift-at`` (seconds after start) and ``--drift``."""
    if drift_at is None:
        if drift is not None:
            raise CliError("--drift needs --drift-at SECONDS (when the ground truth changes)", exit_code=2)
        return None, frozenset()
    return start_ms + round(drift_at * 1000), DRIFT_KINDS[drift or Drift.both]


def _stop_on_signals() -> asyncio.Event:
    """SIGINT/SIGTERM end the run after the current batch, so the summary line is still printed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


class Scoring:
    """What ``--score-purchases`` asks for: where serving is, which model, how long after the send."""

    def __init__(self, serving_url: str, model: str, delay_s: float) -> None:
        self.serving_url = serving_url
        self.model = model
        self.delay_s = delay_s
        self.scored = 0
        self.failed = 0


async def _clickstream(
    settings: Settings,
    stream: Clickstream,
    via: Via,
    url: str,
    rate: float,
    duration: float | None,
    keep_going: bool,
    scoring: Scoring | None = None,
) -> int:
    stop = _stop_on_signals()
    total = rate * duration if duration else None
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.completed:.0f} events"), TimeElapsedColumn())  # fmt: skip
    drift_at_ms = stream.world.drift_at_ms
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"{rate:g} events/s via {via.value}", total=total)
        errors = 0

        def on_error(exc: RtmlError) -> None:
            nonlocal errors
            errors += 1
            if errors == 1 or errors % 50 == 0:
                progress.console.print(f"send failed ({errors} so far), batch dropped: {exc.message}")

        def on_score_error(exc: RtmlError) -> None:
            if scorer is not None and (scorer.failed == 1 or scorer.failed % 50 == 0):
                progress.console.print(f"scoring failed ({scorer.failed} so far): {exc.message}")

        def on_sent(n: int) -> None:
            nonlocal drift_at_ms
            progress.advance(task, n)
            if drift_at_ms is not None and now_ms() >= drift_at_ms:
                drift_at_ms = None
                progress.console.print(f"drift: {' and '.join(sorted(stream.world.drift))} changed now")

        scorer: PurchaseScorer | None = None

        async def go(sender: Sender, client: httpx.AsyncClient) -> int:
            nonlocal scorer
            if scoring is not None:
                scorer = PurchaseScorer(client, scoring.serving_url, model=scoring.model, delay_s=scoring.delay_s,
                                        on_error=on_score_error if keep_going else None)  # fmt: skip
                sender = ScoringSender(sender, scorer)
            try:
                sent = await run_clickstream(
                    sender, stream, rate=rate, duration_s=duration, stop=stop,
                    on_sent=on_sent, on_error=on_error if keep_going else None,
                )  # fmt: skip
                if scorer is not None:
                    await scorer.drain()
            finally:
                if scorer is not None and scoring is not None:
                    scorer.cancel()
                    scoring.scored, scoring.failed = scorer.scored, scorer.failed
            return sent

        async with httpx.AsyncClient(timeout=10.0) as client:
            if via is Via.kafka:
                await create_topics(settings)
                async with Producer(settings) as producer:
                    return await go(KafkaSender(producer, settings), client)
            return await go(HttpSender(client, url), client)


def simulate(
    rate: float = typer.Option(100.0, min=0.1, help="events per second"),
    users: int = typer.Option(1000, min=1, help="simulated users u0..uN-1"),
    items: int = typer.Option(200, min=1, help="simulated items t0..tN-1"),
    duration: float = typer.Option(60.0, min=0.0, help="seconds; 0 = until Ctrl-C"),
    via: Via = typer.Option(Via.http, help="POST to ingest, or publish to Kafka in ingest's shape"),  # noqa: B008
    seed: int = typer.Option(0, help="same seed, same users, items and events"),
    ingest_url: str | None = typer.Option(None, help="default http://RTML_HOST:RTML_INGEST_PORT"),
    drift_at: float | None = typer.Option(
        None, "--drift-at", min=0.0, help="seconds after the start when the ground truth drifts"
    ),
    drift: Drift | None = typer.Option(  # noqa: B008
        None, help="what drifts at --drift-at: users' tastes (clicks), a new fraud pattern, or both [default: both]"
    ),
    chargeback_delay: str = typer.Option(
        f"{CHARGEBACK_DELAY_MS // 1000}s", help="how long after a fraudulent purchase its chargeback comes (5s, 2m)"
    ),
    score_purchases: bool = typer.Option(
        False, "--score-purchases", help="have serving score every purchase sent (model --score-model)"
    ),
    score_model: str = typer.Option("fraud", help="the model --score-purchases asks for"),
    score_delay: str = typer.Option("200ms", help="wait after a purchase was sent before scoring it"),
    serving_url: str | None = typer.Option(None, help="default http://RTML_HOST:RTML_SERVING_PORT"),
    keep_going: bool = typer.Option(False, "--keep-going", hidden=True, help="drop failed batches, go on"),
) -> None:
    """Synthetic clickstream (views, clicks, purchases with an amount, chargebacks) at a steady rate.

    With --drift-at the ground truth changes during the run (see rtml.simulate.world); with --score-purchases
    serving scores each purchase (entities user_id and purchase_id = its event_id) so chargebacks label them.
    """
    cb_delay_ms = option_duration_ms("--chargeback-delay", chargeback_delay, allow_zero=True)
    score_delay_s = option_duration_ms("--score-delay", score_delay, allow_zero=True) / 1000
    if drift_at is not None and duration and drift_at >= duration:
        why = f"--drift-at {drift_at:g} is not within --duration {duration:g}: nothing would drift"
        raise CliError(why, exit_code=2)
    drift_at_ms, kinds = drift_plan(drift_at, drift, now_ms())
    settings = load_client_settings()
    quiet_logging()
    world = World(users, items, seed, drift_at_ms=drift_at_ms, drift=kinds)
    stream = Clickstream(world, chargeback_delay_ms=cb_delay_ms)
    url = ingest_url or f"http://{settings.host}:{settings.ingest_port}"
    scoring = None
    if score_purchases:
        scoring = Scoring(serving_url or f"http://{settings.host}:{settings.serving_port}", score_model, score_delay_s)
    sent = run(_clickstream(settings, stream, via, url, rate, duration or None, keep_going, scoring), settings)
    summary = f"sent {sent} events via {via.value}"
    if scoring is not None:
        summary += f"; scored {scoring.scored} purchases" + (f" ({scoring.failed} failed)" if scoring.failed else "")
    err.print(summary)


def simulate_outcomes(
    rate: float = typer.Option(2.0, min=0.1, help="recommendation rounds per second"),
    users: int = typer.Option(1000, min=1),
    items: int = typer.Option(200, min=1),
    duration: float = typer.Option(0.0, min=0.0, help="seconds; 0 = until Ctrl-C"),
    seed: int = typer.Option(0),
    post_outcomes: bool = typer.Option(
        False, "--post-outcomes", help="also POST an explicit outcome per shown item (off: click events only)"
    ),
) -> None:
    """Recommend, click by the simulated ground truth, send the clicks (used by ``rtml up --demo``)."""
    s = load_client_settings()
    base = f"http://{s.host}"

    async def go() -> OutcomeRun:
        return await run_outcomes(
            World(users, items, seed),
            serving_url=f"{base}:{s.serving_port}",
            feedback_url=f"{base}:{s.feedback_port}",
            ingest_url=f"{base}:{s.ingest_port}",
            rate=rate,
            duration_s=duration or None,
            seed=seed,
            post_outcomes=post_outcomes,
            stop=_stop_on_signals(),
        )

    quiet_logging()
    done = run(go(), s)
    summary = f"{done.rounds} recommendation rounds, {done.clicks} clicks sent"
    err.print(summary + (f", {done.outcomes} outcomes posted" if post_outcomes else ""))
