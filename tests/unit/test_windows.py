"""Window maths: the contract's tile rule, checked against a direct reading of the rule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rtml.core.config import FeatureDef
from rtml.core.schemas import Event
from rtml.features.windows import in_window, is_late, reference_value, tile_of, tile_range


def feature(window: str | None, tile: str | None = None, **kw: object) -> FeatureDef:
    return FeatureDef.model_validate({"entity": "user", "agg": "count", "window": window, "tile": tile, **kw})


def test_default_tile_is_a_sixtieth_of_the_window_in_whole_seconds_at_least_one() -> None:
    assert feature("5m").tile_ms == 5_000
    assert feature("1h").tile_ms == 60_000
    assert feature("30s").tile_ms == 1_000  # 0.5 s rounds down, then the 1 s floor
    assert feature("90s").tile_ms == 1_000  # 1.5 s -> 1 s
    assert feature("1h", "1m").n_tiles == 60
    assert feature(None).lifetime


@given(ts=st.integers(-(10**13), 10**13), g=st.sampled_from([1000, 5000, 60_000]))
def test_tile_of_is_floor(ts: int, g: int) -> None:
    t = tile_of(ts, g)
    assert t * g <= ts < (t + 1) * g


@given(
    ts=st.integers(0, 10**7),
    as_of=st.integers(0, 10**7),
    window_s=st.sampled_from([1, 5, 60, 300]),
    tile_s=st.sampled_from([1, 5]),
)
def test_in_window_follows_the_contract_rule(ts: int, as_of: int, window_s: int, tile_s: int) -> None:
    if window_s % tile_s:
        return
    f = feature(f"{window_s}s", f"{tile_s}s")
    g, w = tile_s * 1000, window_s * 1000
    rule = (as_of // g) - (w // g) + 1 <= ts // g <= as_of // g
    assert in_window(ts, as_of, f) is rule
    lo, hi = tile_range(as_of, f)
    assert hi - lo + 1 == w // g


@given(ts=st.integers(0, 10**7), now=st.integers(0, 10**7), later=st.integers(0, 10**6))
def test_a_late_event_is_in_no_read_from_now_on(ts: int, now: int, later: int) -> None:
    f = feature("10s", "2s")
    if is_late(ts, now, f):
        assert not in_window(ts, now + later, f)
    else:
        # not late: some read at or after now still includes it
        assert in_window(ts, max(now, ts), f)


def ev(ts: int, type_: str = "click", arrival: int = 0, **props: bool | int | float | str) -> Event:
    return Event(event_id=f"e{ts}-{arrival}", type=type_, user_id="u", ts=ts, received_at=ts, properties=props)


def test_reference_last_takes_greatest_ts_and_later_arrival_on_ties() -> None:
    f = FeatureDef.model_validate({"entity": "user", "agg": "last", "field": "properties.v", "window": "1m"})
    events = [ev(5000, v="a"), ev(9000, v="b"), ev(9000, arrival=1, v="c"), ev(7000, v="d")]
    assert reference_value(events, f, 10_000) == "c"
    assert reference_value([], f, 10_000) is None


def test_reference_ratio_and_empty_values() -> None:
    f = FeatureDef.model_validate(
        {"entity": "user", "agg": "ratio", "window": "1m",
         "numerator": {"events": ["click"]}, "denominator": {"events": ["view"]}}
    )  # fmt: skip
    assert reference_value([ev(1000, "click")], f, 2000) is None  # zero denominator
    assert reference_value([ev(1000, "click"), ev(1000, "view"), ev(1500, "view")], f, 2000) == 0.5
    mean = FeatureDef.model_validate({"entity": "user", "agg": "mean", "field": "properties.x", "window": "1m"})
    assert reference_value([ev(1000, y=1)], mean, 2000) is None  # events without the field do not touch it


def test_the_worked_example_of_docs_features_md() -> None:
    f = FeatureDef.model_validate({"entity": "user", "agg": "count", "events": ["click"], "window": "5m"})
    assert (f.tile_ms, f.n_tiles) == (5_000, 60)
    clicks = [ev(1_000_000), ev(1_004_999), ev(1_299_000), ev(1_301_000)]
    assert [tile_of(e.ts, f.tile_ms) for e in clicks] == [200, 200, 259, 260]
    assert reference_value(clicks, f, 1_299_999) == 3
    assert reference_value(clicks, f, 1_300_000) == 2
    assert reference_value(list(reversed(clicks)), f, 1_300_000) == 2
    assert is_late(1_004_999, 1_300_000, f) and not is_late(1_005_000, 1_300_000, f)
