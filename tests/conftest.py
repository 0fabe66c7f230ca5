"""Shared fixtures: one real broker and one real redis-server per test session.

``RTML_KAFKA_BOOTSTRAP`` / ``RTML_REDIS_URL`` in the environment switch to external ones (e.g. Apache
Kafka). Every test gets its own topic prefix and Redis key prefix, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from rtml.core import embedded
from rtml.core.kafka import create_topics
from rtml.core.settings import Settings
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


# The slowest files, slowest first (CI's --durations), run before every other: `make test` hands files to its two
# workers in collection order (--no-loadscope-reorder), so the longest ones overlap the many short ones instead of
# starting last and running alone. The rest keep their collection order.
# xdist gives each worker two files up front: the third file queues behind the learning loop on the first
# worker, so it is a shorter one.
SLOWEST_FIRST = (
    "e2e/test_learning_loop.py",
    "e2e/test_faults.py",
    "e2e/test_overload.py",
    "e2e/test_replicas.py",
    "e2e/test_shutdown.py",
    "integration/test_report.py",
    "e2e/test_prometheus_live.py",
    "e2e/test_walkthrough.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {f"tests/{name}": i for i, name in enumerate(SLOWEST_FIRST)}
    # by node id (relative to the rootdir, this repository): a symlinked checkout still matches
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(SLOWEST_FIRST)))  # stable


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("RTML_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    broker = embedded.start_broker(free_port())
    try:
        yield f"127.0.0.1:{broker.port}"
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("RTML_REDIS_URL")
    if external:
        yield external
        return
    server = embedded.start_redis(free_port())
    try:
        yield f"redis://127.0.0.1:{server.port}/0"
    finally:
        server.stop()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def make_settings(kafka_bootstrap: str, redis_url: str, unique: str, tmp_path: Path) -> Any:
    """Settings for one test: real broker and Redis, a private topic and key prefix."""

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "kafka": {"bootstrap": kafka_bootstrap, "partitions": 2},
            "redis": {"url": redis_url, "key_prefix": f"t{unique}:"},
            "topic_prefix": f"t{unique}.",
            "config": ROOT / "services" / "rtml" / "demo" / "rtml.yaml",
            "examples_dir": tmp_path / "examples",  # never the working directory's .rtml/examples
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return Settings(**base)

    return make


@pytest.fixture
async def settings(make_settings: Any) -> AsyncIterator[Settings]:
    s: Settings = make_settings()
    await create_topics(s)
    yield s


def _form_cluster(ports: list[int], timeout_s: float = 20.0) -> None:
    """Make ``ports`` (empty cluster-enabled redis-servers) one cluster of masters without redis-cli: split
    the 16384 slots evenly (CLUSTER ADDSLOTS: redis 6.2 has no ADDSLOTSRANGE), MEET, wait for state ok."""
    import time

    import redis

    clients = [redis.Redis(host="127.0.0.1", port=p) for p in ports]
    try:
        bounds = [16384 * i // len(ports) for i in range(len(ports) + 1)]
        for client, lo, hi in zip(clients, bounds, bounds[1:], strict=False):
            client.execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", ports[0])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            infos = [c.cluster("INFO") for c in clients]  # parsed by redis-py into a dict of str
            if all(i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == len(ports)
                   for i in infos):  # fmt: skip
                return
            time.sleep(0.1)
        raise RuntimeError(f"the test cluster on {ports} did not reach cluster_state:ok in {timeout_s} s")
    finally:
        for client in clients:
            client.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[str]:
    """A real 3-master Redis Cluster on loopback, formed from Python (no redis-cli needed); its URL names one
    node (the startup node). ``RTML_REDIS_CLUSTER_URL`` in the environment uses an external cluster instead."""
    import subprocess
    import tempfile

    external = os.environ.get("RTML_REDIS_CLUSTER_URL")
    if external:
        yield external
        return
    nodes: list[embedded.Managed] = []
    try:
        for _ in range(3):
            port = free_port(bus_offset=10_000)  # its cluster bus port must be free too
            workdir = Path(tempfile.mkdtemp(prefix="rtml-redis-cluster-"))
            proc = subprocess.Popen(  # noqa: S603 - our own resolved binary, fixed arguments
                [embedded.redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "no",
                 "--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf"),
                 "--cluster-node-timeout", "5000"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=embedded.die_with_parent,
            )  # fmt: skip
            nodes.append(embedded.Managed("redis-cluster", proc, port, workdir=workdir))
            embedded.wait_for_port("127.0.0.1", port, 15, proc)
        _form_cluster([n.port for n in nodes])
        yield f"redis://127.0.0.1:{nodes[0].port}/0"
    finally:
        for node in nodes:
            node.stop()
