"""``rtml models list|show|promote|rollback`` on a real broker and redis-server, through the real CLI app."""

from __future__ import annotations

import asyncio
import functools

import orjson
import pytest
from typer.testing import CliRunner, Result

from rtml.cli.main import app
from rtml.core.config import load_config
from rtml.core.redis import Keys, connect
from rtml.core.settings import Settings
from rtml.serving.registry import ModelRegistry
from rtml.serving.train import DEMO_CONFIG, TrainedModel, train_model
from tests.integration.test_serving_registry import consume

pytestmark = pytest.mark.integration

runner = CliRunner()


@functools.cache
def trained() -> TrainedModel:
    return train_model(load_config(DEMO_CONFIG), "ctr", n_synthetic=2_000)


def env_of(s: Settings) -> dict[str, str]:
    return {
        "RTML_KAFKA_BOOTSTRAP": s.kafka.bootstrap,
        "RTML_REDIS_URL": s.redis.url,
        "RTML_REDIS_KEY_PREFIX": s.redis.key_prefix,
        "RTML_TOPIC_PREFIX": s.topic_prefix,
        "RTML_CONFIG": str(s.platform_config_path()),
    }


def cli(s: Settings, *args: str) -> Result:
    return runner.invoke(app, ["models", *args], env=env_of(s))


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rtml: ") and "Traceback" not in stderr, stderr
    return lines[0]


def register(s: Settings, n: int, promote: str | None = None) -> None:
    async def go() -> None:
        redis = connect(s)
        try:
            registry = ModelRegistry(redis, Keys(s.redis.key_prefix))
            for _ in range(n):
                await registry.register("ctr", trained().onnx_bytes, trained().metadata)
            if promote:
                await registry.promote("ctr", promote)
        finally:
            await redis.aclose()

    asyncio.run(go())


def test_list_and_show(settings: Settings) -> None:
    register(settings, 2, promote="1")
    result = cli(settings, "list", "--json")
    assert result.exit_code == 0, result.stderr
    models = {m["name"]: m for m in orjson.loads(result.stdout)["models"]}
    assert set(models) >= set(load_config(DEMO_CONFIG).models)  # the config's models, even without versions
    assert models["ctr"]["live_version"] == "1" and len(models["ctr"]["versions"]) == 2
    table = cli(settings, "list")
    assert table.exit_code == 0 and "ctr" in table.stdout
    [row] = [ln for ln in table.stdout.splitlines() if " ctr " in ln]
    assert row.split("│")[2].strip() == "1" and row.split("│")[3].strip() == "2"  # live 1, 2 versions

    shown = cli(settings, "show", "ctr")
    assert shown.exit_code == 0, shown.stderr
    sha = orjson.loads(cli(settings, "show", "ctr", "--json").stdout)["versions"][0]["sha256"]
    rows = [ln for ln in shown.stdout.splitlines() if sha[:16] in ln]
    assert len(rows) == 2 and "*" in rows[0] and "*" not in rows[1]  # which one is live
    assert str(len(trained().onnx_bytes)) in rows[0] and f"{trained().metadata['metrics']['auc']:.4f}" in rows[0]
    missing = cli(settings, "show", "nope")
    assert missing.exit_code == 1 and "no model 'nope'" in one_line(missing.stderr)


def test_promote_and_rollback_are_announced(settings: Settings) -> None:
    register(settings, 3)
    for version in ("1", "3"):
        result = cli(settings, "promote", "ctr", version)
        assert result.exit_code == 0, result.stderr
        assert result.stdout.strip() == f"promoted ctr version {version} (live)"
    result = cli(settings, "promote", "ctr", "9")
    assert result.exit_code == 1 and one_line(result.stderr) == "rtml: model 'ctr' has no version '9'"
    result = cli(settings, "rollback", "ctr")
    assert result.exit_code == 0 and result.stdout.strip() == "rolled ctr back to version 1 (live)"
    shown = orjson.loads(cli(settings, "show", "ctr", "--json").stdout)
    assert shown["live_version"] == "1" and [v["live"] for v in shown["versions"]] == [True, False, False]
    result = cli(settings, "rollback", "ctr")
    assert result.exit_code == 1
    assert one_line(result.stderr) == "rtml: model 'ctr' has no earlier live version to roll back to"
    got = asyncio.run(consume(settings, "models", count=3))
    assert [(r["event"], r["version"]) for r in got] == [("promoted", "1"), ("promoted", "3"), ("rolled_back", "1")]
    assert all(r["by"] for r in got)


