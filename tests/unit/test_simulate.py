from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rtml.core.schemas import EventIn
from rtml.simulate.senders import run_clickstream
from rtml.simulate.world import Clickstream, World, tick_sizes


def test_the_stream_is_deterministic_by_seed_and_valid() -> None:
    a = Clickstream(World(50, 20, seed=7)).batch(300, 1000)
    b = Clickstream(World(50, 20, seed=7)).batch(300, 1000)
    c = Clickstream(World(50, 20, seed=8)).batch(300, 1000)
    assert a == b and a != c
    for e in a:
        EventIn.model_validate(e)
    assert len({e["event_id"] for e in a}) == len(a)
    types = {e["type"] for e in a}
    assert {"view", "click"} <= types
    assert all(e["properties"]["amount"] > 0 for e in a if e["type"] == "purchase")


def test_clicks_follow_the_ground_truth() -> None:
    w = World(200, 100, seed=1)
    stream = Clickstream(w)
    views: dict[tuple[str, str], int] = {}
    clicks: dict[tuple[str, str], int] = {}
    for e in stream.batch(30_000, 0):
        key = (e["user_id"], e["item_id"])
        target = views if e["type"] == "view" else clicks if e["type"] == "click" else None
        if target is not None:
            target[key] = target.get(key, 0) + 1
    # pairs the world finds likely are clicked more often than unlikely ones
    likely = [k for k in views if w.click_probability(int(k[0][1:]), int(k[1][1:])) > 0.5]
    unlikely = [k for k in views if w.click_probability(int(k[0][1:]), int(k[1][1:])) < 0.05]
    rate = lambda ks: sum(clicks.get(k, 0) for k in ks) / sum(views[k] for k in ks)  # noqa: E731
    assert rate(likely) > 0.4 and rate(unlikely) < 0.1


def test_tick_sizes_track_the_rate_without_drift() -> None:
    assert sum(tick_sizes(33.3, 0.1, 100)) == 333
    assert tick_sizes(5, 0.1, 4) == [0, 1, 0, 1]
    assert all(n >= 0 for n in tick_sizes(0.7, 0.1, 50))


async def test_run_clickstream_sends_at_the_rate_for_the_duration() -> None:
    got: list[dict[str, Any]] = []

    class Collect:
        async def send(self, events: list[dict[str, Any]]) -> None:
            got.extend(events)

    sent = await run_clickstream(Collect(), Clickstream(World(10, 10)), rate=200, duration_s=0.5, tick_s=0.05)
    assert sent == len(got)
    assert 80 <= sent <= 110  # 0.5 s at 200/s, within scheduling slack

    stop = asyncio.Event()
    stop.set()
    assert await run_clickstream(Collect(), Clickstream(World(1, 1)), rate=10, duration_s=None, stop=stop) == 0


def test_world_rejects_empty() -> None:
    with pytest.raises(ValueError):
        World(0, 5)


def test_purchases_carry_amounts_and_fraudsters_buy_in_charged_back_bursts() -> None:
    w = World(300, 40, seed=3)
    fraudsters = {w.user_id(u) for u in range(w.users) if w.fraudster(u)}
    assert 0 < len(fraudsters) < 0.1 * w.users
    stream = Clickstream(w)
    events = [stream.next_event(t * 100) for t in range(40_000)]  # 10 events/s for ~67 minutes
    again = Clickstream(World(300, 40, seed=3))
    assert events == [again.next_event(t * 100) for t in range(40_000)]  # seeded
    for e in events[:2_000]:
        EventIn.model_validate(e)
    purchases = [e for e in events if e["type"] == "purchase"]
    assert all(e["properties"]["amount"] > 0 for e in purchases)
    fraud = [e for e in purchases if e["user_id"] in fraudsters]
    honest = [e for e in purchases if e["user_id"] not in fraudsters]
    assert len(fraud) >= 30 and len(honest) >= 100
    median = lambda es: sorted(e["properties"]["amount"] for e in es)[len(es) // 2]  # noqa: E731
    assert median(fraud) > 3 * median(honest)
    # a purchase follows within 5 minutes another one by the same user: mostly fraud
    last: dict[str, int] = {}
    quick: dict[bool, int] = {True: 0, False: 0}
    for e in purchases:
        if e["ts"] - last.get(e["user_id"], -(10**9)) <= 300_000:
            quick[e["user_id"] in fraudsters] += 1
        last[e["user_id"]] = e["ts"]
    assert quick[True] / len(fraud) > 0.5 > 2 * quick[False] / len(honest)
    # every fraudulent purchase is charged back a minute later (those due by the end), never an honest one
    chargebacks = {e["properties"]["purchase_id"]: e for e in events if e["type"] == "chargeback"}
    by_id = {e["event_id"]: e for e in purchases}
    assert chargebacks and all(by_id[p]["user_id"] in fraudsters for p in chargebacks)
    assert all(cb["ts"] == by_id[p]["ts"] + 60_000 for p, cb in chargebacks.items())
    due = [e for e in fraud if e["ts"] + 60_000 <= events[-1]["ts"] - 1_000]
    assert {e["event_id"] for e in due} <= set(chargebacks)
    # events come out in time order: nothing scheduled leaks out early
    assert all(a["ts"] <= b["ts"] for a, b in zip(events, events[1:], strict=False))
    assert not [e for e in Clickstream(w, chargebacks=False).batch(20_000, 0) if e["type"] == "chargeback"]
