"""A small synthetic world (pure, seeded): users with tastes, items with categories and appeal.

The click probability is the ground truth: it grows with the user's taste for the item's category, the
item's appeal and the user's activity, so the demo features (recent clicks, item CTR, variety) carry signal.

Purchases follow a second ground truth, for the ``fraud`` model: a small share of users are fraudsters
(``World.fraudster``). A purchase starts a shopping session (``shopping_session``): an honest user mostly
buys once, for a modest amount (now and then a big one); a fraudster buys in bursts seconds apart, mostly
of high amounts (sometimes a card test of small ones). Every fraudulent purchase is charged back later
(a ``chargeback`` event).
``rtml train --model fraud`` learns from sessions drawn by the same functions (``serving/train.py``).

Drift (``World.drift_at_ms``, ``World.drift``), so the learning loop can be seen working: from that time on
- ``taste``: every user's taste for every category is redrawn (another seeded draw): who clicks what changes;
- ``fraud``: fraudsters learn the velocity checks. A fraudster's session started after the drift is 2-5
  purchases paced 1-3 minutes apart, for mid-size amounts in a narrow band (median 40: gift cards, resellable
  goods) instead of a burst seconds apart of high or tiny ones. A model trained on pre-drift sessions scores
  most of them like honest shoppers; the four demo fraud features still separate them (several purchases an
  hour, all about the same mid-size amount), so a model retrained on post-drift data recovers.
  ``benchmarks/drift_experiment.py`` measures it (ROC AUC of the GBDT ``rtml train --model fraud`` makes):
  on train.py's histories 0.985 pre-drift, 0.71 post-drift, 0.99 retrained on post-drift purchases; on a
  replayed clickstream (20 000 users, 200 events/s, 5 minutes each side of the drift) 0.87, 0.63, 0.90.
Pre-drift behaviour (and every draw of a given seed before the drift) is unchanged by the drift options.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from typing import Any

CATEGORIES = 8
FRAUD_SHARE = 0.04  # of users
SESSION_AFTER_CLICK = {False: 0.1, True: 0.3}  # chance a click leads to a shopping session
SESSION_GAP_MEAN_MS = {False: 6 * 3_600_000, True: 3 * 3_600_000}  # between sessions (training histories)
CHARGEBACK_DELAY_MS = 60_000  # a fraudulent purchase is charged back this long after it (by default)
DRIFTS = frozenset({"taste", "fraud"})
# the post-drift fraud pattern: a paced session of ordinary amounts
PACED_FRAUD_PURCHASES = (2, 5)
PACED_FRAUD_GAP_MS = (60_000, 180_000)
PACED_FRAUD_AMOUNT = (3.7, 0.25)  # log-normal mu, sigma: median 40, 9 in 10 between 27 and 61


def shopping_session(rng: random.Random, fraud: bool, *, drifted: bool = False) -> list[tuple[int, float]]:
    """One shopping session: ``[(ms after its first purchase, amount)]``, in time order.

    Honest: mostly one purchase (median 20), sometimes a second or third one, seconds to half an hour
    apart, and now and then a big-ticket session (median 120). Fraud: a burst of 1-6 purchases seconds
    apart for high amounts (median 100), or a card test: the same burst for small amounts (median 5).
    ``drifted`` (the ``fraud`` drift; honest sessions do not change): fraud is 2-5 purchases 1-3 minutes
    apart for mid-size amounts (median 40, 9 in 10 between 27 and 61).
    """
    if fraud and drifted:
        n = rng.randint(*PACED_FRAUD_PURCHASES)
        gap_ms = PACED_FRAUD_GAP_MS
        mu, sigma = PACED_FRAUD_AMOUNT
    elif fraud:
        n = rng.choices((1, 2, 3, 4, 5, 6), weights=(2, 3, 3, 2, 1, 1))[0]
        gap_ms = (5_000, 60_000)
        mu, sigma = (1.6, 0.6) if rng.random() < 0.25 else (4.6, 0.8)
    else:
        n = rng.choices((1, 2, 3), weights=(80, 15, 5))[0]
        gap_ms = (20_000, 1_800_000)
        mu, sigma = (4.8, 0.6) if rng.random() < 0.08 else (3.0, 1.0)
    out: list[tuple[int, float]] = []
    t = 0
    for k in range(n):
        if k:
            t += rng.randint(*gap_ms)
        out.append((t, round(math.exp(rng.gauss(mu, sigma)), 2)))
    return out


def purchase_history(
    rng: random.Random, fraud: bool, span_ms: int, *, drift_at_ms: int | None = None
) -> list[tuple[int, float]]:
    """Sessions at exponential gaps over ``[0, span_ms)``: ``[(ts ms, amount)]`` in time order.

    ``drift_at_ms`` (from the history's start; ``0``: all of it): sessions starting then or later follow the
    ``fraud`` drift. ``None`` (the default) draws exactly what it drew before drift existed.
    """
    out: list[tuple[int, float]] = []
    t = int(rng.expovariate(1.0 / SESSION_GAP_MEAN_MS[fraud]))
    while t < span_ms:
        session = shopping_session(rng, fraud, drifted=drift_at_ms is not None and t >= drift_at_ms)
        out.extend((t + dt, amount) for dt, amount in session if t + dt < span_ms)
        t += session[-1][0] + int(rng.expovariate(1.0 / SESSION_GAP_MEAN_MS[fraud]))
    return out


@dataclass(frozen=True, slots=True)
class World:
    """The ground truth. ``drift`` (a subset of ``DRIFTS``) changes it from ``drift_at_ms`` (epoch ms) on."""

    users: int
    items: int
    seed: int = 0
    drift_at_ms: int | None = None
    drift: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 1:
            raise ValueError("users and items must be at least 1")
        if unknown := set(self.drift) - DRIFTS:
            raise ValueError(f"unknown drift {', '.join(sorted(unknown))}: use {' or '.join(sorted(DRIFTS))}")
        if self.drift and self.drift_at_ms is None:
            raise ValueError("a drift needs drift_at_ms")

    def drifted(self, kind: str, ts_ms: int | None) -> bool:
        """Whether the ``kind`` drift is in effect at ``ts_ms`` (``None``: before any drift)."""
        return kind in self.drift and ts_ms is not None and self.drift_at_ms is not None and ts_ms >= self.drift_at_ms

    def user_id(self, u: int) -> str:
        return f"u{u}"

    def item_id(self, i: int) -> str:
        return f"t{i}"

    def _rng(self, *key: object) -> random.Random:
        return random.Random(f"{self.seed}:{':'.join(map(str, key))}")  # noqa: S311 - simulation only

    def category(self, item: int) -> int:
        return self._rng("cat", item).randrange(CATEGORIES)

    def appeal(self, item: int) -> float:
        return self._rng("appeal", item).gauss(0.0, 1.0)

    def taste(self, user: int, category: int, *, drifted: bool = False) -> float:
        """How much ``user`` likes ``category``; ``drifted``: after the ``taste`` drift, an independent draw."""
        return self._rng("taste2" if drifted else "taste", user, category).gauss(0.0, 1.0)

    def activity(self, user: int) -> float:
        return self._rng("act", user).gauss(0.0, 0.7)

    def fraudster(self, user: int) -> bool:
        return self._rng("fraud", user).random() < FRAUD_SHARE

    def click_probability(self, user: int, item: int, ts_ms: int | None = None) -> float:
        """The chance ``user`` clicks ``item`` on a view at ``ts_ms`` (``None``: the pre-drift truth)."""
        taste = self.taste(user, self.category(item), drifted=self.drifted("taste", ts_ms))
        z = -2.2 + 0.9 * taste + 0.8 * self.appeal(item) + 0.6 * self.activity(user)
        return 1.0 / (1.0 + math.exp(-z))


class Clickstream:
    """Endless seeded stream of view / click / purchase / chargeback events (dicts in the ingest event shape).

    Events later than ``now_ms`` (the rest of a shopping session, chargebacks) wait in a schedule and come
    out, with their own ``ts``, from the first ``next_event`` called at or after that time.
    """

    def __init__(
        self,
        world: World,
        seed: int | None = None,
        *,
        chargebacks: bool = True,
        chargeback_delay_ms: int = CHARGEBACK_DELAY_MS,
    ) -> None:
        if chargeback_delay_ms < 0:
            raise ValueError("chargeback_delay_ms must not be negative")
        self.world = world
        self.rng = random.Random(world.seed if seed is None else seed)  # noqa: S311
        self.chargebacks = chargebacks
        self.chargeback_delay_ms = chargeback_delay_ms
        # popular items are viewed more: Zipf-like weights
        self._item_weights = [1.0 / (i + 1) ** 0.8 for i in range(world.items)]
        self._pending: list[dict[str, Any]] = []
        self._scheduled: list[tuple[int, int, dict[str, Any]]] = []  # heap of (ts, seq, event)
        self._seq = 0
        self.n = 0

    def _schedule(self, event: dict[str, Any]) -> None:
        self._seq += 1
        heapq.heappush(self._scheduled, (event["ts"], self._seq, event))

    def _purchases(self, user: int, item: int, now_ms: int) -> None:
        w = self.world
        fraud = w.fraudster(user)
        for dt, amount in shopping_session(self.rng, fraud, drifted=w.drifted("fraud", now_ms)):
            purchase = {"event_id": self._event_id(), "type": "purchase", "user_id": w.user_id(user),
                        "item_id": w.item_id(item), "ts": now_ms + dt, "properties": {"amount": amount}}  # fmt: skip
            self._schedule(purchase)
            if fraud and self.chargebacks:
                self._schedule({"event_id": self._event_id(), "type": "chargeback", "user_id": w.user_id(user),
                                "item_id": w.item_id(item), "ts": now_ms + dt + self.chargeback_delay_ms,
                                "properties": {"purchase_id": purchase["event_id"]}})  # fmt: skip

    def _event_id(self) -> str:
        self.n += 1
        return f"sim-{self.world.seed}-{self.rng.getrandbits(48):012x}-{self.n}"

    def next_event(self, now_ms: int) -> dict[str, Any]:
        if self._pending:
            return self._pending.pop()
        if self._scheduled and self._scheduled[0][0] <= now_ms:
            return heapq.heappop(self._scheduled)[2]
        w = self.world
        user = self.rng.randrange(w.users)
        item = self.rng.choices(range(w.items), weights=self._item_weights)[0]
        base = {"user_id": w.user_id(user), "item_id": w.item_id(item), "ts": now_ms}
        if self.rng.random() < w.click_probability(user, item, now_ms):
            self._pending.append({"event_id": self._event_id(), "type": "click", **base})
            if self.rng.random() < SESSION_AFTER_CLICK[w.fraudster(user)]:
                self._purchases(user, item, now_ms)  # the first one is due now: it follows the click
        return {"event_id": self._event_id(), "type": "view", **base}

    def batch(self, n: int, now_ms: int) -> list[dict[str, Any]]:
        return [self.next_event(now_ms) for _ in range(n)]


def due(rate: float, tick_s: float, tick: int) -> int:
    """Events due in total after ``tick`` ticks: the running total tracks ``rate`` exactly (no drift)."""
    return math.floor(rate * tick_s * tick + 1e-9)


def tick_sizes(rate: float, tick_s: float, ticks: int) -> list[int]:
    """How many events each of the first ``ticks`` ticks sends."""
    return [due(rate, tick_s, t) - due(rate, tick_s, t - 1) for t in range(1, ticks + 1)]
