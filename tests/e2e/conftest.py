"""Fixtures of the e2e tier: ``rtml up`` as real processes, on the session's broker and redis-server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rtml.core import embedded
from rtml.core.settings import SERVICES, Settings
from tests.helpers import free_port

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "services" / "rtml" / "demo" / "rtml.yaml"


class Platform:
    def __init__(self, proc: subprocess.Popen[bytes], urls: dict[str, str], env: dict[str, str]) -> None:
        self.proc = proc
        self.urls = urls
        self.env = env

    def settings(self) -> Settings:
        return Settings(
            kafka={"bootstrap": self.env["RTML_KAFKA_BOOTSTRAP"]},
            redis={"url": self.env["RTML_REDIS_URL"], "key_prefix": self.env["RTML_REDIS_KEY_PREFIX"]},
            topic_prefix=self.env["RTML_TOPIC_PREFIX"],
        )


@contextmanager
def running_platform(
    kafka_bootstrap: str, redis_url: str, run_dir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[Platform]:
    """``rtml up [ARGS]`` with its own topic and key prefix and free ports; yields once it printed the four
    service URLs (every service answers /readyz by then); killed afterwards if the test did not stop it.
    ``env``: settings of the test's own, over the defaults here."""
    unique = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "RTML_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "RTML_REDIS_URL": redis_url,
        "RTML_TOPIC_PREFIX": f"e2e{unique}.",
        "RTML_REDIS_KEY_PREFIX": f"e2e{unique}:",
        "RTML_CONFIG": str(DEMO_CONFIG),
        **{f"RTML_{s.upper()}_PORT": str(free_port()) for s in SERVICES},
        **(env or {}),  # the test's own settings (e.g. RTML_CONFIG) win
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtml.cli.main", "up", "--run-dir", str(run_dir), *args],
        env=env, cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    urls: dict[str, str] = {}
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while len(urls) < 4 and time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            break
        name, _, value = line.strip().partition(" ")
        if name in SERVICES:
            urls[name] = value.strip()
    if len(urls) < 4:
        proc.kill()
        _, stderr = proc.communicate()
        pytest.fail(f"rtml up did not print its URLs: {stderr.decode()[-2000:]}")
    try:
        yield Platform(proc, urls, env)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def platform(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> Iterator[Platform]:
    with running_platform(kafka_bootstrap, redis_url, tmp_path) as running:
        yield running


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[embedded.Managed]:
    """A broker of this test's own, to pause with SIGSTOP (the session's is shared)."""
    broker = embedded.start_broker(free_port(), log_dir=tmp_path / "broker")
    try:
        yield broker
    finally:
        if broker.proc.poll() is None:
            os.kill(broker.proc.pid, signal.SIGCONT)
        broker.stop()


@pytest.fixture
def own_redis() -> Iterator[embedded.Managed]:
    """A redis-server of this test's own, to pause with SIGSTOP."""
    server = embedded.start_redis(free_port())
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
