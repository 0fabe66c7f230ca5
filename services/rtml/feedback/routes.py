"""HTTP routes of feedback: accept outcomes, report online model quality and the learning loop's decisions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from rtml.core.app import SettingsDep, require
from rtml.core.config import load_config
from rtml.core.errors import InvalidInput, NotFound
from rtml.core.kafka import Producer
from rtml.core.redis import Keys, Redis
from rtml.core.schemas import Outcome, OutcomeIn
from rtml.core.settings import Settings
from rtml.core.timeutil import now_ms
from rtml.feedback import quality
from rtml.feedback.learning import Learning
from rtml.serving.registry import ModelRegistry

router = APIRouter(prefix="/v1")


def to_outcome(body: OutcomeIn, received_at: int, max_future_ms: int) -> Outcome:
    """The outcome as published: ``ts`` defaults to receive time, the label is a float."""
    ts = received_at if body.ts is None else body.ts
    if ts > received_at + max_future_ms:
        raise InvalidInput(
            "outcome does not validate",
            details=[{"field": "ts", "message": f"ts is more than {max_future_ms // 1000} s in the future"}],
        )
    return Outcome(
        prediction_id=body.prediction_id,
        label=float(body.label),
        item_id=body.item_id,
        ts=ts,
        received_at=received_at,
    )


@router.post("/outcomes", status_code=202, dependencies=[require("ingest")])
async def post_outcome(body: OutcomeIn, request: Request, settings: SettingsDep) -> dict[str, int]:
    """Publish one outcome on ``outcomes`` (keyed by prediction_id); 202 once the broker acknowledged it."""
    outcome = to_outcome(body, now_ms(), settings.max_future_s * 1000)
    producer: Producer = request.app.state.producer
    await producer.send("outcomes", outcome, key=outcome.prediction_id.encode())
    return {"accepted": 1}


@router.get("/models/{name}/quality", dependencies=[require("read")])
async def get_quality(
    name: Annotated[str, Path(min_length=1, max_length=256)], request: Request, settings: SettingsDep
) -> quality.ModelQuality:
    """Online quality per version over the model's quality window (``models.<name>.quality.window``): count,
    positive rate, mean score, log loss, AUC, calibration error (ECE) and drift against training (PSI of the
    score and of each input; null without a training reference). A model with no label in the window has an
    empty ``versions`` list; a model neither configured nor registered is a 404."""
    store = quality_store(request, settings)
    await require_known(store, name)
    return await store.report(name)


async def require_known(store: quality.QualityStore, name: str) -> None:
    """404 for a model that is neither in the platform config nor in the registry (a typo must not look like
    a model with no labels yet)."""
    if store.config is not None and name in store.config.models:
        return
    if name not in await ModelRegistry(store.redis, store.keys).names():
        raise NotFound(f"unknown model {name!r}")


def quality_store(request: Request, settings: Settings) -> quality.QualityStore:
    """The app's ``QualityStore`` (``app.state.quality`` when the app set one up), else one made on first use."""
    store: quality.QualityStore | None = getattr(request.app.state, "quality", None)
    if store is None:
        redis: Redis = request.app.state.redis
        config = load_config(settings.platform_config_path())
        store = request.app.state.quality = quality.QualityStore(redis, Keys(settings.redis.key_prefix), config)
    return store


@router.get("/models/{name}/decisions", dependencies=[require("read")])
async def get_decisions(
    name: Annotated[str, Path(min_length=1, max_length=256)],
    request: Request,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> dict[str, Any]:
    """The learning loop's decisions about the model, newest first: retrainings (with the trigger and the
    holdout numbers) and rollout steps (shadow → canary → promote / reject, guard → keep / rollback) with
    the labels and metric values each one used. Empty for a model nothing was decided about yet; a model
    neither configured nor registered is a 404."""
    await require_known(quality_store(request, request.app.state.settings), name)
    learning: Learning = request.app.state.learning
    return {"model": name, "decisions": await learning.decisions(name, limit)}
