"""Shared by the fault, overload and shutdown tests: ``rtml serve NAME`` as a real process, its metrics and RSS,
and a whole-topic read. (Not a test module: pytest collects only ``test_*.py``.)"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from rtml.core import embedded
from rtml.core.kafka import client_options
from rtml.core.settings import ServiceName, Settings
from tests.helpers import free_port, metric_value, wait_http_ready


def env_of(s: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes ``rtml serve`` use these settings (broker, Redis, prefixes, config)."""
    assert s.kafka.bootstrap and s.redis.url
    return {
        "RTML_KAFKA_BOOTSTRAP": s.kafka.bootstrap,
        "RTML_KAFKA_PARTITIONS": str(s.kafka.partitions),
        "RTML_REDIS_URL": s.redis.url,
        "RTML_REDIS_KEY_PREFIX": s.redis.key_prefix,
        "RTML_TOPIC_PREFIX": s.topic_prefix,
        "RTML_CONFIG": str(s.platform_config_path()),
        "RTML_EXAMPLES_DIR": str(s.examples_dir),
        "RTML_LOG_LEVEL": "WARNING",
        **extra,
    }


class Service:
    """One ``rtml serve NAME`` process on its port (``RTML_<NAME>_PORT`` in ``env``, else a free one; kept across
    restarts, so it can be started again after a kill), its output in ``log``. Started at once unless ``start``
    is False."""

    def __init__(self, name: ServiceName, env: dict[str, str], log_dir: Path, *, start: bool = True) -> None:
        self.name = name
        port_var = f"RTML_{name.upper()}_PORT"
        self.port = int(env[port_var]) if port_var in env else free_port()
        self.env = {**os.environ, **env, port_var: str(self.port)}
        self.log = log_dir / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rtml.cli.main", "serve", self.name],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def wait_ready(self, timeout: float = 90) -> None:
        assert self.proc is not None
        wait_http_ready(self.url, self.proc, self.log, timeout)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, wait for the exit (a hang fails), the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout} s of SIGTERM: {self.tail()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM if it still runs, SIGKILL after ``timeout`` s (clean-up: a hang does not fail)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_bytes(self) -> int:
        """Resident set size of the service process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` (with these labels) on its /metrics."""
        return metric_value(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)


async def read_topic(settings: Settings, topic: str, timeout_s: float = 30) -> list[Any]:
    """Every record now on ``topic`` (this test's prefix), every partition from the start to its end offset."""
    consumer = AIOKafkaConsumer(**client_options(settings.kafka), enable_auto_commit=False)
    await consumer.start()
    try:
        full = settings.topic(topic)
        assert full in await consumer.topics()  # also fetches the metadata partitions_for_topic reads
        parts = [TopicPartition(full, p) for p in sorted(consumer.partitions_for_topic(full) or [])]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, f"could not read {full} to its end in {timeout_s} s"
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


class DelayProxy:
    """A TCP proxy on a free loopback port that forwards every chunk to ``upstream`` (and back) ``delay_s``
    later, in order: a dependency on a slow network. Under it, a service's capacity is bounded by that latency
    and its in-flight limit (Little's law), which is the overload the in-flight admission exists for."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                dst.write(chunk)
                await dst.drain()

        sender = asyncio.create_task(deliver())
        try:
            while chunk := await src.read(65536):
                queue.put_nowait((loop.time() + self.delay_s, chunk))
            queue.put_nowait((0.0, b""))
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            dst.close()


def start_broker_behind(proxy_port: int, log_dir: Path) -> embedded.Managed:
    """Tansu (memory storage) listening on a free port but advertising ``proxy_port``: after bootstrap every
    client connects through whatever listens there (a ``DelayProxy``)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "broker.log", "ab") as out:
        proc = subprocess.Popen(
            [embedded.broker_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{proxy_port}", "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=embedded.die_with_parent,
        )  # fmt: skip
    embedded.wait_for_port("127.0.0.1", port, 15, proc)
    return embedded.Managed("broker", proc, port)
