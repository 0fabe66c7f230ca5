"""Backfill: replay past events through the SAME feature code (the Lua engine) and emit point-in-time values.

The replay runs against a scratch Redis (the CLI starts one) with the replay clock set to each event's ``ts``,
so windows, tiles, dedup and lateness behave exactly as they did live. Two outputs:

- per event (default): the features of every entity the event belongs to, as of ``ts`` and *before* the event
  itself is applied, i.e. what a prediction made at that moment would have read;
- per row (``rows``: ``{"entity", "id", "ts"}``): the entity's features as of ``ts``, after every event with
  ``ts`` up to and including that time.

Calls are pipelined in timeline order (read, apply, read, ...), which Redis runs in that order, so a batch of
hundreds of events costs one round trip and every read sees exactly the events before it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, Field, ValidationError

from rtml.core import embedded
from rtml.core.config import PlatformConfig
from rtml.core.errors import InvalidInput
from rtml.core.redis import Keys
from rtml.core.schemas import Event, EventIn
from rtml.features.plan import entity_id_of
from rtml.features.store import Call, FeatureStore

BATCH = 500


class Row(BaseModel):
    entity: str
    id: str = Field(min_length=1)
    ts: int


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise InvalidInput(f"{path}:{lineno}: not JSON: {exc}") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


def _where(path: Path, lineno: int, exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(line)"
    return f"{path}:{lineno}: {field}: {str(err['msg']).removeprefix('Value error, ')}"


def read_events(path: Path) -> list[Event]:
    """Events in the ingest shape; ``ts`` is required (history has a time); ``event_id`` defaults to a hash of
    the line so that re-running a backfill gives the same ids."""
    events = []
    for lineno, data in _jsonl(path):
        try:
            ev = EventIn.model_validate(data)
        except ValidationError as exc:
            raise InvalidInput(_where(path, lineno, exc)) from None
        if ev.ts is None:
            raise InvalidInput(f"{path}:{lineno}: ts: a backfilled event needs its time")
        event_id = (
            ev.event_id or "bf-" + hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]
        )
        events.append(
            Event(
                event_id=event_id, type=ev.type, user_id=ev.user_id, item_id=ev.item_id,
                ts=ev.ts, received_at=ev.ts, properties=ev.properties,
            )
        )  # fmt: skip
    return events


def read_rows(path: Path) -> list[Row]:
    rows = []
    for lineno, data in _jsonl(path):
        try:
            rows.append(Row.model_validate(data))
        except ValidationError as exc:
            raise InvalidInput(_where(path, lineno, exc)) from None
    return rows


@dataclass(slots=True)
class _Pending:
    out: dict[str, Any]
    reads: list[tuple[str, int]]  # (entity, index of the read call's result)


async def backfill(
    store: FeatureStore, events: list[Event], rows: list[Row] | None = None, *, batch: int = BATCH
) -> AsyncIterator[dict[str, Any]]:
    """Yield one output record per event (or per row), in time order."""
    config = store.config
    if rows is not None:
        for r in rows:
            store.resolve(r.entity, None)  # unknown entity: a clear error before any work
    # the timeline: (ts, kind, arrival) -- events apply before rows read at the same ts
    timeline: list[tuple[int, int, int]] = [(e.ts, 0, i) for i, e in enumerate(events)]
    if rows is not None:
        timeline += [(r.ts, 1, j) for j, r in enumerate(rows)]
    timeline.sort()

    for start in range(0, len(timeline), batch):
        calls: list[Call] = []
        pending: list[_Pending] = []
        for ts, kind, idx in timeline[start : start + batch]:
            if kind == 0:
                e = events[idx]
                if rows is None:
                    p = _Pending({"event_id": e.event_id, "type": e.type, "ts": e.ts, "user_id": e.user_id,
                                  "item_id": e.item_id, "features": {}}, [])  # fmt: skip
                    for entity in _entities_of(store, e):
                        entity_id = entity_id_of(config, entity, e)
                        assert entity_id is not None
                        p.reads.append((entity, len(calls)))
                        calls.append(store.read_call(entity, entity_id, None, ts))
                    pending.append(p)
                calls.extend(store.apply_calls([e], now=ts))
            else:
                r = rows[idx]  # type: ignore[index]
                pending.append(_Pending({"entity": r.entity, "id": r.id, "ts": r.ts, "features": {}},
                                        [(r.entity, len(calls))]))  # fmt: skip
                calls.append(store.read_call(r.entity, r.id, None, ts))
        results = await store.run_calls(calls) if calls else []
        for p in pending:
            for entity, at in p.reads:
                p.out["features"].update(store.decode_row(entity, None, results[at][0]).values)
            yield p.out


def _entities_of(store: FeatureStore, e: Event) -> Iterable[str]:
    for entity in store.config.entities:
        if store.config.features_of(entity) and entity_id_of(store.config, entity, e) is not None:
            yield entity


async def run_backfill(
    config: PlatformConfig,
    events_path: Path,
    out_path: Path,
    rows_path: Path | None = None,
    *,
    redis_url: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Read, replay and write JSONL; a scratch redis-server is started unless ``redis_url`` is given
    (a random key prefix keeps a shared Redis untouched). Returns the number of records written."""
    events = read_events(events_path)
    rows = read_rows(rows_path) if rows_path is not None else None
    scratch = None
    if redis_url is None:
        scratch = embedded.start_redis()
        redis_url = f"redis://127.0.0.1:{scratch.port}/0"
    redis = aioredis.Redis.from_url(redis_url)
    n = 0
    store: FeatureStore | None = None
    try:
        longest = max(config.longest_window_ms, 24 * 3_600_000)
        store = FeatureStore(redis, Keys(f"backfill-{uuid.uuid4().hex[:8]}:"), config, dedup_horizon_ms=longest)
        with out_path.open("wb") as out:
            async for record in backfill(store, events, rows):
                out.write(orjson.dumps(record) + b"\n")
                n += 1
                if on_progress is not None and n % 1000 == 0:
                    on_progress(n)
    finally:
        if store is not None:
            await store.aclose()
        await redis.aclose()
        if scratch is not None:
            scratch.stop()
    return n