def test_promote_without_a_broker_still_moves_the_pointer(settings: Settings) -> None:
    register(settings, 2, promote="1")
    env = {**env_of(settings), "RTML_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    result = runner.invoke(app, ["models", "promote", "ctr", "2"], env=env)
    assert result.exit_code == 0, result.stderr
    assert "rtml: warning: not announced on" in result.stderr and "polling" in result.stderr
    assert orjson.loads(cli(settings, "show", "ctr", "--json").stdout)["live_version"] == "2"


def test_invalid_model_name_is_one_line(settings: Settings) -> None:
    result = cli(settings, "rollback", "bad name!")
    assert result.exit_code == 1 and "invalid model name" in one_line(result.stderr)


def test_train_if_none_live_covers_every_configured_model(settings: Settings) -> None:
    register(settings, 1, promote="1")  # ctr is live already; fraud has no version
    result = runner.invoke(app, ["train", "--if-none-live"], env=env_of(settings))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["model ctr: version 1 is live",
                                          "trained and registered model fraud, version 1 (live)"]  # fmt: skip
    again = runner.invoke(app, ["train", "--if-none-live"], env=env_of(settings))
    assert again.exit_code == 0, again.stderr
    assert again.stdout.splitlines() == ["model ctr: version 1 is live", "model fraud: version 1 is live"]


def test_shadow_canary_rollout_and_end_rollout(settings: Settings) -> None:
    register(settings, 3, promote="1")
    none = cli(settings, "rollout", "ctr")
    assert none.exit_code == 0 and none.stdout.strip() == "ctr: no rollout running"
    started = cli(settings, "shadow", "ctr", "2")
    assert started.exit_code == 0, started.stderr
    assert started.stdout.startswith("ctr version 2 in shadow (rollout ") and started.stdout.strip().endswith("live 1)")
    record = orjson.loads(cli(settings, "rollout", "ctr", "--json").stdout)["rollout"]
    assert (record["version"], record["stage"], record["share"], record["live"]) == ("2", "shadow", 0.0, "1")
    assert record["by"]
    canary = cli(settings, "shadow", "ctr", "2", "--canary", "0.1")  # the same candidate: a stage change
    assert canary.exit_code == 0 and "canary for 10.0% of users" in canary.stdout
    again = orjson.loads(cli(settings, "rollout", "ctr", "--json").stdout)["rollout"]
    assert again["id"] == record["id"] and again["stage"] == "canary" and again["share"] == 0.1
    shown = cli(settings, "rollout", "ctr")
    assert "version 2 (candidate) in canary for 10.0% of users against live 1" in shown.stdout
    listed = cli(settings, "list")
    [row] = [ln for ln in listed.stdout.splitlines() if " ctr " in ln]
    assert row.split("│")[8].strip() == "2 canary 10%"

    busy = cli(settings, "shadow", "ctr", "3")
    assert busy.exit_code == 1 and "already has a rollout: version 2 in canary" in one_line(busy.stderr)
    live = cli(settings, "shadow", "ctr", "1")
    assert live.exit_code == 1 and "is the live one" in one_line(live.stderr)
    bad = cli(settings, "shadow", "ctr", "3", "--canary", "1.5")
    assert bad.exit_code == 2  # typer's range check
    replaced = cli(settings, "shadow", "ctr", "3", "--replace")
    assert replaced.exit_code == 0 and replaced.stdout.startswith("ctr version 3 in shadow")

    ended = cli(settings, "end-rollout", "ctr")
    assert ended.exit_code == 0, ended.stderr
    assert ended.stdout.strip() == "ended the rollout of ctr version 3 (shadow); live is still 1"
    twice = cli(settings, "end-rollout", "ctr")
    assert twice.exit_code == 1 and one_line(twice.stderr) == "rtml: model 'ctr' has no rollout running"
    got = asyncio.run(consume(settings, "models", count=4))
    assert [r["event"] for r in got] == ["rollout_started", "rollout_stage", "rollout_started", "rollout_ended"]
    assert got[2]["replaced"] == record["id"] and all(r["by"] for r in got)
