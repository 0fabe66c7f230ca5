"""Backfill replays history through the live feature code: point-in-time values equal the reference and
what the live store serves."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from rtml.core.config import parse_config
from rtml.core.errors import InvalidInput
from rtml.core.redis import Keys, connect
from rtml.core.schemas import Event
from rtml.core.settings import Settings
from rtml.features.backfill import read_events, run_backfill
from rtml.features.plan import entity_id_of
from rtml.features.store import FeatureStore
from rtml.features.windows import reference_value

pytestmark = pytest.mark.integration

CONFIG = parse_config(
    {
        "entities": {"user": {"key": "user_id"}, "item": {"key": "item_id"}},
        "features": {
            "u_clicks_1m": {"entity": "user", "agg": "count", "events": ["click"], "window": "1m"},
            "u_spend_10m": {"entity": "user", "agg": "sum", "field": "properties.amount", "window": "10m"},
            "u_last_item_5m": {"entity": "user", "agg": "last", "field": "item_id", "window": "5m"},
            "u_total": {"entity": "user", "agg": "count"},
            "i_ctr_5m": {"entity": "item", "agg": "ratio", "numerator": {"events": ["click"]},
                         "denominator": {"events": ["view"]}, "window": "5m"},
        },
    }
)  # fmt: skip
T0 = 1_750_000_000_000


def history(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        if rows and rng.random() < 0.05:
            rows.append(dict(rng.choice(rows)))  # duplicate line: same content, same derived event_id
            continue
        row: dict[str, Any] = {
            "type": rng.choice(["view", "view", "click"]),
            "user_id": rng.choice(["u1", "u2", "u3"]),
            "item_id": rng.choice(["t1", "t2"]),
            "ts": T0 + rng.randint(0, 1_800_000),  # half an hour, written out of order
        }
        if rng.random() < 0.4:
            row["properties"] = {"amount": rng.randint(1, 100)}
        if rng.random() < 0.5:
            row["event_id"] = f"h{i}"
        rows.append(row)
    return rows


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def timeline(events: list[Event]) -> list[Event]:
    return [events[i] for i in sorted(range(len(events)), key=lambda i: (events[i].ts, i))]


async def test_per_event_values_are_point_in_time(settings: Settings, tmp_path: Path) -> None:
    src = write(tmp_path / "events.jsonl", history(600, seed=3))
    out = tmp_path / "features.jsonl"
    assert settings.redis.url
    n = await run_backfill(CONFIG, src, out, redis_url=settings.redis.url)
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert n == len(records) == 600

    ordered = timeline(read_events(src))
    assert [r["event_id"] for r in records] == [e.event_id for e in ordered]
    seen: set[str] = set()
    before: list[Event] = []
    for e, rec in zip(ordered, records, strict=True):
        want: dict[str, Any] = {}
        for entity in ("user", "item"):
            eid = entity_id_of(CONFIG, entity, e)
            mine = [x for x in before if entity_id_of(CONFIG, entity, x) == eid]
            want |= {n: reference_value(mine, f, e.ts) for n, f in CONFIG.features_of(entity).items()}
        assert rec["features"].keys() == want.keys()
        for name, value in want.items():
            assert rec["features"][name] == (pytest.approx(value) if isinstance(value, float) else value), name
        if e.event_id not in seen:  # a duplicate never counts twice
            seen.add(e.event_id)
            before.append(e)


async def test_rows_mode_equals_what_the_live_store_serves(settings: Settings, tmp_path: Path) -> None:
    raw = history(400, seed=4)
    src = write(tmp_path / "events.jsonl", raw)
    t_end = max(r["ts"] for r in raw)
    rows = write(tmp_path / "rows.jsonl", [{"entity": "user", "id": u, "ts": t_end} for u in ("u1", "u2", "u3")]
                 + [{"entity": "item", "id": "t1", "ts": t_end}])  # fmt: skip
    out = tmp_path / "rows-out.jsonl"
    assert settings.redis.url
    await run_backfill(CONFIG, src, out, rows, redis_url=settings.redis.url)
    backfilled = [orjson.loads(line) for line in out.read_bytes().splitlines()]

    redis = connect(settings)
    try:
        live = FeatureStore(redis, Keys(settings.redis.key_prefix + "live:"), CONFIG)
        events = read_events(src)
        for start in range(0, len(events), 50):  # arrival in file order, as a live stream would
            await live.apply(events[start : start + 50], now=t_end)
        served = await live.read_many([(r["entity"], r["id"], None) for r in backfilled], as_of=t_end)
    finally:
        await redis.aclose()
    for rec, values in zip(backfilled, served, strict=True):
        assert rec["features"] == pytest.approx(values), rec["id"]


def test_bad_history_names_file_line_and_field(tmp_path: Path) -> None:
    src = write(tmp_path / "bad.jsonl", [{"type": "view", "ts": T0}, {"type": "view"}])
    with pytest.raises(InvalidInput, match=r"bad.jsonl:2: ts: a backfilled event needs its time"):
        read_events(src)
    src = write(tmp_path / "bad2.jsonl", [{"ts": T0}])
    with pytest.raises(InvalidInput, match=r"bad2.jsonl:1: type: Field required"):
        read_events(src)


def test_cli_backfill_writes_one_record_per_event(tmp_path: Path) -> None:
    import subprocess
    import sys

    src = write(tmp_path / "h.jsonl", history(50, seed=9))
    done = subprocess.run(
        [sys.executable, "-m", "rtml.cli.main", "backfill", str(src)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "h.features.jsonl"
    assert done.stdout.strip() == f"wrote 50 records to {out}"
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(records) == 50 and all("user_views_total" in r["features"] for r in records)
