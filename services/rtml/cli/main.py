"""The ``rtml`` command. Every failure is one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import logging
import sys

import typer

from rtml.cli import serve, tools
from rtml.cli import up as up_cmd
from rtml.core.errors import RtmlError

app = typer.Typer(
    name="rtml",
    help="rtml: real-time machine learning — streaming features, millisecond ONNX serving, online feedback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("up")(up_cmd.up)
app.command("serve")(serve.serve)
app.command("simulate")(tools.simulate)
app.command("simulate-outcomes", hidden=True)(tools.simulate_outcomes)
app.command("train")(tools.train)
app.command("backfill")(tools.backfill)
app.command("bench")(tools.bench)


def main() -> None:
    try:
        app()
    except RtmlError as exc:
        print(f"rtml: {exc.message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


if __name__ == "__main__":
    main()
