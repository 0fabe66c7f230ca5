"""``rtml models list|show|promote|rollback|shadow|rollout|end-rollout``: the model registry, from Redis.

Like ``rtml train``, these talk to Redis through ``ModelRegistry`` (no serving process needed) and announce
promotions, rollbacks and rollout changes on ``rtml.models``; serving replicas also poll the live pointer
and the rollout, so a change still takes effect when the broker cannot be reached (a warning says it was not
announced).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Table

from rtml.cli.common import CliError, load_client_settings, quiet_logging, run
from rtml.core.config import load_config
from rtml.core.errors import DependencyUnavailable, NotFound
from rtml.core.kafka import Producer
from rtml.core.redis import Keys, connect, ping
from rtml.core.settings import Settings

T = TypeVar("T")

app = typer.Typer(
    help="The model registry: list models, show versions, promote a version, roll back, roll out a candidate.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

JSON_OPTION = typer.Option(False, "--json", help="print JSON instead of a table")


def _user() -> str:
    from rtml.serving.train import current_user

    return current_user()


def _when(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _metric(metrics: dict[str, Any], name: str) -> str:
    v = metrics.get(name)
    return f"{v:.4f}" if isinstance(v, int | float) and not isinstance(v, bool) else "-"


def _out() -> Console:
    return Console(highlight=False, soft_wrap=False, width=160)


async def _with_registry(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    from rtml.serving.registry import ModelRegistry

    redis = connect(settings)
    try:
        try:  # one line naming the address rtml up (or the environment) gave, before any registry call
            await ping(redis, timeout_s=settings.redis.socket_timeout_s)
        except DependencyUnavailable as exc:
            raise CliError(f"Redis at {settings.redis.url} does not answer: {exc.message}") from None
        return await work(ModelRegistry(redis, Keys(settings.redis.key_prefix)))
    finally:
        await redis.aclose()


async def _describe(settings: Settings) -> list[dict[str, Any]]:
    config = load_config(settings.platform_config_path())

    async def work(registry: Any) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = await registry.describe(config.models)
        return models

    return await _with_registry(settings, work)


async def _announcing(settings: Settings, work: Callable[[Any, Producer | None], Awaitable[T]]) -> T:
    """Run ``work(registry, producer)`` once Redis answers; without a reachable broker, with no producer and
    a warning (the pointer in Redis is what replicas follow; the topic only makes them react at once)."""

    async def with_producer(registry: Any) -> T:
        producer: Producer | None = None
        started = Producer(settings)
        try:
            await started.start()
            producer = started
        except DependencyUnavailable as exc:  # Producer.start closed its client already
            reason = exc.message.splitlines()[0] if exc.message else "no answer"
            print(f"rtml: warning: not announced on {settings.topic_prefix}models ({reason}); "
                  "serving replicas still pick it up by polling", file=sys.stderr)  # fmt: skip
        try:
            return await work(registry, producer)
        finally:
            if producer is not None:
                await producer.stop()

    return await _with_registry(settings, with_producer)


@app.command("list")
def list_models(as_json: bool = JSON_OPTION) -> None:
    """Every model (the config's and the registry's), its live version and how many versions it has."""
    settings = load_client_settings()
    quiet_logging()
    models = run(_describe(settings), settings)
    if as_json:
        print(orjson.dumps({"models": models}, option=orjson.OPT_INDENT_2).decode())
        return
    table = Table("model", "live", "versions", "latest", "live created", "live by", "auc", "rollout")
    for m in models:
        versions = m["versions"]
        live = next((v for v in versions if v["live"]), None)
        table.add_row(
            m["name"],
            m["live_version"] or "-",
            str(len(versions)),
            versions[-1]["version"] if versions else "-",
            _when(live["created_at"]) if live else "-",
            (live["created_by"] or "unknown") if live else "-",
            _metric(live["metrics"], "auc") if live else "-",
            _rollout_cell(m.get("rollout")),
        )
    _out().print(table)


def _rollout_cell(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    share = f" {r['share']:.0%}" if r["stage"] == "canary" else ""
    return f"{r['version']} {r['stage']}{share}"


@app.command("show")
def show(name: str = typer.Argument(..., help="model name"), as_json: bool = JSON_OPTION) -> None:
    """Every version of one model: created when and by whom, metrics, size, sha256, which one is live."""
    settings = load_client_settings()
    quiet_logging()
    models = run(_describe(settings), settings)
    found = next((m for m in models if m["name"] == name), None)
    if found is None:
        raise NotFound(f"no model {name!r} (see 'rtml models list')")
    if as_json:
        print(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
        return
    table = Table("version", "live", "created", "by", "auc", "logloss", "size", "sha256", title=f"model {name}")
    for v in found["versions"]:
        table.add_row(
            v["version"],
            "*" if v["live"] else "",
            _when(v["created_at"]),
            v["created_by"] or "unknown",
            _metric(v["metrics"], "auc"),
            _metric(v["metrics"], "logloss"),
            str(v["size"]),
            (v["sha256"] or "")[:16],
        )
    out = _out()
    out.print(table)
    if not found["versions"]:
        out.print(f"{name} has no versions yet: rtml train --model {name}")
    elif found["history"]:
        out.print(f"previously live (most recent first): {', '.join(found['history'])}")


@app.command("promote")
def promote(
    name: str = typer.Argument(..., help="model name"),
    version: str = typer.Argument(..., help="version to make live"),
) -> None:
    """Make VERSION of NAME live on every serving replica (announced on rtml.models)."""
    settings = load_client_settings()
    quiet_logging()

    async def work(registry: Any, producer: Producer | None) -> None:
        await registry.promote(name, version, producer, by=_user())

    run(_announcing(settings, work), settings)
    print(f"promoted {name} version {version} (live)")


@app.command("rollback")
def rollback(name: str = typer.Argument(..., help="model name")) -> None:
    """Make the version that was live before the current one live again (announced on rtml.models)."""
    settings = load_client_settings()
    quiet_logging()

    async def work(registry: Any, producer: Producer | None) -> str:
        previous: str = await registry.rollback(name, producer, by=_user())
        return previous

    previous = run(_announcing(settings, work), settings)
    print(f"rolled {name} back to version {previous} (live)")


@app.command("shadow")
def shadow(
    name: str = typer.Argument(..., help="model name"),
    version: str = typer.Argument(..., help="candidate version (not the live one)"),
    canary: float | None = typer.Option(
        None, "--canary", min=0.0, max=1.0, help="also answer this share of users (0 < SHARE <= 1), sticky per user"
    ),
    replace: bool = typer.Option(False, "--replace", help="end a running rollout of another version first"),
) -> None:
    """Roll out candidate VERSION of NAME: scored in shadow on every request (logged, never returned), or with
    --canary SHARE answering that share of users. Again with the same VERSION: changes its stage and share."""
    settings = load_client_settings()
    quiet_logging()
    stage, share = ("canary", canary) if canary else ("shadow", 0.0)

    async def work(registry: Any, producer: Producer | None) -> Any:
        return await registry.start_rollout(name, version, stage, share, _user(), replace=replace, producer=producer)

    r = run(_announcing(settings, work), settings)
    print(f"{name} version {r.version} in {_stage_text(r.stage, r.share)} (rollout {r.id}; live {r.live})")


def _stage_text(stage: str, share: float) -> str:
    return f"canary for {share:.1%} of users" if stage == "canary" else stage


@app.command("rollout")
def rollout(name: str = typer.Argument(..., help="model name"), as_json: bool = JSON_OPTION) -> None:
    """The running rollout of NAME: candidate (or guard) version, stage, canary share, since when, by whom."""
    settings = load_client_settings()
    quiet_logging()

    async def work(registry: Any) -> Any:
        return await registry.rollout(name)

    r = run(_with_registry(settings, work), settings)
    if as_json:
        print(orjson.dumps({"model": name, "rollout": r.to_dict() if r else None}, option=orjson.OPT_INDENT_2).decode())
        return
    if r is None:
        print(f"{name}: no rollout running")
        return
    role = "previous version kept in shadow after a promotion" if r.stage == "guard" else "candidate"
    print(f"{name}: version {r.version} ({role}) in {_stage_text(r.stage, r.share)} against live {r.live or '-'}, "
          f"since {_when(r.since)} by {r.by or 'unknown'} (rollout {r.id})")  # fmt: skip


@app.command("end-rollout")
def end_rollout(name: str = typer.Argument(..., help="model name")) -> None:
    """End the running rollout of NAME (the live version does not change; announced on rtml.models)."""
    settings = load_client_settings()
    quiet_logging()

    async def work(registry: Any, producer: Producer | None) -> Any:
        return await registry.end_rollout(name, None, _user(), producer)

    r = run(_announcing(settings, work), settings)
    if r is None:
        raise NotFound(f"model {name!r} has no rollout running")
    print(f"ended the rollout of {name} version {r.version} ({r.stage}); live is still {r.live or '-'}")
