"""A small synthetic world (pure, seeded): users with tastes, items with categories and appeal.

The click probability is the ground truth: it grows with the user's taste for the item's category, the
item's appeal and the user's activity, so the demo features (recent clicks, item CTR, variety) carry signal.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

CATEGORIES = 8


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

    def click_probability(self, user: int, item: int) -> float:
        z = -2.2 + 0.9 * self.taste(user, self.category(item)) + 0.8 * self.appeal(item) + 0.6 * self.activity(user)
        return 1.0 / (1.0 + math.exp(-z))


class Clickstream:
    """Endless seeded stream of view / click / purchase events (dicts in the ingest event shape)."""

    def __init__(self, world: World, seed: int | None = None) -> None:
        self.world = world
        self.rng = random.Random(world.seed if seed is None else seed)  # noqa: S311
        # popular items are viewed more: Zipf-like weights
        self._item_weights = [1.0 / (i + 1) ** 0.8 for i in range(world.items)]
        self._pending: list[dict[str, Any]] = []
        self.n = 0

    def _event_id(self) -> str:
        self.n += 1
        return f"sim-{self.world.seed}-{self.rng.getrandbits(48):012x}-{self.n}"

    def next_event(self, now_ms: int) -> dict[str, Any]:
        if self._pending:
            return self._pending.pop()
        w = self.world
        user = self.rng.randrange(w.users)
        item = self.rng.choices(range(w.items), weights=self._item_weights)[0]
        base = {"user_id": w.user_id(user), "item_id": w.item_id(item), "ts": now_ms}
        if self.rng.random() < w.click_probability(user, item):
            self._pending.append({"event_id": self._event_id(), "type": "click", **base})
            if self.rng.random() < 0.1:
                amount = round(math.exp(self.rng.gauss(3.0, 0.8)), 2)
                self._pending.insert(
                    0, {"event_id": self._event_id(), "type": "purchase", **base, "properties": {"amount": amount}}
                )
        return {"event_id": self._event_id(), "type": "view", **base}

    def batch(self, n: int, now_ms: int) -> list[dict[str, Any]]:
        return [self.next_event(now_ms) for _ in range(n)]


def due(rate: float, tick_s: float, tick: int) -> int:
    """Events due in total after ``tick`` ticks: the running total tracks ``rate`` exactly (no drift)."""
    return math.floor(rate * tick_s * tick + 1e-9)


def tick_sizes(rate: float, tick_s: float, ticks: int) -> list[int]:
    """How many events each of the first ``ticks`` ticks sends."""
    return [due(rate, tick_s, t) - due(rate, tick_s, t - 1) for t in range(1, ticks + 1)]
