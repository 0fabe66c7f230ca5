"""The one Redis access layer: a pooled asyncio client, key naming, Lua scripts, error mapping.

Keys put the entity in a hash tag (``rtml:{user:u1}:...``) so all keys of one entity live in one
Redis Cluster slot and one Lua call can touch them atomically.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rtml.core.errors import DependencyUnavailable
from rtml.core.settings import Settings

Redis = aioredis.Redis
T = TypeVar("T")


def connect(settings: Settings) -> Redis:
    r = settings.redis
    if not r.url:
        raise DependencyUnavailable("redis", "RTML_REDIS_URL is not set")
    return aioredis.Redis.from_url(
        r.url,
        max_connections=r.max_connections,
        socket_timeout=r.socket_timeout_s,
        socket_connect_timeout=r.socket_timeout_s,
        health_check_interval=30,
    )


class Keys:
    """Key names under the configured prefix; ``{...}`` is the Redis Cluster hash tag."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def entity(self, entity: str, entity_id: str) -> str:
        return f"{self.prefix}{{{entity}:{entity_id}}}"

    def feature(self, entity: str, entity_id: str, feature: str) -> str:
        return f"{self.entity(entity, entity_id)}:f:{feature}"

    def seen(self, entity: str, entity_id: str) -> str:
        return f"{self.entity(entity, entity_id)}:seen"

    def models_index(self) -> str:
        """The set of registered model names (its own slot)."""
        return f"{self.prefix}{{models}}"

    def model(self, name: str) -> str:
        return f"{self.prefix}{{model:{name}}}"

    def prediction(self, prediction_id: str) -> str:
        return f"{self.prefix}{{p:{prediction_id}}}"


def load_script(client: Redis, package: str, name: str) -> AsyncScript:
    """Register a Lua script shipped in ``package`` (EVALSHA, reloaded automatically on NOSCRIPT)."""
    source = resources.files(package).joinpath(name).read_text(encoding="utf-8")
    return client.register_script(source)


# Server states a retry can outlive (restart, failover, memory pressure): never a reason to dead-letter.
_TRANSIENT = ("LOADING", "BUSY", "READONLY", "OOM", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS")


async def guarded(call: Awaitable[T], what: str = "Redis call") -> T:
    """Await a Redis call, mapping connection failures to DependencyUnavailable (503 / consumer retry)."""
    try:
        return await call
    except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise DependencyUnavailable("redis", f"{what} failed: {exc}") from exc
    except RedisError as exc:
        if any(marker in str(exc) for marker in _TRANSIENT):
            raise DependencyUnavailable("redis", f"{what} failed: {exc}") from exc
        raise


async def ping(client: Redis, timeout_s: float = 1.0) -> None:
    try:
        await asyncio.wait_for(client.ping(), timeout_s)
    except Exception as exc:
        raise DependencyUnavailable("redis", f"Redis does not answer: {exc!r}") from exc


async def run_pipeline(client: Redis, build: Callable[[Pipeline], None], what: str) -> list[Any]:
    """Build a non-transactional pipeline and send it in one round trip."""

    async def go() -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            build(pipe)
            return list(await pipe.execute())

    return await guarded(go(), what)
