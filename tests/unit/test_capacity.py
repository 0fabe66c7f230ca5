"""The pure parts of benchmarks/capacity.py: /proc parsing, per-unit arithmetic and the sizing model, and
that docs/scaling.md's sizing tables are the ones the model gives for the inputs the page quotes."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cap() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capacity", ROOT / "benchmarks" / "capacity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_cpu_ticks_counts_fields_after_the_command_name_even_with_spaces_and_parens(cap: ModuleType) -> None:
    # fields: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    stat = "42 (tansu (x) y) S 1 42 42 0 -1 4194560 10 0 0 0 250 37 5 6 20 0 8 0 100 0 0\n"
    assert cap.cpu_ticks(stat) == 287


def test_listening_inodes_only_listen_state_on_the_port(cap: ModuleType) -> None:
    table = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1\n"
        "   1: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2222 1\n"
        "   2: 0100007F:1F92 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3333 1\n"
    )
    assert cap.listening_inodes(table, 0x1F91) == {"1111"}
    assert cap.listening_inodes(table, 0x1F92) == {"3333"}
    assert cap.listening_inodes(table, 80) == set()


def test_net_subtracts_the_idle_rate_and_never_goes_negative(cap: ModuleType) -> None:
    assert cap.net(2.0, 0.1, 10.0) == pytest.approx(1.0)
    assert cap.net(0.5, 0.1, 10.0) == 0.0


def test_spread_is_median_min_max_of_known_values(cap: ModuleType) -> None:
    assert cap.spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert cap.spread([1.0, 4.0]) == {"median": 2.5, "min": 1.0, "max": 4.0}
    assert cap.spread([None]) == {"median": None, "min": None, "max": None}


def test_per_unit_subtracts_idle_cpu_and_commands(cap: ModuleType) -> None:
    idle = {"seconds": 2.0, "cpu": {"features": 0.2}, "redis_calls": {"get": 20}, "redis_cpu_s": 0.02}
    phase = {"seconds": 10.0, "cpu": {"features": 3.0}, "redis_calls": {"get": 1100, "evalsha": 500},
             "redis_cpu_s": 1.1, "redis_memory": 50_000}  # fmt: skip
    out = cap.per_unit(phase, idle, 1000)
    assert out["cpu_us"]["features"] == pytest.approx(2000.0)  # (3.0 - 0.1 x 10) / 1000 s
    assert out["cpu_us_gross"]["features"] == pytest.approx(3000.0)
    assert out["redis_commands_by_name"] == {"evalsha": 0.5, "get": 1.0}
    assert out["redis_commands"] == pytest.approx(1.5)
    assert out["redis_cpu_us"] == pytest.approx(1000.0)
    assert out["redis_bytes_retained"] == 50.0


def test_consumer_state_sums_committed_and_lag_but_not_servings_announcement_consumer(cap: ModuleType) -> None:
    text = (
        'rtml_consumer_records_total{consumer="features"} 100.0\n'
        'rtml_consumer_records_total{consumer="serving-models"} 7.0\n'
        'rtml_consumer_lag_records{consumer="features",group="g",partition="0",topic="t"} 3.0\n'
        'rtml_consumer_lag_records{consumer="serving-models",group="g",partition="0",topic="m"} 9.0\n'
    )
    assert cap.consumer_state([text, 'rtml_consumer_records_total{consumer="feedback-join"} 5.0\n']) == (105.0, 3.0)


def test_record_v2_size(cap: ModuleType) -> None:
    assert cap.varint_len(0) == 1 and cap.varint_len(63) == 1 and cap.varint_len(64) == 2 and cap.varint_len(-1) == 1
    # attributes 1, ts delta 2, offset delta 1, key len 1 + 2, value len 1 + 10, header count 1 = 19; length 1
    assert cap.record_v2_bytes(b"u1", b"x" * 10, []) == 20
    # one header: name len 1 + 11, value len 1 + 1
    assert cap.record_v2_bytes(b"u1", b"x" * 10, [("rtml-schema", b"1")]) == 34
    assert cap.record_v2_bytes(None, b"", []) == 8


INPUTS = {
    "events": {
        "cpu_us": {"ingest": 30.0, "features": 60.0, "feedback": 20.0},
        "redis_commands": 17.0,
        "redis_cpu_us": 60.0,
        "redis_bytes_retained": 120.0,
        "kafka": {"events": {"records": 1.0, "record_bytes": 250.0}},
        "entities_per_event": 2.5,
    },
    "predict": {
        "cpu_us": {"serving": 200.0, "feedback": 60.0},
        "redis_commands": 15.0,
        "redis_cpu_us": 90.0,
        "redis_bytes_retained": 1000.0,
        "kafka": {"predictions": {"records": 1.0, "record_bytes": 400.0}},
    },
    "memory": {"per_entity_per_feature_bytes": 500.0, "seen_bytes_per_event": 100.0},
}


def test_size_events_by_hand(cap: ModuleType) -> None:
    a = cap.Assumptions()
    s = cap.size(INPUTS, 100_000, "events", a)
    # features: 100k x 60 µs = 6 cores -> 6 / 0.6 = 10 processes; ingest 3 cores -> 5; feedback 2 -> 4 (3.33 up)
    assert s["processes"] == {
        "ingest": {"cores": 3.0, "processes": 5},
        "features": {"cores": 6.0, "processes": 10},
        "feedback": {"cores": 2.0, "processes": 4},
    }
    # 25 MB/s; partitions: max(12, 2 x 10 consumers, 25 / 5) = 20 -> 24
    assert s["kafka"]["produce_mb_s"] == 25.0 and s["kafka"]["replicated_write_mb_s"] == 75.0
    assert s["kafka"]["partitions"] == 24
    assert s["kafka"]["brokers_for_this_topic"] == 1
    # Redis: 6 cores -> 10 masters by CPU; memory: 10M entities x 10 features x 500 B = 50 GB of features,
    # 100k/s x 86,400 s x 2.5 entities x 100 B = 2,160 GB of seen-sets -> 2,210 GB / 25 = 89 masters
    r = s["redis"]
    assert r["commands_per_s"] == 1_700_000 and r["cores"] == 6.0
    assert r["memory"] == {"entities": 10_000_000, "features_gb": 50.0, "seen_sets_gb": 2160.0, "total_gb": 2210.0}
    assert (r["masters_for_cpu"], r["masters_for_memory"], r["masters"]) == (10, 89, 89)
    assert s["first_limit"] == "Redis memory"


def test_size_predictions_by_hand(cap: ModuleType) -> None:
    s = cap.size(INPUTS, 10_000, "predict")
    assert s["processes"]["serving"] == {"cores": 2.0, "processes": 4}
    assert s["processes"]["feedback"] == {"cores": 0.6, "processes": 1}
    assert s["kafka"]["produce_mb_s"] == 4.0 and s["kafka"]["partitions"] == 12
    # 10k/s x 5,580 s x 1,000 B = 55.8 GB -> 3 masters; CPU 0.9 cores -> 2
    assert s["redis"]["memory"] == {"prediction_state_gb": 55.8, "total_gb": 55.8}
    assert (s["redis"]["masters_for_cpu"], s["redis"]["masters_for_memory"]) == (2, 3)


def test_partitions_follow_throughput_when_it_needs_more_than_the_consumers(cap: ModuleType) -> None:
    s = cap.size(INPUTS, 1_000_000, "events")
    assert s["kafka"]["produce_mb_s"] == 250.0  # 50 partitions for throughput, 200 for 2 x 100 features members
    assert s["kafka"]["partitions"] == 384
    assert s["kafka"]["brokers_for_this_topic"] == 5


def test_scaling_page_tables_are_the_models_output_for_its_quoted_inputs(cap: ModuleType) -> None:
    page = (ROOT / "docs" / "scaling.md").read_text()
    block = re.search(r"<!-- capacity-inputs -->\s*```json\n(.*?)```", page, re.S)
    assert block is not None, "docs/scaling.md quotes its sizing inputs in a json block after <!-- capacity-inputs -->"
    tables = cap.sizing_markdown(json.loads(block.group(1)))
    for line in tables.splitlines():
        assert line in page, f"docs/scaling.md lacks the generated line: {line}"
