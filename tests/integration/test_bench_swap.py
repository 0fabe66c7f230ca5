"""``rtml bench predict --swap`` against a real serving app (uvicorn in-process, the session broker and Redis).

Only the report's structure and that the swap was seen (every connection ends on the new version, nothing
failed) are asserted; latency figures never are (project rule).
"""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from rtml.bench import arun_bench
from rtml.cli.bench import bench as bench_cmd
from rtml.core.redis import Keys, connect
from rtml.core.settings import Settings
from rtml.serving.registry import ModelRegistry

pytestmark = pytest.mark.integration

WINDOW = {"n", "p50_ms", "p90_ms", "p99_ms", "max_ms", "window_s"}


async def _registry_state(settings: Settings) -> tuple[str | None, list[dict[str, Any]]]:
    redis = connect(settings)
    try:
        registry = ModelRegistry(redis, Keys(settings.redis.key_prefix))
        return await registry.live_version("ctr"), (await registry.describe())[0]["versions"]
    finally:
        await redis.aclose()


async def test_bench_predict_swap_observes_the_promotion(serving: Settings) -> None:
    live_before, _ = await _registry_state(serving)
    out = await arun_bench(
        "predict", serving, swap=True, duration_s=3.0, rounds=2, concurrency=4, users=10, items=10, client="auto"
    )
    assert out["bench"] == "predict-swap" and out["client"] == "asyncio-raw"
    assert out["params"]["model"] == "ctr" and out["params"]["concurrency"] == 4 and out["params"]["rounds"] == 2
    assert out["machine"]["loop"] in ("asyncio", "uvloop")

    rounds = out["rounds"]
    assert [r["from_version"] for r in rounds] == [live_before, rounds[0]["to_version"]]
    assert len({live_before, *(r["to_version"] for r in rounds)}) == 3  # two new versions
    for r in rounds:
        assert r["failed"] == 0 and r["failed_during_swap"] == 0 and r["error_kinds"] == {}, r
        assert r["swap_observed"] is True and r["swap_s"] is not None and r["swap_s"] >= 0, r
        assert len(r["swap_s_per_connection"]) == 4 and None not in r["swap_s_per_connection"]
        assert r["versions_after_promote"].get(r["to_version"], 0) > 0
        assert r["requests"] > 0 and r["promote_call_ms"] > 0 and r["client_cpu_us_per_req"] > 0
        for window in ("before", "during", "after"):
            assert set(r[window]) == WINDOW, r[window]
        assert r["before"]["n"] > 0 and r["during"]["n"] > 0
        assert r["p99_during_to_before"] is not None

    summary = out["summary"]
    assert summary["rounds"] == 2 and summary["swap_observed"] is True
    assert summary["failed"] == 0 and summary["failed_during_swap"] == 0
    assert summary["swap_s_max"] == max(r["swap_s"] for r in rounds)
    targets = out["targets"]
    assert set(targets) == {"swap_s", "failed", "p99_during_vs_before"}
    assert targets["failed"]["meets"] is True
    assert all(isinstance(t["meets"], bool) for t in targets.values())
    assert out["pass"] is all(t["meets"] for t in targets.values())

    live_after, versions = await _registry_state(serving)
    assert live_after == rounds[-1]["to_version"]
    copies = [v for v in versions if v["version"] in {r["to_version"] for r in rounds}]
    assert [v["created_by"] for v in copies] == ["rtml bench predict --swap"] * 2
    original = next(v for v in versions if v["version"] == live_before)
    assert {v["sha256"] for v in copies} == {original["sha256"]}  # the same model bytes, re-registered


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recommend", "--swap"], "--swap applies to predict, not recommend"),
        (["predict", "--swap", "--client", "wrk"], "wrk cannot give"),
        (["predict", "--swap", "--concurrency", "1", "--concurrency", "4"], "one concurrency"),
    ],
)
def test_cli_rejects_swap_options_that_do_not_fit(args: list[str], message: str) -> None:
    cli = typer.Typer()
    cli.command()(bench_cmd)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert message in f"{result.exception} {result.output}"
