"""A small synthetic world (pure, seeded): users with tastes, items with categories and appeal.

The click probability is the ground truth: it grows with the user's taste for the item's category, the
item's appeal and the user's activity, so the demo features (recent clicks, item CTR, variety) carry signal.

Purchases follow a second ground truth, for the ``fraud`` model: a small share of users are fraudsters
(``World.fraudster``). A purchase starts a shopping session (``shopping_session``): an honest user mostly
buys once, for a modest amount (now and then a big one); a fraudster buys in bursts seconds apart, mostly
of high amounts (sometimes a card test of small ones). Every fraudulent purchase is charged back later
(a ``chargeback`` event).
``rtml train --model fraud`` learns from sessions drawn by the same functions (``serving/train.py``).
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
CHARGEBACK_DELAY_MS = 60_000  # a fraudulent purchase is charged back this long after it


def shopping_session(rng: random.Random, fraud: bool) -> list[tuple[int, float]]:
    """One shopping session: ``[(ms after its first purchase, amount)]``, in time order.

    Honest: mostly one purchase (median 20), sometimes a second or third one, seconds to half an hour
    apart, and now and then a big-ticket session (median 120). Fraud: a burst of 1-6 purchases seconds
    apart for high amounts (median 100), or a card test: the same burst for small amounts (median 5).
    """
    if fraud:
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


def purchase_history(rng: random.Random, fraud: bool, span_ms: int) -> list[tuple[int, float]]:
    """Sessions at exponential gaps over ``[0, span_ms)``: ``[(ts ms, amount)]`` in time order."""
    out: list[tuple[int, float]] = []
    t = int(rng.expovariate(1.0 / SESSION_GAP_MEAN_MS[fraud]))
    while t < span_ms:
        session = shopping_session(rng, fraud)
        out.extend((t + dt, amount) for dt, amount in session if t + dt < span_ms)
        t += session[-1][0] + int(rng.expovariate(1.0 / SESSION_GAP_MEAN_MS[fraud]))
    return out


@dataclass(frozen=True, slots=True)
class World:
    users: int
    items: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 1:
            raise ValueError("users and items must be at least 1")

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

    def taste(self, user: int, category: int) -> float:
        return self._rng("taste", user, category).gauss(0.0, 1.0)

    def activity(self, user: int) -> float:
        return self._rng("act", user).gauss(0.0, 0.7)

    def fraudster(self, user: int) -> bool:
        return self._rng("fraud", user).random() < FRAUD_SHARE

    def click_probability(self, user: int, item: int) -> float:
        z = -2.2 + 0.9 * self.taste(user, self.category(item)) + 0.8 * self.appeal(item) + 0.6 * self.activity(user)
        return 1.0 / (1.0 + math.exp(-z))


class Clickstream:
    """Endless seeded stream of view / click / purchase / chargeback events (dicts in the ingest event shape).

    Events later than ``now_ms`` (the rest of a shopping session, chargebacks) wait in a schedule and come
    out, with their own ``ts``, from the first ``next_event`` called at or after that time.
    """

    def __init__(self, world: World, seed: int | None = None, *, chargebacks: bool = True) -> None:
        self.world = world
        self.rng = random.Random(world.seed if seed is None else seed)  # noqa: S311
        self.chargebacks = chargebacks
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
        for dt, amount in shopping_session(self.rng, fraud):
            purchase = {"event_id": self._event_id(), "type": "purchase", "user_id": w.user_id(user),
                        "item_id": w.item_id(item), "ts": now_ms + dt, "properties": {"amount": amount}}  # fmt: skip
            self._schedule(purchase)
            if fraud and self.chargebacks:
                self._schedule({"event_id": self._event_id(), "type": "chargeback", "user_id": w.user_id(user),
                                "item_id": w.item_id(item), "ts": now_ms + dt + CHARGEBACK_DELAY_MS,
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
        if self.rng.random() < w.click_probability(user, item):
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
