"""observe_many must leave a histogram exactly as one observe() per value would; GC pauses are timed."""

from __future__ import annotations

import gc

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from rtml.core.metrics import GC_PAUSE_SECONDS, LATENCY_BUCKETS, observe_many, watch_gc


def _state(h: Histogram, registry: CollectorRegistry) -> dict[str, float]:
    return {s.name + str(sorted(s.labels.items())): s.value for m in registry.collect() for s in m.samples}


@given(st.lists(st.one_of(st.sampled_from([0.0, *LATENCY_BUCKETS, 1e9]), st.floats(0, 5, allow_nan=False))))
def test_observe_many_equals_observe_one_by_one(values: list[float]) -> None:
    ra, rb = CollectorRegistry(), CollectorRegistry()
    a = Histogram("x_seconds", "x", buckets=LATENCY_BUCKETS, registry=ra)
    b = Histogram("x_seconds", "x", buckets=LATENCY_BUCKETS, registry=rb)
    for v in values:
        a.observe(v)
    observe_many(b, values)
    sa, sb = _state(a, ra), _state(b, rb)
    assert sa.keys() == sb.keys()
    for k in sa:
        if "created" not in k:
            assert abs(sa[k] - sb[k]) <= 1e-9 * max(1.0, abs(sa[k])), k


def test_every_collection_is_timed_once_per_generation() -> None:
    def collections(gen: int) -> float:
        return sum(b.get() for b in GC_PAUSE_SECONDS.labels(str(gen))._buckets)

    watch_gc()
    watch_gc()  # idempotent: one callback, not two
    before = [collections(g) for g in range(3)]
    gc.collect(2)
    gc.collect(0)
    assert [collections(g) - before[g] for g in range(3)] == [1.0, 0.0, 1.0]
