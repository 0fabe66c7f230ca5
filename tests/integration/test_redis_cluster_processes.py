"""The features process's crash (SIGKILL) exactness and scale-out tests, run again on a real 3-master Redis
Cluster: the test functions are those of ``test_features_processes`` (imported, so pytest collects them
here too); only the ``env`` fixture differs (``RTML_REDIS_CLUSTER=true``, the cluster's URL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rtml.core.settings import Settings
from tests.integration.test_features_processes import (
    CONFIG_YAML,
    test_sigkill_during_load_leaves_every_feature_exact,
    test_two_processes_split_the_partitions_and_stay_exact,
)

pytestmark = pytest.mark.integration

__all__ = [
    "test_sigkill_during_load_leaves_every_feature_exact",
    "test_two_processes_split_the_partitions_and_stay_exact",
]


@pytest.fixture
def env(make_settings: Any, redis_cluster: str, tmp_path: Path) -> Iterator[tuple[Settings, dict[str, str]]]:
    config = tmp_path / "rtml.yaml"
    config.write_text(CONFIG_YAML)
    s: Settings = make_settings(config=config, redis={"url": redis_cluster, "cluster": True})
    assert s.kafka.bootstrap and s.redis.url and s.redis.cluster
    yield (
        s,
        {
            "RTML_KAFKA_BOOTSTRAP": s.kafka.bootstrap,
            "RTML_KAFKA_PARTITIONS": str(s.kafka.partitions),
            "RTML_REDIS_URL": s.redis.url,
            "RTML_REDIS_CLUSTER": "true",
            "RTML_REDIS_KEY_PREFIX": s.redis.key_prefix,
            "RTML_TOPIC_PREFIX": s.topic_prefix,
            "RTML_CONFIG": str(config),
            "RTML_LOG_LEVEL": "WARNING",
        },
    )
