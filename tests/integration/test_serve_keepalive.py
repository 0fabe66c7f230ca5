"""``rtml serve`` keeps an idle keep-alive connection open longer than clients and load balancers do.

A server that closes idle connections first races every client that reuses one: the request goes out as the
server closes it, and the caller gets a connection error instead of an answer (a simulator scoring purchases
died of one: ``ReadError('')`` from serving). uvicorn's own default is 5 s, httpx's pool keeps connections 5 s
too, and cloud load balancers 60 s; ``rtml serve`` keeps them 75 s (nginx's default), so the client side
closes first. Checked on a real process with the benchmarks' raw HTTP client (one connection): a request on a
connection idle past 5 s is answered.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rtml.bench.rawhttp import RawConnection, build_request
from rtml.core.settings import Settings
from tests.helpers import free_port, wait_http_ready

IDLE_S = 6.0  # past uvicorn's default keep-alive timeout (5 s)


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
        healthz = build_request("GET", "127.0.0.1", port, "/healthz")
        async with RawConnection("127.0.0.1", port) as conn:
            first, _ = await conn.request(healthz)
            await asyncio.sleep(IDLE_S)
            try:
                after_idle: object = (await conn.request(healthz))[0]
            except (OSError, asyncio.IncompleteReadError) as exc:  # closed (or reset) by the server meanwhile
                after_idle = exc
        assert first == 200
        assert after_idle == 200  # same connection, still open
    finally:
        proc.terminate()
        proc.wait(15)
