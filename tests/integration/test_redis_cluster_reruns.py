"""The registry, join store, quality, label rule and serving tests, run again on a real 3-master Redis Cluster.

The test functions (and their module fixtures) are imported from their own modules, so pytest collects them
here too; ``make_settings`` is overridden for this module only, so every ``settings`` they get points at the
``redis_cluster`` fixture with ``redis.cluster`` on (``connect`` then returns a ``RedisCluster``). Tests
that only make sense on one node (REPLICAOF) are not imported."""

from __future__ import annotations

from typing import Any

import pytest

from rtml.core.settings import Settings
from tests.integration.test_feedback_labels import (  # noqa: F401 - fixtures and tests collected here
    lsettings,
    rules,
    test_a_sweep_that_dies_before_publishing_is_redone_after_its_lease,
    test_click_seen_before_its_prediction_still_labels_it,
    test_null_negative_gives_no_outcome_and_other_paths_match,
    test_random_stream_labels_equal_the_reference,
)
from tests.integration.test_feedback_quality import (  # noqa: F401
    redis,
    test_a_shorter_redelivery_never_lowers_a_mark,
    test_with_sources_each_record_counts_once_in_every_key_whatever_was_written_before,
)
from tests.integration.test_feedback_service import (  # noqa: F401
    test_a_quality_write_that_fails_after_the_join_counts_once_when_the_batch_comes_again,
)
from tests.integration.test_feedback_store import (  # noqa: F401
    store,
    test_a_batch_applies_in_order_in_one_round_trip,
    test_any_order_with_redelivery_joins_one_outcome_exactly_once,
    test_recommendation_outcomes_join_their_item_and_no_item_means_the_first,
)
from tests.integration.test_serving import (  # noqa: F401
    fast,
    test_degraded_when_the_store_cannot_be_read,
    test_predict_uses_stored_features_and_logs_them,
    test_promote_switches_every_replica_without_failed_requests,
    test_recommend_ranks_candidates,
    test_recommend_reads_pair_features_per_candidate,
    test_request_features_override_and_defaults,
    test_unknown_model_and_no_live_version_are_404,
)
from tests.integration.test_serving_registry import (  # noqa: F401
    test_checksum_mismatch_is_detected_on_read,
    test_ensure_models_covers_every_configured_model,
    test_ensure_models_trains_once_and_train_adds_versions,
    test_history_is_bounded,
    test_rollback_round_trip_is_announced,
    test_rollback_route,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def make_settings(make_settings: Any, redis_cluster: str) -> Any:
    """The shared ``make_settings``, on the cluster (a test's own ``redis`` overrides still apply)."""

    def make(**overrides: Any) -> Settings:
        on_cluster = {"url": redis_cluster, "cluster": True, **overrides.pop("redis", {})}
        s: Settings = make_settings(redis=on_cluster, **overrides)
        return s

    return make
