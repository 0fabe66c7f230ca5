"""The lean pipelined Redis client of the request path, against real redis-servers.

Replies must reach the caller that asked, whatever the concurrency, cancellations and failures; errors must
be redis-py's so the rest of the code maps them the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rtml.core import embedded
from rtml.core.errors import DependencyUnavailable
from rtml.core.redis import Resp, guarded, pack_commands
from tests.helpers import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis() -> Iterator[embedded.Managed]:
    """A redis-server of this test alone (it gets stopped, stalled or password-protected)."""
    server = embedded.start_redis(free_port())
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def resp_for(url: str, **kw: float) -> AsyncIterator[tuple[Resp, aioredis.Redis]]:
    client = aioredis.Redis.from_url(url)
    resp = Resp.like(client)
    for name, value in kw.items():
        setattr(resp, name, value)
    try:
        yield resp, client
    finally:
        await resp.aclose()
        await client.aclose()


def test_pack_commands_is_resp2() -> None:
    expected = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n" + b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert pack_commands([["SET", b"k", 7], ["GET", "k"]]) == expected
    assert pack_commands([["X", 0.5]]) == b"*2\r\n$1\r\nX\r\n$3\r\n0.5\r\n"


async def test_replies_of_every_type_in_order(redis_url: str, unique: str) -> None:
    async with resp_for(redis_url) as (resp, _):
        got = await resp.execute([
            ["SET", f"{unique}a", "1"], ["INCR", f"{unique}a"], ["GET", f"{unique}nope"],
            ["RPUSH", f"{unique}l", "x", "y"], ["LRANGE", f"{unique}l", 0, -1],
            ["EVAL", "return {1, false, 'z', {2}}", 0],
        ])  # fmt: skip
        assert got == [b"OK", 2, None, 2, [b"x", b"y"], [1, None, b"z", [2]]]


async def test_concurrent_callers_each_get_their_own_reply(redis_url: str, unique: str) -> None:
    async with resp_for(redis_url) as (resp, client):
        await client.mset({f"{unique}{i}": str(i) for i in range(300)})

        async def one(i: int) -> None:
            assert await resp.execute([["GET", f"{unique}{i}"], ["ECHO", str(i)]]) == [str(i).encode()] * 2

        await asyncio.gather(*(one(i) for i in range(300)))


async def test_error_replies_are_redis_py_errors(redis_url: str) -> None:
    async with resp_for(redis_url) as (resp, _):
        with pytest.raises(NoScriptError):
            await resp.execute([["EVALSHA", "0" * 40, 0]])
        with pytest.raises(ResponseError, match="unknown command"):
            await resp.execute([["PING"], ["NOSUCHCOMMAND"]])
        assert await resp.execute([["PING"]]) == [b"PONG"]  # the connection is still in step


async def test_a_caller_that_gives_up_does_not_shift_the_replies(redis_url: str, unique: str) -> None:
    slow = "local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]; " \
           "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > 200000; return 'slow'"  # fmt: skip
    async with resp_for(redis_url) as (resp, client):
        await client.set(f"{unique}k", "mine")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.execute([["EVAL", slow, 0]]), 0.02)
        assert await resp.execute([["GET", f"{unique}k"]]) == [b"mine"]


async def test_a_stalled_server_drops_the_connection_and_the_next_call_reconnects(own_redis: embedded.Managed) -> None:
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    spin = "local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]; " \
           "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > 1500000; return 1"  # fmt: skip
    async with resp_for(url, timeout_s=0.3) as (resp, client):
        stall = asyncio.create_task(client.eval(spin, 0))  # the server is busy for 1.5 s
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RedisTimeoutError):
            await resp.execute([["PING"]])
        assert loop.time() - started < 1.0  # the watchdog, not the stall, ended the wait
        await stall
        assert await resp.execute([["PING"]]) == [b"PONG"]


async def test_a_restarted_server_is_reconnected_and_outages_map_to_dependency_unavailable(
    own_redis: embedded.Managed,
) -> None:
    port = own_redis.port
    async with resp_for(f"redis://127.0.0.1:{port}/0") as (resp, _):
        assert await resp.execute([["PING"]]) == [b"PONG"]
        own_redis.stop()
        with pytest.raises(DependencyUnavailable):
            await guarded(resp.execute([["PING"]]))
        with pytest.raises(RedisConnectionError):  # still down: refused at once, no hang
            await asyncio.wait_for(resp.execute([["PING"]]), 5)
        again = embedded.start_redis(port=port)
        try:
            assert await resp.execute([["PING"]]) == [b"PONG"]
        finally:
            again.stop()


async def test_password_and_database_come_from_the_url(own_redis: embedded.Managed, unique: str) -> None:
    admin = aioredis.Redis.from_url(f"redis://127.0.0.1:{own_redis.port}/0")
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    async with resp_for(f"redis://:s3cret@127.0.0.1:{own_redis.port}/3") as (resp, client):
        await client.set(f"{unique}db", "three")
        assert await resp.execute([["GET", f"{unique}db"]]) == [b"three"]  # the same database as redis-py
    async with resp_for(f"redis://:wrong@127.0.0.1:{own_redis.port}/3") as (resp, _):
        with pytest.raises(RedisConnectionError, match="refused"):
            await resp.execute([["PING"]])


def test_works_on_uvloop(redis_url: str) -> None:
    """The services run on uvloop, whose transports are not asyncio's classes."""

    async def main() -> list[object]:
        async with resp_for(redis_url) as (resp, _):
            return await asyncio.gather(*(resp.execute([["ECHO", str(i)]]) for i in range(50)))

    assert uvloop.run(main()) == [[str(i).encode()] for i in range(50)]


async def test_callers_that_give_up_while_it_connects_leave_one_connection(own_redis: embedded.Managed) -> None:
    """SELECT (a non-zero db) is part of connecting; callers cancelled meanwhile must not leak sockets."""
    url = f"redis://127.0.0.1:{own_redis.port}/3"
    slow = "local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]; " \
           "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > 100000; return 1"  # fmt: skip
    async with resp_for(url) as (resp, admin):
        before = len(await admin.client_list())
        for _ in range(5):
            stall = asyncio.create_task(admin.eval(slow, 0))  # the server is busy: SELECT waits
            await asyncio.sleep(0.01)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(resp.execute([["PING"]]), 0.03)  # a serving-like deadline
            await stall
        assert await resp.execute([["PING"]]) == [b"PONG"]
        assert len(await admin.client_list()) == before + 1
