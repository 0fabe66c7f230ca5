"""What every command shares: settings built with one-line errors, async entry with error mapping, logging.

The rule of the CLI: a user's mistake or an unreachable dependency is one clear line on stderr and a non-zero
exit, never a traceback. Commands raise :class:`CliError` (or any ``RtmlError``); ``rtml.cli.main`` prints it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from aiokafka.errors import KafkaError
from pydantic import ValidationError
from redis.exceptions import RedisError
from rich.console import Console

from rtml.core.errors import RtmlError
from rtml.core.settings import Settings

T = TypeVar("T")

# Progress and diagnostics go to stderr; stdout carries only results (URLs, versions) that scripts parse.
err = Console(stderr=True, highlight=False)


class CliError(RtmlError):
    """A command cannot do what was asked; the message is the one line the user sees."""

    code = "cli"

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def validation_message(exc: ValidationError) -> str:
    """``RTML_INGEST_PORT: Input should be a valid integer`` — the first bad setting, named as the env var."""
    first = exc.errors()[0]
    loc = "_".join(str(p) for p in first.get("loc", ()))
    return f"invalid setting RTML_{loc.upper()}: {first.get('msg', 'invalid')}"


# Written by `rtml up` (in its run directory, default .rtml) while it runs: where its broker, Redis and
# services are. Client commands started from the same directory read it, under the real environment.
ENDPOINTS_FILE = Path(".rtml") / "endpoints.env"


def load_settings(**overrides: Any) -> Settings:
    """Settings for commands that run the platform (``up``, ``serve``): the environment (and ./.env) only."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise CliError(validation_message(exc)) from None


def load_client_settings(**overrides: Any) -> Settings:
    """Settings for commands that talk to a running platform (``bench``, ``simulate``, ``train``, ``models``,
    ``backfill``): like ``load_settings``, plus, below the environment and ./.env, the endpoints a ``rtml up``
    running from this directory wrote, so they work in a second terminal without exporting anything."""
    env_files: list[Path] = [Path(".env")]
    if ENDPOINTS_FILE.is_file():
        env_files.insert(0, ENDPOINTS_FILE)  # later files win: ./.env overrides what up wrote
    try:
        return Settings(_env_file=env_files, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise CliError(validation_message(exc)) from None


def run(coro: Coroutine[Any, Any, T], settings: Settings | None = None) -> T:
    """``asyncio.run`` with broker and Redis failures turned into one line naming the address."""
    try:
        return asyncio.run(coro)
    except KafkaError as exc:
        where = settings.kafka.bootstrap if settings is not None else "the broker"
        raise CliError(f"Kafka at {where} does not answer: {exc}") from None
    except RedisError as exc:
        where = settings.redis.url if settings is not None else "Redis"
        raise CliError(f"Redis at {where} does not answer: {exc}") from None


def configure_logging(level: str) -> None:
    if level.upper() not in logging.getLevelNamesMapping():
        raise CliError(f"invalid setting RTML_LOG_LEVEL: {level!r} is not a log level (DEBUG, INFO, WARNING, ERROR)")
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def quiet_logging() -> None:
    """For one-shot commands: warnings only, and no client-library noise before our own one-line error."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
