"""The outcome simulator: asks serving for recommendations, then 'clicks' by the world's ground truth.

Each click becomes a click event on ingest, so features, predictions, label joins and quality all move in
``rtml up --demo``: the demo config derives ``ctr`` labels from those click events (its label rule).
Explicit outcomes (``POST /v1/outcomes``: 1 = clicked, 0 = not, for every shown item) are opt-in
(``post_outcomes``): with a label rule in place they would label the same predictions twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import httpx

from rtml.core.timeutil import now_ms
from rtml.simulate.world import World

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OutcomeRun:
    rounds: int = 0  # recommendation rounds asked for
    clicks: int = 0  # click events sent to ingest
    outcomes: int = 0  # explicit outcomes posted to feedback (``post_outcomes``)


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
    post_outcomes: bool = False,
    stop: asyncio.Event | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> OutcomeRun:
    """Run ``rate`` recommendation rounds per second; returns what was sent.

    Clicks follow the world's ground truth at the time of the round (so a drifting world drifts here too).
    """
    rng = random.Random(seed)  # noqa: S311 - simulation only
    loop = asyncio.get_running_loop()
    start = loop.time()
    done = OutcomeRun()
    async with httpx.AsyncClient(timeout=5.0, transport=transport) as client:
        while not (stop is not None and stop.is_set()):
            if duration_s is not None and loop.time() - start >= duration_s:
                break
            done.rounds += 1
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
                        label = 1 if rng.random() < world.click_probability(user, item, now_ms()) else 0
                        if post_outcomes:
                            await client.post(
                                f"{feedback_url}/v1/outcomes",
                                json={"prediction_id": body["prediction_id"], "item_id": shown["item_id"],
                                      "label": label},
                            )  # fmt: skip
                            done.outcomes += 1
                        if label:
                            clicks.append({"type": "click", "user_id": world.user_id(user),
                                           "item_id": shown["item_id"], "ts": now_ms()})  # fmt: skip
                    if clicks:
                        await client.post(f"{ingest_url}/v1/events", json={"events": clicks})
                        done.clicks += len(clicks)
            except httpx.HTTPError as exc:
                log.warning("outcome simulator: %r", exc)
            delay = start + done.rounds / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
    return done
