"""Python client for rtml: events, predictions, recommendations, outcomes, models, quality.

Blocking::

    from rtml.client import Client, Unavailable

    with Client("http://127.0.0.1", api_key="app-key") as rtml:      # ingest :8001 ... feedback :8004
        rtml.send_events([{"type": "view", "user_id": "u1", "item_id": "t9"}])   # event_id added, retried safely
        p = rtml.predict({"user_id": "u1", "item_id": "t9"}, deadline_ms=50, timeout=0.2)
        rtml.send_outcome(p.prediction_id, 1)
        top = rtml.recommend("u1", ["t1", "t2", "t9"], k=2).items
        with rtml.batcher(batch_size=500) as events:                  # background thread, bounded queue
            events.add({"type": "click", "user_id": "u1", "item_id": "t9"})

asyncio: ``AsyncClient`` has the same constructor and methods, awaited (``async with AsyncClient(...) as rtml:
await rtml.predict(...)``; ``rtml.batcher()`` runs a task).

Events get a client-side ``event_id`` when they have none, so a retried request counts once (the platform
dedups by ``event_id``). Requests are retried with exponential backoff and jitter on 429/502/503/504 and on
connection failures, honouring ``Retry-After``, within :class:`Retry`'s attempts and total time. Errors are
typed (:class:`RtmlError` and its subclasses, with ``status``, ``code``, ``message``).
"""

from rtml.client._async import AsyncClient, AsyncEventBatcher
from rtml.client._core import NO_RETRY, Retry, new_event_id
from rtml.client._sync import Client, EventBatcher
from rtml.client.errors import (
    BatcherError,
    Conflict,
    FieldError,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    RtmlError,
    Timeout,
    TransportError,
    Unauthorized,
    Unavailable,
)
from rtml.client.models import (
    Accepted,
    Decision,
    Features,
    ModelInfo,
    ModelVersion,
    Prediction,
    Promoted,
    Quality,
    RankedItem,
    Recommendation,
    Rollout,
    RolloutState,
    VersionQuality,
)

__all__ = [
    "NO_RETRY",
    "Accepted",
    "AsyncClient",
    "AsyncEventBatcher",
    "BatcherError",
    "Client",
    "Conflict",
    "Decision",
    "EventBatcher",
    "Features",
    "FieldError",
    "Forbidden",
    "InvalidRequest",
    "ModelInfo",
    "ModelVersion",
    "NotFound",
    "PayloadTooLarge",
    "Prediction",
    "Promoted",
    "Quality",
    "QueueFull",
    "RankedItem",
    "Recommendation",
    "Retry",
    "Rollout",
    "RolloutState",
    "RtmlError",
    "Timeout",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "VersionQuality",
    "new_event_id",
]
