"""Features as real processes: SIGKILL mid-load and scale-out leave every feature equal to the reference."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rtml.core.config import load_config
from rtml.core.kafka import Producer
from rtml.core.schemas import Event
from rtml.core.settings import Settings
from rtml.features.windows import touches
from tests.helpers import free_port, metric_value, wait_http_ready
from tests.reference import CONFIG_YAML, assert_converges, make_events

pytestmark = pytest.mark.integration


class FeaturesProcess:
    def __init__(self, settings_env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, **settings_env, "RTML_FEATURES_PORT": str(self.port)}
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rtml.cli.main", "serve", "features"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        wait_http_ready(self.url, self.proc, self.log, timeout)

    def consumed(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=2).text
        return metric_value(text, "rtml_consumer_records_total", consumer="features")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def env(make_settings: Any, tmp_path: Path) -> Iterator[tuple[Settings, dict[str, str]]]:
    config = tmp_path / "rtml.yaml"
    config.write_text(CONFIG_YAML)
    s: Settings = make_settings(config=config)
    assert s.kafka.bootstrap and s.redis.url
    yield (
        s,
        {
            "RTML_KAFKA_BOOTSTRAP": s.kafka.bootstrap,
            "RTML_KAFKA_PARTITIONS": str(s.kafka.partitions),
            "RTML_REDIS_URL": s.redis.url,
            "RTML_REDIS_KEY_PREFIX": s.redis.key_prefix,
            "RTML_TOPIC_PREFIX": s.topic_prefix,
            "RTML_CONFIG": str(config),
            "RTML_LOG_LEVEL": "WARNING",
        },
    )


async def publish(settings: Settings, events: list[Event], batch: int, pause: float, on_batch: Any = None) -> None:
    async with Producer(settings) as producer:
        for n, start in enumerate(range(0, len(events), batch)):
            chunk = events[start : start + batch]
            await producer.send_many(
                "events", [((e.user_id or "").encode(), e.model_dump_json().encode()) for e in chunk]
            )
            if on_batch is not None:
                on_batch(n)
            await asyncio.sleep(pause)


async def test_sigkill_during_load_leaves_every_feature_exact(
    env: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    settings, proc_env = env
    config = load_config(Path(proc_env["RTML_CONFIG"]))
    from rtml.core.kafka import create_topics

    await create_topics(settings)
    events = make_events(12_000, seed=1)
    log = tmp_path / "features.log"
    procs = [FeaturesProcess(proc_env, log)]
    procs[0].wait_ready()
    kills = {8: "kill", 20: "kill"}  # batch numbers after which the running process is SIGKILLed

    def on_batch(n: int) -> None:
        if kills.get(n) == "kill":
            procs[-1].kill()
            procs.append(FeaturesProcess(proc_env, log))

    try:
        await publish(settings, events, batch=400, pause=0.05, on_batch=on_batch)
        assert len(procs) == 3
        procs[-1].wait_ready()
        assert sum(1 for e in events if touches(e, config.features["user_events_total"])) == len(events)
        await assert_converges(settings, config, events, timeout=90)
    finally:
        for p in procs:
            p.stop()


async def test_two_processes_split_the_partitions_and_stay_exact(
    env: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    settings, proc_env = env
    config = load_config(Path(proc_env["RTML_CONFIG"]))
    from rtml.core.kafka import create_topics

    await create_topics(settings)
    a = FeaturesProcess(proc_env, tmp_path / "a.log")
    b = FeaturesProcess(proc_env, tmp_path / "b.log")
    try:
        a.wait_ready()
        b.wait_ready()
        await asyncio.sleep(4)  # let the group settle with both members
        events = make_events(6_000, seed=2)
        await publish(settings, events, batch=500, pause=0.02)
        await assert_converges(settings, config, events, timeout=90)
        assert a.consumed() > 0 and b.consumed() > 0, (a.consumed(), b.consumed())
    finally:
        a.stop()
        b.stop()
