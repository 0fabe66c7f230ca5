"""Scripts reloads after Redis lost its scripts, also when two callers find out at the same time.

Pure logic with fakes standing in for Redis, each reply released by the test in a chosen order.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from rtml.core.redis import Scripts


class Gate:
    def __init__(self) -> None:
        self.waiting: list[asyncio.Event] = []

    async def wait(self) -> None:
        event = asyncio.Event()
        self.waiting.append(event)
        await event.wait()

    def release(self, n: int) -> None:
        self.waiting[n].set()


async def spin() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_two_callers_hitting_noscript_both_get_their_replies() -> None:
    gate = Gate()
    state = {"loaded": False}

    class Client:
        async def script_load(self, src: str) -> str:
            await gate.wait()
            return f"sha-{src}"

    class Resp:
        async def execute(self, commands: Any) -> list[int]:
            loaded = state["loaded"]
            await gate.wait()
            if not loaded:
                raise NoScriptError("NOSCRIPT No matching script")
            return [1] * len(commands)

        async def aclose(self) -> None:
            return None

    scripts = Scripts(aioredis.Redis(), {"apply": "A", "read": "R"})
    scripts.client, scripts.resp = Client(), Resp()  # type: ignore[assignment]
    scripts._shas = {"apply": "sha-A", "read": "sha-R"}  # loaded, then Redis restarted
    first = asyncio.create_task(scripts.run([("apply", ["k"], [])]))
    second = asyncio.create_task(scripts.run([("read", ["k"], [])]))
    await spin()
    gate.release(0)  # first: NOSCRIPT, starts reloading (SCRIPT LOAD A)
    await spin()
    gate.release(2)  # first: A loaded, SCRIPT LOAD R pending
    await spin()
    gate.release(1)  # second: NOSCRIPT while the first is still reloading
    await spin()
    state["loaded"] = True
    while not (first.done() and second.done()):
        for event in gate.waiting:
            event.set()
        await spin()
    assert await first == [1] and await second == [1]


def test_error_replies_map_to_the_exceptions_redis_py_raises() -> None:
    import hiredis
    from redis.exceptions import AuthenticationError, BusyLoadingError, ReadOnlyError, ResponseError

    from rtml.core.redis import reply_error

    got = {m: type(reply_error(hiredis.ReplyError(m))) for m in ("NOSCRIPT x", "WRONGPASS x", "LOADING x",
                                                                   "READONLY x", "ERR x")}  # fmt: skip
    assert got == {"NOSCRIPT x": NoScriptError, "WRONGPASS x": AuthenticationError, "LOADING x": BusyLoadingError,
                   "READONLY x": ReadOnlyError, "ERR x": ResponseError}  # fmt: skip
