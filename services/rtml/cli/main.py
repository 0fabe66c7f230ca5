"""The ``rtml`` command: wires one module per command group.

Every failure is one line on stderr and a non-zero exit: usage errors (exit 2), ``RtmlError`` and invalid
settings (exit 1, or the error's own code). Bugs still show a traceback — they are ours to fix.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from rtml.cli import backfill, bench, models, report, serve, simulate, train
from rtml.cli import up as up_cmd  # the bare name `up` is ambiguous to mypy (module vs function)
from rtml.cli.common import CliError, validation_message
from rtml.core.errors import RtmlError


def _fail(message: str, code: int) -> int:
    print(f"rtml: {message}", file=sys.stderr)
    return code


class OneLineErrors(TyperGroup):
    """Runs the command non-standalone and prints every expected failure as one line (also under CliRunner)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
            code = rv if isinstance(rv, int) else 0
        except typer.TyperException as exc:  # usage errors: bad argument, unknown option, missing command
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError":
                print(exc.format_message())
                code = 0
            else:
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                code = _fail(exc.format_message().replace("\n", " ") + hint, exc.exit_code)
        except typer.Abort:
            code = _fail("aborted", 1)
        except CliError as exc:
            code = _fail(exc.message, exc.exit_code)
        except RtmlError as exc:
            code = _fail(exc.message, 1)
        except ValidationError as exc:
            code = _fail(validation_message(exc), 1)
        if not standalone_mode:
            return code
        sys.exit(code)


app = typer.Typer(
    name="rtml",
    cls=OneLineErrors,
    help="rtml: real-time machine learning — streaming features, millisecond ONNX serving, online feedback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command("up")(up_cmd.up)
app.command("serve")(serve.serve)
app.command("simulate")(simulate.simulate)
app.command("simulate-outcomes", hidden=True)(simulate.simulate_outcomes)
app.command("train")(train.train)
app.command("backfill")(backfill.backfill)
app.command("bench")(bench.bench)
app.command("report")(report.report)
app.add_typer(models.app, name="models")


def main() -> None:
    app(prog_name="rtml")


if __name__ == "__main__":
    main()
