"""The outcome simulator: asks serving for recommendations, then 'clicks' by the world's ground truth.

Each shown item gets an outcome (1 = clicked, 0 = not) on feedback, and each click also becomes a click
event on ingest, so features, predictions, joins and quality all move in ``rtml up --demo``.
"""

from __future__ import annotations

import asyncio
import logging
import random

import httpx

from rtml.core.timeutil import now_ms
from rtml.simulate.world import World

log = logging.getLogger(__name__)


async def run_outcomes(
    world: World,
    *,
    serving_url: str,
    feedback_url: str,
    ingest_url: str,
    rate: float,
    duration_s: float | None,
    seed: int = 0,
    candidates: int = 6,
    k: int = 3,
    stop: asyncio.Event | None = None,
) -> int:
    """Run ``rate`` recommendation rounds per second; returns the number of outcomes posted."""
    rng = random.Random(seed)  # noqa: S311 - simulation only
    loop = asyncio.get_running_loop()
    start = loop.time()
    posted = rounds = 0
    async with httpx.AsyncClient(timeout=5.0) as client:
        while not (stop is not None and stop.is_set()):
            if duration_s is not None and loop.time() - start >= duration_s:
                break
            rounds += 1
            user = rng.randrange(world.users)
            items = rng.sample(range(world.items), min(candidates, world.items))
            try:
                resp = await client.post(
                    f"{serving_url}/v1/recommend",
                    json={"user_id": world.user_id(user), "candidates": [world.item_id(i) for i in items], "k": k},
                )
                if resp.status_code != 200:
                    log.warning("recommend answered %s: %s", resp.status_code, resp.text[:200])
                else:
                    body = resp.json()
                    clicks = []
                    for shown in body["items"]:
                        item = int(shown["item_id"][1:])
                        label = 1 if rng.random() < world.click_probability(user, item) else 0
                        await client.post(
                            f"{feedback_url}/v1/outcomes",
                            json={"prediction_id": body["prediction_id"], "item_id": shown["item_id"], "label": label},
                        )
                        posted += 1
                        if label:
                            clicks.append({"type": "click", "user_id": world.user_id(user),
                                           "item_id": shown["item_id"], "ts": now_ms()})  # fmt: skip
                    if clicks:
                        await client.post(f"{ingest_url}/v1/events", json={"events": clicks})
            except httpx.HTTPError as exc:
                log.warning("outcome simulator: %r", exc)
            delay = start + rounds / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
    return posted
