"""``rtml bench KIND``: load benchmarks against the running stack; one JSON summary on stdout."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
import typer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from rtml.cli.common import CliError, err, load_client_settings, quiet_logging


class LoadClient(StrEnum):
    auto = "auto"
    wrk = "wrk"
    raw = "raw"


class Kind(StrEnum):
    ingest = "ingest"
    freshness = "freshness"
    predict = "predict"
    recommend = "recommend"
    read = "read"
    memory = "memory"
    overload = "overload"


class OverloadOf(StrEnum):
    predict = "predict"
    ingest = "ingest"


SERVING = (Kind.predict, Kind.recommend)


def bench(
    kind: Kind = typer.Argument(  # noqa: B008
        ...,
        help="ingest, freshness, predict, recommend (drive the running stack), read, memory (Redis), "
        "overload (refusals and admitted latency at 2x capacity)",
    ),
    duration: float | None = typer.Option(
        None, min=0.5, help="total seconds, split over runs (ingest, freshness, predict, recommend)"
    ),
    rate: int | None = typer.Option(None, min=1, help="events/s: paced sending (ingest), background load (freshness)"),
    concurrency: list[int] | None = typer.Option(  # noqa: B008
        None, min=1, help="requests in flight (ingest: one value; predict, recommend: repeat the option for several)"
    ),
    repeats: int | None = typer.Option(
        None, min=1, help="runs whose median is reported (ingest, read; predict, recommend: interleaved rounds)"
    ),
    client: LoadClient = typer.Option(  # noqa: B008
        LoadClient.auto, help="predict, recommend: wrk if on PATH (auto), or the built-in asyncio client (raw)"
    ),
    swap: bool = typer.Option(
        False, "--swap", help="predict: promote a copy of the live model under load and report the hot swap"
    ),
    of: OverloadOf = typer.Option(  # noqa: B008
        OverloadOf.predict, "--of", help="overload: the route driven past its capacity (predict or ingest)"
    ),
    factor: float = typer.Option(2.0, min=1.0, help="overload: offered rate as a multiple of measured capacity"),
    out: Path | None = typer.Option(None, help="also write the JSON summary here"),  # noqa: B008
    plot: Path | None = typer.Option(  # noqa: B008
        None,
        help="predict, recommend, ingest, freshness: also draw latency percentiles and throughput, rtml vs "
        "the same-run baseline, into this PNG (needs the optional extra: pip install 'rtml[plot]')",
    ),
) -> None:
    """Measure against a running platform (rtml up) and print a JSON summary: medians and same-run baselines."""
    from rtml.bench.runner import run_bench

    settings = load_client_settings()
    quiet_logging()
    opts: dict[str, Any] = {}
    if duration is not None:
        _only(kind, "--duration", Kind.ingest, Kind.freshness, Kind.overload, *SERVING)
        opts["duration_s"] = duration
    if rate is not None:
        _only(kind, "--rate", Kind.ingest, Kind.freshness)
        opts["rate"] = rate
    if concurrency:
        _only(kind, "--concurrency", Kind.ingest, Kind.overload, *SERVING)
        opts["concurrency"] = concurrency[0] if kind in (Kind.ingest, Kind.overload) else tuple(concurrency)
    if repeats is not None:
        _only(kind, "--repeats", Kind.ingest, Kind.read, *SERVING)
        opts["rounds" if kind in SERVING else "repeats"] = repeats
    if client is not LoadClient.auto:
        _only(kind, "--client", *SERVING)
    if kind in SERVING:
        opts["client"] = client.value
    if swap:
        _only(kind, "--swap", Kind.predict)
        if client is LoadClient.wrk:
            raise CliError("--swap needs each answer's version and timing, which wrk cannot give: use --client raw",
                           exit_code=2)  # fmt: skip
        if concurrency and len(concurrency) > 1:
            raise CliError("--swap runs at one concurrency: give --concurrency once", exit_code=2)
        opts["swap"] = True
    if of is not OverloadOf.predict:
        _only(kind, "--of", Kind.overload)
    if factor != 2.0:
        _only(kind, "--factor", Kind.overload)
    if kind is Kind.overload:
        opts["of"] = of.value
        opts["factor"] = factor
    if plot is not None:
        _check_plot(kind, plot, swap)
    try:
        with err.status(f"benchmarking {kind.value}…"):
            result = run_bench(kind.value, settings, **opts)
    except KafkaError as exc:
        raise CliError(f"Kafka at {settings.kafka.bootstrap} does not answer: {exc}") from None
    except RedisError as exc:
        raise CliError(f"Redis at {settings.redis.url} does not answer: {exc}") from None
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if out is not None:
        out.write_text(text + "\n")
    print(text)
    if plot is not None:
        from rtml.report.bench_plot import plot_bench

        plot_bench(result, plot)
        err.print(f"plot written to {plot}")


def _check_plot(kind: Kind, plot: Path, swap: bool) -> None:
    """Every reason ``--plot`` could not work, before minutes of benchmarking rather than after."""
    from rtml.report.mpl import PlotUnavailable, require_matplotlib

    _only(kind, "--plot", *SERVING, Kind.ingest, Kind.freshness)
    if swap:
        raise CliError("--plot does not draw --swap runs (their figures are per round, in the JSON)", exit_code=2)
    if plot.suffix.lower() != ".png":
        raise CliError(f"--plot writes a PNG: give a file name ending in .png, not {plot.name}", exit_code=2)
    if not plot.parent.is_dir():
        raise CliError(f"--plot: the directory {plot.parent} does not exist")
    try:
        require_matplotlib("--plot")
    except PlotUnavailable as exc:
        raise CliError(exc.message) from None


def _only(kind: Kind, option: str, *kinds: Kind) -> None:
    if kind not in kinds:
        raise CliError(f"{option} applies to {', '.join(k.value for k in kinds)}, not {kind.value}", exit_code=2)
