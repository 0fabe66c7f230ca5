from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from rtml.cli.main import app

runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "rtml.cli.main", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_help_lists_the_contract_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("up", "serve", "simulate", "train", "backfill", "bench"):
        assert cmd in result.output


def test_unknown_service_is_a_clear_usage_error() -> None:
    result = runner.invoke(app, ["serve", "bogus"])
    assert result.exit_code == 2
    assert "bogus" in result.output


def test_user_errors_are_one_line_on_stderr_without_traceback() -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("RTML_")}
    env["RTML_CONFIG"] = "/nonexistent/rtml.yaml"
    env["RTML_REDIS_URL"] = "redis://127.0.0.1:1/0"
    env["RTML_KAFKA_BOOTSTRAP"] = "127.0.0.1:1"
    result = run("up", "--no-embedded", env={**env, "RTML_REDIS_URL": ""})
    assert result.returncode == 1
    assert result.stderr.strip() == "rtml: --no-embedded needs RTML_KAFKA_BOOTSTRAP and RTML_REDIS_URL"
    result = run("train", env=env)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("rtml: ") and "Traceback" not in result.stderr, result.stderr


def test_planned_commands_say_so_and_fail() -> None:
    result = run("bench", "predict")
    assert result.returncode == 2
    assert "not implemented yet" in result.stderr
