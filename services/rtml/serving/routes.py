"""Serving API: predict, recommend, and the model registry (list, upload, promote, rollback, rollouts)."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, WithJsonSchema, field_validator

from rtml.core.app import JSONBytes, require
from rtml.core.auth import ApiKeys, bearer_token
from rtml.core.errors import InvalidInput, NotFound
from rtml.core.kafka import Producer
from rtml.core.schemas import MAX_ID, Id
from rtml.core.values import FLOAT32_MAX, as_float
from rtml.serving.inference.live import LiveModels
from rtml.serving.predict import Predictor
from rtml.serving.registry import MODEL_NAME, ModelRegistry

router = APIRouter(prefix="/v1", tags=["serving"])

# The registry's rule for model names, published in the OpenAPI document (a name outside it is a 422 either way)
ModelName = Annotated[str, Path(pattern=MODEL_NAME.pattern, description="letters, digits, '_', '.', '-' (at most 64)")]
# an entity id as long as ingest accepts (a longer one can have no features), or a whole number
EntityValue = Annotated[StrictStr, Field(max_length=MAX_ID)] | StrictInt
EntityName = Annotated[str, Field(min_length=1, max_length=64)]
# A feature value the models can take (float32 inputs): the range is published in the OpenAPI document and
# checked by PredictRequest._finite, which says why in its 422
FeatureInput = Annotated[
    StrictFloat | StrictInt | None,
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}, {"type": "null"}]}),
]


def _str_entities(v: dict[str, str | int]) -> dict[str, str]:
    return {k: str(x) for k, x in v.items()}


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=64)] = "ctr"
    entities: dict[EntityName, EntityValue] = Field(default_factory=dict, max_length=32)
    features: dict[str, FeatureInput] = Field(default_factory=dict, max_length=1024)

    @field_validator("features")
    @classmethod
    def _finite(cls, v: dict[str, float | int | None]) -> dict[str, float | int | None]:
        # the models take float32: a value past its range would reach them as an infinity, so it is the
        # caller's mistake (422), not something to drop silently in favour of the default
        for key, val in v.items():
            if val is not None and as_float(val) is None:
                raise ValueError(
                    f"feature {key!r} must be a finite number or null (within float32 range, |x| <= 3.4e38)"
                )
        return v


class PredictResponse(BaseModel):
    prediction_id: str
    model: str
    version: str
    score: float
    degraded: bool


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=64)] = "ctr"
    user_id: Id
    candidates: list[Id] = Field(min_length=1, max_length=1000)
    k: int = Field(default=10, ge=1, le=1000)

    @field_validator("k", mode="before")
    @classmethod
    def _whole_number(cls, v: object) -> object:
        # strict like every other number of the API, except that 26.0 is an integer to JSON Schema (and so to
        # the OpenAPI document): a string or a boolean is refused, 26.5 by pydantic
        if isinstance(v, str | bool):
            raise ValueError("k must be a whole number")
        return v


class RankedItem(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    prediction_id: str
    items: list[RankedItem]
    model: str
    version: str
    degraded: bool


class PromoteRequest(BaseModel):
    version: Annotated[str, Field(min_length=1, max_length=32)] | StrictInt


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Annotated[str, Field(min_length=1, max_length=32)] | StrictInt
    stage: Literal["shadow", "canary"] = "shadow"
    # strict: a number (an int too), never a string or a bool; as one type so the bounds reach the schema
    share: Annotated[float, Field(ge=0.0, le=1.0, strict=True)] = 0.0
    replace: bool = False


def _predictor(request: Request) -> Predictor:
    p: Predictor = request.app.state.predictor
    return p


def _registry(request: Request) -> ModelRegistry:
    r: ModelRegistry = request.app.state.registry
    return r


async def answer_predict(predictor: Predictor, body: PredictRequest, deadline: float | None) -> dict[str, Any]:
    s = await predictor.predict(body.model, _str_entities(body.entities), body.features, deadline)
    return {"prediction_id": s.prediction_id, "model": s.model, "version": s.version, "score": s.scores[0],
            "degraded": s.degraded}  # fmt: skip


async def answer_recommend(predictor: Predictor, body: RecommendRequest, deadline: float | None) -> dict[str, Any]:
    s, top = await predictor.recommend(body.model, body.user_id, body.candidates, body.k, deadline)
    return {"prediction_id": s.prediction_id, "items": [{"item_id": i, "score": sc} for i, sc in top],
            "model": s.model, "version": s.version, "degraded": s.degraded}  # fmt: skip


# In the serving app, rtml.serving.fastpath answers these two before FastAPI routes anything (same models,
# same answer functions, plus the per-request deadline and shedding); they are declared here for the OpenAPI
# schema and work as plain routes wherever the router is mounted without it.
@router.post("/predict", response_model=PredictResponse, dependencies=[require("predict")])
async def predict(request: Request, body: PredictRequest) -> Any:
    """Score one set of entities. Request ``features`` override stored ones; missing ones take the model's
    defaults (else 0.0). ``degraded`` is true when the feature store could not be read, or not before the
    request's deadline (``X-Request-Timeout-Ms``, default ``RTML_PREDICT_TIMEOUT_MS``). 503 with Retry-After
    when more than ``RTML_PREDICT_MAX_IN_FLIGHT`` requests are in flight or, with ``RTML_MAX_LOOP_LAG_MS``
    set, more than the process takes while it runs that far behind on its own work."""
    return JSONBytes(await answer_predict(_predictor(request), body, None))


@router.post("/recommend", response_model=RecommendResponse, dependencies=[require("predict")])
async def recommend(request: Request, body: RecommendRequest) -> Any:
    """Rank ``candidates`` for ``user_id`` and return the top ``k`` (one feature read, one ONNX call);
    deadline and shedding as for predict."""
    return JSONBytes(await answer_recommend(_predictor(request), body, None))


@router.get("/models", dependencies=[require("read")])
async def list_models(request: Request) -> Any:
    """Every model (from the config and the registry), its versions, the live one, and the one this replica
    serves."""
    live: LiveModels = request.app.state.live
    models = await _registry(request).describe(live.config_models)
    for m in models:
        served = live.served.get(m["name"])
        m["serving_version"] = served.live.version if served else None
        m["serving_rollout"] = _serving_rollout(live, m["name"])
    return JSONBytes({"models": models})


def _serving_rollout(live: LiveModels, name: str) -> dict[str, Any] | None:
    """What this replica does of the rollout: the other version it scores and its stage (None: none loaded,
    e.g. no rollout or its version failed to load)."""
    served = live.served.get(name)
    if served is None or served.other is None:
        return None
    return {"version": served.other.version, "stage": served.stage, "share": served.share, "id": served.rollout_id}


_ONNX_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the ONNX model's bytes",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post("/models/{name}/versions", status_code=201, dependencies=[require("admin")], openapi_extra=_ONNX_BODY)
async def upload_version(
    request: Request,
    name: ModelName,
    metadata: Annotated[str | None, Query(description='JSON object, e.g. {"features": ["a", "b"]}')] = None,
    promote: Annotated[bool, Query(description="also make it live")] = False,
) -> Any:
    """Register a new version from raw ONNX bytes (the request body). For example::

        curl -X POST --data-binary @model.onnx -H 'Content-Type: application/octet-stream' \\
          'http://127.0.0.1:8003/v1/models/ctr/versions?promote=true&metadata={"features":["a","b"]}'

    ``metadata`` (URL-encoded JSON) needs ``features`` (the ONNX input order) unless the model is in the
    platform config, whose features and defaults are then used; optional ``defaults`` (feature -> finite
    number), ``task``, ``metrics`` (name -> finite number). 422 naming the field when the metadata does not
    validate, when onnxruntime cannot load the bytes or the input does not match the features; 413 over the
    size cap; pickles are never accepted. The server records ``created_at``, ``created_by`` and a sha256.
    """
    meta: dict[str, Any] = {}
    if metadata:
        try:
            meta = orjson.loads(metadata)
        except orjson.JSONDecodeError:
            raise InvalidInput("metadata must be a JSON object") from None
        if not isinstance(meta, dict):
            raise InvalidInput("metadata must be a JSON object")
    body = await request.body()
    registry = _registry(request)
    version = await registry.register(name, body, meta, request.app.state.config, _caller(request))
    if promote:
        await _promote(request, name, version)
    return JSONBytes({"model": name, "version": version, "live": promote}, status_code=201)


def _caller(request: Request) -> str | None:
    """Who uploads: the API key's fingerprint (never the key) when keys are on; else None (the metadata's
    own ``created_by``, else "unknown")."""
    keys: ApiKeys | None = getattr(request.app.state, "api_keys", None)
    token = bearer_token(request.headers.get("authorization"))
    if keys is None or not keys.enabled or token is None:
        return None
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:12]
    return f"api-key:{fingerprint}"


async def _promote(request: Request, name: str, version: str) -> None:
    producer: Producer = request.app.state.producer
    await _registry(request).promote(name, version, producer, by=_caller(request))
    live: LiveModels = request.app.state.live
    await live.refresh()  # this replica serves it now; the others within one poll interval


@router.post("/models/{name}/promote", dependencies=[require("admin")])
async def promote(request: Request, name: ModelName, body: PromoteRequest) -> Any:
    """Make ``version`` live: every replica serves it within one poll interval (this one at once)."""
    version = str(body.version)
    await _promote(request, name, version)
    return JSONBytes({"model": name, "version": version, "live": True})


@router.post("/models/{name}/rollback", dependencies=[require("admin")])
async def rollback(request: Request, name: ModelName) -> Any:
    """Make the previously live version live again (404 when there is none); announced like a promotion."""
    producer: Producer = request.app.state.producer
    version = await _registry(request).rollback(name, producer, by=_caller(request))
    live: LiveModels = request.app.state.live
    await live.refresh()
    return JSONBytes({"model": name, "version": version, "live": True})


async def _known(request: Request, name: str) -> None:
    live: LiveModels = request.app.state.live
    if name not in await _registry(request).names(live.config_models):
        raise NotFound(f"unknown model {name!r}")


@router.get("/models/{name}/rollout", dependencies=[require("read")])
async def get_rollout(request: Request, name: ModelName) -> Any:
    """The model's running rollout (``{"rollout": null}`` when none): the candidate (stage ``shadow`` or
    ``canary``, with the canary ``share`` of users) or the guard (the previous live version, kept in shadow
    after a promotion), its ``id``, ``since`` (epoch ms) and ``by``; and what this replica serves of it."""
    await _known(request, name)
    rollout = await _registry(request).rollout(name)
    live: LiveModels = request.app.state.live
    return JSONBytes({"model": name, "rollout": rollout.to_dict() if rollout else None,
                      "serving": _serving_rollout(live, name)})  # fmt: skip


@router.post(
    "/models/{name}/rollout",
    dependencies=[require("admin")],
    responses={409: {"description": "another rollout runs, or the model has no live version"}},
)
async def start_rollout(request: Request, name: ModelName, body: RolloutRequest) -> Any:
    """Put a candidate version in ``shadow`` (scored and logged, never returned) or ``canary`` (answers
    ``share`` of users, sticky per user). The same candidate again changes its stage and share (same id).
    404 unknown version; 422 the live version, or a share with stage shadow; 409 another rollout runs (send
    ``"replace": true`` to end it in the same step) or the model has no live version."""
    producer: Producer = request.app.state.producer
    rollout = await _registry(request).start_rollout(
        name, str(body.version), body.stage, float(body.share), _caller(request), replace=body.replace,
        producer=producer,
    )  # fmt: skip
    live: LiveModels = request.app.state.live
    await live.refresh()  # this replica scores it now; the others on the announcement or the next poll
    return JSONBytes({"model": name, "rollout": rollout.to_dict()})


@router.delete("/models/{name}/rollout", dependencies=[require("admin")])
async def end_rollout(request: Request, name: ModelName) -> Any:
    """End the running rollout (the live version does not change); 404 when none runs."""
    producer: Producer = request.app.state.producer
    ended = await _registry(request).end_rollout(name, None, _caller(request), producer)
    if ended is None:
        await _known(request, name)
        raise NotFound(f"model {name!r} has no rollout running")
    live: LiveModels = request.app.state.live
    await live.refresh()
    return JSONBytes({"model": name, "ended": ended.to_dict()})
