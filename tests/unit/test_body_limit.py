"""The body limit: the global one, per-path overrides, by Content-Length and while streaming a chunked body."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from pydantic import BaseModel

from rtml.core.app import ReadinessCheck, build_app
from rtml.core.settings import Settings


class Body(BaseModel):
    text: str


@contextlib.asynccontextmanager
async def _nothing(app: FastAPI, settings: Settings) -> AsyncIterator[dict[str, ReadinessCheck]]:
    yield {}


def app_with_limits() -> FastAPI:
    app = build_app("serving", Settings(max_body_bytes=100), _nothing, body_limits={r"/big/[^/]+": 1_000})

    @app.post("/big/{name}")
    @app.post("/big/{name}/more")
    @app.post("/small")
    async def echo(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    return app


async def chunks(n: int, size: int = 64) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield b"x" * size


async def test_an_override_applies_to_its_paths_only() -> None:
    transport = httpx.ASGITransport(app=app_with_limits())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        ok = await client.post("/big/a", content=b"x" * 1_000)
        assert ok.status_code == 200 and ok.json() == {"size": 1_000}
        over = await client.post("/big/a", content=b"x" * 1_001)
        assert over.status_code == 413 and over.json()["error"]["code"] == "payload_too_large"
        # chunked (no Content-Length): counted while streaming
        streamed = await client.post("/big/a", content=chunks(10))
        assert streamed.status_code == 200 and streamed.json() == {"size": 640}
        assert (await client.post("/big/a", content=chunks(20))).status_code == 413
        # the global limit everywhere else, including a longer path under the same prefix
        assert (await client.post("/small", content=b"x" * 100)).status_code == 200
        assert (await client.post("/small", content=b"x" * 101)).status_code == 413
        assert (await client.post("/big/a/more", content=b"x" * 101)).status_code == 413
        assert (await client.post("/small", content=chunks(2))).status_code == 413


async def test_a_chunked_body_over_the_limit_is_413_on_a_validated_route_too() -> None:
    """FastAPI turns any error while reading a body for a pydantic model into 400; the limit still says 413."""
    app = build_app("ingest", Settings(max_body_bytes=100), _nothing)

    @app.post("/model")
    async def model(body: Body) -> dict[str, int]:
        return {"size": len(body.text)}

    async def big_json() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        for _ in range(5):
            yield b"x" * 64
        yield b'"}'

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        resp = await client.post("/model", content=big_json(), headers={"content-type": "application/json"})
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "payload_too_large"
        ok = await client.post("/model", json={"text": "short"})
        assert ok.status_code == 200 and ok.json() == {"size": 5}
