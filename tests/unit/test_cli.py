"""CLI error handling: every failure is one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from rtml.cli.main import app

runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "rtml.cli.main", *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTML_")}
    env.update(extra)
    return env


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rtml: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_help_lists_the_contract_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("up", "serve", "simulate", "train", "backfill", "bench"):
        assert cmd in result.output


def test_unknown_service_is_one_clear_line() -> None:
    result = runner.invoke(app, ["serve", "bogus"])
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert "'bogus' is not one of" in line and "ingest" in line


def test_unknown_option_is_one_clear_line() -> None:
    result = runner.invoke(app, ["simulate", "--no-such-option"])
    assert result.exit_code == 2
    assert "--no-such-option" in one_line(result.stderr)


def test_no_embedded_names_the_missing_variable(tmp_path: Path) -> None:
    env = clean_env(RTML_KAFKA_BOOTSTRAP="127.0.0.1:1")
    result = run("up", "--no-embedded", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert one_line(result.stderr) == "rtml: --no-embedded needs RTML_REDIS_URL to be set"
    result = run("up", "--no-embedded", env=clean_env(), cwd=tmp_path)
    assert one_line(result.stderr) == "rtml: --no-embedded needs RTML_KAFKA_BOOTSTRAP and RTML_REDIS_URL to be set"


def test_invalid_setting_names_the_variable(tmp_path: Path) -> None:
    result = run("serve", "ingest", env=clean_env(RTML_INGEST_PORT="abc"), cwd=tmp_path)
    assert result.returncode == 1
    assert one_line(result.stderr).startswith("rtml: invalid setting RTML_INGEST_PORT:")


def test_unreachable_dependencies_are_one_line(tmp_path: Path) -> None:
    env = clean_env(RTML_KAFKA_BOOTSTRAP="127.0.0.1:1", RTML_REDIS_URL="redis://127.0.0.1:1/0")
    result = run("simulate", "--via", "kafka", "--duration", "1", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "Kafka at 127.0.0.1:1 does not answer" in one_line(result.stderr)
    result = run("train", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "127.0.0.1:1" in one_line(result.stderr)
    result = run("simulate", "--duration", "1", "--ingest-url", "http://127.0.0.1:1", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot reach ingest" in one_line(result.stderr)


def test_bench_options_that_do_not_apply_are_usage_errors() -> None:
    result = runner.invoke(app, ["bench", "read", "--rate", "100"])
    assert result.exit_code == 2
    assert one_line(result.stderr) == "rtml: --rate applies to ingest, freshness, not read"
    result = runner.invoke(app, ["bench", "nope"])
    assert result.exit_code == 2


def test_models_group_lists_its_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert "models" in result.output
    result = runner.invoke(app, ["models"])  # no subcommand: its help, exit 0
    assert result.exit_code == 0
    for cmd in ("list", "show", "promote", "rollback"):
        assert cmd in result.output


def test_models_usage_errors_are_one_line() -> None:
    result = runner.invoke(app, ["models", "promote", "ctr"])
    assert result.exit_code == 2
    assert "Missing argument 'version'" in one_line(result.stderr)
    result = runner.invoke(app, ["models", "nope"])
    assert result.exit_code == 2
    assert "nope" in one_line(result.stderr)


def test_models_with_redis_unreachable_is_one_line(tmp_path: Path) -> None:
    env = clean_env(RTML_KAFKA_BOOTSTRAP="127.0.0.1:1", RTML_REDIS_URL="redis://127.0.0.1:1/0")
    for args in (["list"], ["show", "ctr"], ["rollback", "ctr"]):
        result = run("models", *args, env=env, cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert "127.0.0.1:1" in one_line(result.stderr)  # Redis is checked before the broker: no warning first


def test_model_status_lines() -> None:
    from rtml.cli.train import model_status

    assert model_status("fraud", "1", "1") == "trained and registered model fraud, version 1 (live)"
    assert model_status("ctr", None, "3") == "model ctr: version 3 is live"
    assert model_status("ctr", None, None) == "model ctr: no live version yet (another process is training it)"


def test_models_commands_find_rtml_up_through_its_endpoints_file(tmp_path: Path) -> None:
    (tmp_path / ".rtml").mkdir()
    (tmp_path / ".rtml" / "endpoints.env").write_text(
        "RTML_KAFKA_BOOTSTRAP=127.0.0.1:2\nRTML_REDIS_URL=redis://127.0.0.1:2/0\n"
    )
    for args in (["list"], ["show", "ctr"], ["promote", "ctr", "1"], ["rollback", "ctr"]):
        result = run("models", *args, env=clean_env(), cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert "redis://127.0.0.1:2/0" in one_line(result.stderr)  # the address rtml up wrote
