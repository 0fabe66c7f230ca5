"""``rtml serve`` keeps an idle keep-alive connection open longer than clients and load balancers do.

A server that closes idle connections first races every client that reuses one: the request goes out as the
server closes it, and the caller gets a connection error instead of an answer (a simulator scoring purchases
died of one: ``ReadError('')`` from serving). uvicorn's own default is 5 s, httpx's pool keeps connections 5 s
too, and cloud load balancers 60 s; ``rtml serve`` keeps them 75 s (nginx's default), so the client side
closes first. Checked on a real process over a raw socket: a request on a connection idle past 5 s is answered.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rtml.core.embedded import free_port
from rtml.core.settings import Settings
from tests.helpers import wait_http_ready

IDLE_S = 6.0  # past uvicorn's default keep-alive timeout (5 s)


def exchange(sock: socket.socket) -> bytes:
    """One ``GET /healthz`` on an open connection, read whole; the status line of its answer (b"" if the server
    closed the connection)."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: rtml\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            return b""
        answer += chunk
    head, body = answer.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            return b""
        body += chunk
    return head.split(b"\r\n", 1)[0]


async def test_a_request_on_a_connection_idle_past_five_seconds_is_answered(make_settings: Any, tmp_path: Path) -> None:
    s: Settings = make_settings()
    port = free_port()
    env = {
        **os.environ,
        "RTML_KAFKA_BOOTSTRAP": str(s.kafka.bootstrap), "RTML_REDIS_URL": str(s.redis.url),
        "RTML_TOPIC_PREFIX": s.topic_prefix, "RTML_INGEST_PORT": str(port),
    }  # fmt: skip
    log = tmp_path / "ingest.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rtml.cli.main", "serve", "ingest"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        await asyncio.to_thread(wait_http_ready, f"http://127.0.0.1:{port}", proc, log)

        def idle_then_reuse() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                first = exchange(sock)
                time.sleep(IDLE_S)
                try:
                    return first, exchange(sock)
                except OSError as exc:  # reset by a server that closed it
                    return first, repr(exc).encode()

        first, after_idle = await asyncio.to_thread(idle_then_reuse)
        assert first == b"HTTP/1.1 200 OK"
        assert after_idle == b"HTTP/1.1 200 OK"  # same connection, still open
    finally:
        proc.terminate()
        proc.wait(15)
