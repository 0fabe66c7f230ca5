"""A minimal keep-alive HTTP/1.1 client for load generation on small machines.

httpx costs ~1 ms of client CPU per request, which on 2 cores is load the server under test never gets.
This client sends pre-built request bytes on one connection and reads a ``Content-Length`` response: a few
tens of µs per request. Only what the benchmarks need: no redirects, no chunked bodies, no TLS.
"""

from __future__ import annotations

import asyncio

from rtml.bench.common import BenchError


def build_request(
    method: str, host: str, port: int, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """The exact bytes of one request (sent as is, repeatedly)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class RawConnection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawConnection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one pre-built request; (status, body)."""
        status, _, body = await self.exchange(raw)
        return status, body

    async def exchange(self, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send one pre-built request; (status, headers with lower-case names, body)."""
        self.write(raw)
        return await self.response()

    def write(self, raw: bytes) -> None:
        """Send bytes as they are: one request, or several at once (pipelined)."""
        assert self._writer is not None, "use as an async context manager"
        self._writer.write(raw)

    async def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """The next response on the connection: (status, headers with lower-case names, body)."""
        assert self._reader is not None, "use as an async context manager"
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers: dict[bytes, bytes] = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name:
                headers[name.strip().lower()] = value.strip()
        if b"transfer-encoding" in headers:
            raise BenchError("the raw benchmark client cannot read chunked responses")
        length = int(headers.get(b"content-length", b"0") or 0)
        body = await self._reader.readexactly(length) if length else b""
        return status, headers, body
