"""Small test helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import itertools
import os
import random
import socket
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

from rtml.core.embedded import port_is_free

T = TypeVar("T")
LOOP_CHUNK_S = 0.03  # how long hold_up_loop blocks the loop at a time

# Ports for the servers the tests start. ``bind(0)`` hands out ports of the kernel's ephemeral range, and a port
# probed free and closed can be handed out again, to another xdist worker's server, before ours binds it (seen
# in CI: a service died of "address already in use" and the test talked to the other one). So each test process
# takes its ports from a block of its own below the ephemeral range, where neither bind(0) nor an outgoing
# connection's local port ever lands; Redis Cluster's bus ports (+10000) stay below it too. A block is claimed
# with a lock file held for the life of the process, so concurrent test runs on one machine get different
# blocks too; every port is still probed before use.
PORT_BASE, PORT_BLOCK, PORT_BLOCKS = 10_000, 1_000, 10


class _Block(NamedTuple):
    lock: Any  # the open lock file (None: every block was taken), held for the life of the process
    start: int  # the block's first port
    ports: Iterator[int]  # an endless walk over the block from a random start


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


@functools.cache
def _block() -> _Block:
    """This process's block, claimed on first use: the worker's own if no other process holds it, else the next
    free one (every block taken: the worker's own, shared, as without locks)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # absent without xdist: one process
    preferred = int(worker[2:]) % PORT_BLOCKS if worker[2:].isdigit() else 0
    chosen, lock = preferred, None
    for k in range(PORT_BLOCKS):
        n = (preferred + k) % PORT_BLOCKS
        f = open(os.path.join(tempfile.gettempdir(), f"rtml-test-ports-{n}.lock"), "a")  # noqa: SIM115
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        chosen, lock = n, f
        break
    start = PORT_BASE + chosen * PORT_BLOCK
    offset = random.randrange(PORT_BLOCK)
    return _Block(lock, start, itertools.cycle([start + (offset + k) % PORT_BLOCK for k in range(PORT_BLOCK)]))


def free_port(*, bus_offset: int | None = None) -> int:
    """A free loopback port from this process's block (see ``PORT_BASE``); with ``bus_offset``, one whose
    ``port + bus_offset`` is free too (Redis Cluster's bus, a service's next replica), inside the block when the
    offset is smaller than a block. Falls back to ``bind(0)`` when the machine's ephemeral range starts too low
    for the blocks."""
    fallback = PORT_BASE + PORT_BLOCKS * PORT_BLOCK + (bus_offset or 0) > _ephemeral_low()
    _, start, ports = _block()
    for _ in range(PORT_BLOCK):
        if fallback:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        else:
            port = next(ports)
        if bus_offset is not None:
            other = port + bus_offset
            if other >= 65_536 or (not fallback and bus_offset < PORT_BLOCK and other >= start + PORT_BLOCK):
                continue
            if not port_is_free(other):
                continue
        if port_is_free(port):
            return port
    raise RuntimeError(f"no free port in this process's block of {PORT_BLOCK}")


def spin_cpu(seconds: float) -> None:
    """CPU work in this thread for ``seconds`` of its CPU time (the loop's thread, when called from a test)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def hold_up_loop(
    lag: Any,
    done: Callable[[], bool],
    block: Callable[[float], None] = spin_cpu,
    chunk_s: float = LOOP_CHUNK_S,
    timeout: float = 10.0,
) -> list[float]:
    """Block the running loop ``chunk_s`` at a time (by default with CPU work) until ``done()``, letting it turn
    once between chunks so the lag detector's overdue tick runs; its cap on requests in flight after each.
    AssertionError when ``done()`` is still false after ``timeout`` seconds (a starved test process)."""
    caps: list[float] = []
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not done after {timeout} s of holding the loop up"
        block(chunk_s)
        await asyncio.sleep(0)
        caps.append(lag.cap)
    return caps


@contextlib.asynccontextmanager
async def loop_held_up(lag: Any, chunk_s: float = LOOP_CHUNK_S) -> AsyncIterator[None]:
    """CPU work in the running loop, ``chunk_s`` at a time, for as long as the block runs (a task taking turns
    with the block's own awaits, so a request made in the block meets a loop that is behind). Enters once the
    lag detector's cap is down to one request at a time."""
    stop = asyncio.Event()

    async def spin() -> None:
        while not stop.is_set():
            spin_cpu(chunk_s)
            await asyncio.sleep(0)

    task = asyncio.create_task(spin())
    try:
        await until(lambda: lag.cap <= 1)
        yield
    finally:
        stop.set()
        await task


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


@contextlib.asynccontextmanager
async def served(app: FastAPI, port: int, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve ``app`` under uvicorn (lifespan on) in this event loop on ``host:port``; yields its base URL once
    it listens, and stops it on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    for _ in range(400):
        if server.started or task.done():
            break
        await asyncio.sleep(0.05)
    assert server.started, f"{app.title} did not start on {host}:{port}"
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a valid PNG has first, right after the signature."""
    assert data[:8] == PNG_MAGIC, "not a PNG"
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert kind == b"IHDR" and length == 13
    return int(width), int(height)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the loop run until ``condition()`` (a synchronous check, unlike ``eventually``'s)."""

    async def check() -> None:
        assert condition()

    await eventually(check, timeout=timeout, every=0.01)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` (with these labels) in a /metrics page (0 when there are none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def listening_pids_of(port: int) -> set[int] | None:
    """The pids with a TCP socket listening on ``port`` (Linux /proc), or None where that cannot be read."""
    try:
        inodes: set[str] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        inodes.add(f"socket:[{cols[9]}]")
        pids: set[int] = set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                    pids.add(int(pid))
        return pids
    except OSError:
        return None


def wait_http_ready(url: str, proc: Any, log: Any, timeout: float = 90) -> None:
    """Poll ``url``/readyz until ``proc`` (a Popen) answers 200; AssertionError (with the end of ``log``, a
    Path) if it exits or ``timeout`` seconds pass. Blocking: from async code, call it through
    ``asyncio.to_thread``. "Answers" is checked: a free port handed out by ``free_port`` can be taken by
    another test's server before ``proc`` binds it (seen in CI: ``proc`` exited with "address already in use"
    while the other one said ready), so the port must be ``proc``'s own listening socket where /proc says so."""

    def tail() -> str:
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""

    port = httpx.URL(url).port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url} exited: {tail()}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                owners = listening_pids_of(port) if port is not None else None
                assert owners is None or proc.pid in owners, f"{url} is another process's ({owners}): {tail()}"
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready in {timeout} s: {tail()}")
