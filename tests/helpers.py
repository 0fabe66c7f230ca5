"""Small test helpers shared by integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

T = TypeVar("T")


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run an app's lifespan in-process and give an HTTP client bound to it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float = 20.0, every: float = 0.05) -> T:
    """Retry ``check`` until it stops raising AssertionError, or re-raise after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(every)


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) >= {"error"}, body
    assert {"code", "message"} <= set(body["error"]), body
    err: dict[str, Any] = body["error"]
    return err
