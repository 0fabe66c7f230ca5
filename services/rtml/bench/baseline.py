"""The same-run baseline for ``bench predict|recommend``: ``benchmarks/baseline_app.py`` as a subprocess.

The bench seeds the hashes the baseline reads (20 float fields each) under a scratch key prefix, starts the
app on a free loopback port, waits for ``/healthz``, and afterwards stops it and deletes the keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from rtml.bench.common import BenchError
from rtml.core.embedded import die_with_parent, free_port
from rtml.core.redis import connect
from rtml.core.settings import Settings

BASELINE_APP = Path(__file__).resolve().parents[3] / "benchmarks" / "baseline_app.py"
HASH_FIELDS = 20
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Baseline:
    host: str
    port: int
    app: Path


async def _seed(settings: Settings, prefix: str, ids: Sequence[str]) -> None:
    redis = connect(settings)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for n, id_ in enumerate(ids):
                pipe.hset(f"{prefix}{id_}", mapping={f"f{i}": (n * 7 + i * 13) % 29 / 4 for i in range(HASH_FIELDS)})
            await pipe.execute()
    finally:
        await redis.aclose()


async def _delete(settings: Settings, prefix: str, ids: Sequence[str]) -> None:
    redis = connect(settings)
    try:
        keys = [f"{prefix}{i}" for i in ids]
        for start in range(0, len(keys), 1000):
            await redis.delete(*keys[start : start + 1000])
    finally:
        await redis.aclose()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-500:].strip()


def _check(app: Path) -> None:
    if not app.is_file():
        raise BenchError(f"the baseline app is not at {app}: it ships in the repository's benchmarks/ directory")


async def _wait_up(proc: asyncio.subprocess.Process, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise BenchError(f"the baseline app exited with {proc.returncode}: {_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/healthz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise BenchError(f"the baseline app did not answer {url}/healthz within {START_TIMEOUT_S:g} s")


@contextlib.asynccontextmanager
async def running_baseline(
    settings: Settings, prefix: str, ids: Sequence[str], n_features: int, app: Path = BASELINE_APP
) -> AsyncIterator[Baseline]:
    """Seed ``ids`` under ``prefix``, run the baseline app until exit, then stop it and delete the keys."""
    _check(app)
    host, port = "127.0.0.1", free_port()
    redis_url = settings.redis.url or "redis://127.0.0.1:6379/0"
    await _seed(settings, prefix, ids)
    try:
        with tempfile.TemporaryDirectory(prefix="rtml-baseline-") as tmp:
            log = Path(tmp) / "baseline.log"
            with log.open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, str(app), "--host", host, "--port", str(port), "--redis-url", redis_url,
                    "--prefix", prefix, "--features", str(n_features),
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                    preexec_fn=die_with_parent,  # a killed bench (or test run) leaves no baseline server behind
                )  # fmt: skip
            try:
                await _wait_up(proc, f"http://{host}:{port}", log)
                yield Baseline(host, port, app)
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 10)
                    except TimeoutError:
                        proc.kill()
                        await proc.wait()
    finally:
        await _delete(settings, prefix, ids)
