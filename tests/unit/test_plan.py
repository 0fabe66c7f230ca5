"""The fast Planner gives exactly the plan of the straightforward plan_batch (its specification), and folding
is what applying the events one by one would do."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rtml.core.config import parse_config
from rtml.core.schemas import Event
from rtml.features.plan import Planner, plan_batch

CONFIG = parse_config(
    {
        "entities": {"user": {"key": "user_id"}, "item": {"key": "item_id"},
                     "user_item": {"keys": ["user_id", "item_id"]}, "shop": {"key": "properties.shop"}},
        "features": {
            "c": {"entity": "user", "agg": "count", "window": "10s", "tile": "2s"},
            "clicks": {"entity": "user", "agg": "count", "events": ["click"], "window": "1m"},
            "total": {"entity": "user", "agg": "count"},
            "s": {"entity": "user", "agg": "sum", "field": "properties.amount", "window": "30s"},
            "mx": {"entity": "user", "agg": "max", "field": "properties.amount", "events": ["buy"], "window": "1m"},
            "last": {"entity": "user", "agg": "last", "field": "properties.tag", "window": "20s"},
            "d": {"entity": "user", "agg": "distinct_count", "field": "item_id", "window": "1m"},
            "h": {"entity": "user", "agg": "distinct_count", "field": "item_id", "window": "1m", "approx": True},
            "ctr": {"entity": "item", "agg": "ratio", "numerator": {"events": ["click"]},
                    "denominator": {"events": ["view"]}, "window": "1m"},
            "pair": {"entity": "user_item", "agg": "count", "events": ["click"], "window": "1m"},
            "shop_sales": {"entity": "shop", "agg": "sum", "field": "properties.amount"},
        },
    }
)  # fmt: skip

_value = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-9, 9, allow_nan=False), st.text(max_size=2))
_event = st.builds(
    lambda i, t, u, it, dt, amount, tag, shop: Event(
        event_id=f"e{i}", type=t, user_id=u, item_id=it, ts=1_700_000_000_000 + dt, received_at=1_700_000_000_000,
        properties={k: v for k, v in (("amount", amount), ("tag", tag), ("shop", shop)) if v is not None},
    ),
    st.integers(0, 30), st.sampled_from(["view", "click", "buy", "other"]), st.sampled_from([None, "u1", "u2", ""]),
    st.sampled_from([None, "t1", "t2"]), st.integers(-90_000, 90_000), _value, _value,
    st.sampled_from([None, "s1", 7]),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_event, max_size=40), now_dt=st.integers(-5_000, 60_000))
def test_planner_equals_the_specification(events: list[Event], now_dt: int) -> None:
    now = 1_700_000_000_000 + now_dt
    fast, spec = Planner(CONFIG).plan(events, now), plan_batch(events, CONFIG, now)
    assert fast.late == spec.late
    assert list(fast.entities) == list(spec.entities)
    for key, ep in spec.entities.items():
        got = fast.entities[key]
        assert ([e.event_id for e in got.events], got.duplicates) == ([e.event_id for e in ep.events], ep.duplicates)
        assert got.ops == ep.ops


def test_folding_keeps_sums_extremes_the_latest_value_and_distinct_keys_per_tile() -> None:
    now = 1_700_000_000_000  # all four features below have 1 s tiles
    t0 = now // 1000
    evs = [
        Event(
            event_id=f"f{i}",
            type="buy",
            user_id="u1",
            item_id=f"t{i % 2}",
            ts=now - 1000 * (i % 3),
            received_at=now,
            properties={"amount": float(a), "tag": tag},
        )
        for i, (a, tag) in enumerate([(5, "x"), (-2, "y"), (7, "z"), (1, "w")])
    ] + [Event(event_id="f0", type="buy", user_id="u1", ts=now, received_at=now, properties={"amount": 100.0})]
    ep = Planner(CONFIG).plan(evs, now).entities[("user", "u1")]
    assert ep.duplicates == 1  # f0 again: dropped, its amount never counted

    def op(kind: str, name: str, tile: int) -> list[object]:
        return ep.ops[(kind, name, str(tile))]

    assert [op("s", "s", t)[3] for t in (t0, t0 - 1, t0 - 2)] == [6.0, -2.0, 7.0]
    assert [op("x", "mx", t)[3] for t in (t0, t0 - 1, t0 - 2)] == [5.0, -2.0, 7.0]
    assert op("l", "last", t0)[3:] == [now, '"w"']  # f0 and f3 share the greatest ts: the later event wins
    assert set(op("d", "d", t0)[2]) == {f"{t0}|st0", f"{t0}|st1"}  # type: ignore[arg-type]
    assert op("c", "c", now // 2000)[3] == 2  # 2 s tiles: f0 and f3
