"""The benchmarks' minimal HTTP client against a tiny local server (keep-alive, Content-Length)."""

from __future__ import annotations

import asyncio

import pytest

from rtml.bench.common import BenchError
from rtml.bench.rawhttp import RawConnection, build_request


def test_build_request_bytes() -> None:
    raw = build_request("POST", "127.0.0.1", 8003, "/v1/predict", b'{"a":1}', {"content-type": "application/json"})
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"POST /v1/predict HTTP/1.1"
    assert b"Content-Length: 7" in head and b"content-type: application/json" in head
    assert body == b'{"a":1}'
    assert b"Content-Length" not in build_request("GET", "h", 1, "/healthz")


async def test_raw_connection_reads_several_responses_on_one_connection() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            seen.append(head.split(b"\r\n")[0])
            if b"/chunked" in head:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with RawConnection("127.0.0.1", port) as conn:
            for _ in range(3):
                assert await conn.request(build_request("GET", "127.0.0.1", port, "/x")) == (201, b"ok")
            with pytest.raises(BenchError, match="chunked"):
                await conn.request(build_request("GET", "127.0.0.1", port, "/chunked"))
    finally:
        server.close()
        await server.wait_closed()
    assert seen[:3] == [b"GET /x HTTP/1.1"] * 3
