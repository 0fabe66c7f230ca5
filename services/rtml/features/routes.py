"""Read API of the online feature store."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from rtml.core.app import require
from rtml.core.timeutil import now_ms
from rtml.features.store import FeatureRow, FeatureStore, FeatureValue

router = APIRouter(prefix="/v1", tags=["features"])


class FeatureVector(BaseModel):
    entity: str
    id: str
    as_of: int
    features: dict[str, FeatureValue]
    updated_at: int | None = Field(None, description="epoch ms of the newest update to these features")
    age_ms: int | None = Field(None, description="as_of - updated_at: how old the newest data is")


def _vector(entity: str, entity_id: str, at: int, row: FeatureRow) -> dict[str, Any]:
    age = None if row.updated_at is None else max(0, at - row.updated_at)
    return {"entity": entity, "id": entity_id, "as_of": at, "features": row.values,
            "updated_at": row.updated_at, "age_ms": age}  # fmt: skip


class BatchRequest(BaseModel):
    entity: str
    ids: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(min_length=1, max_length=1000)
    features: list[str] | None = None
    as_of: int | None = None


def _store(request: Request) -> FeatureStore:
    store: FeatureStore = request.app.state.store
    return store


@router.get("/features/{entity}/{entity_id}", response_model=FeatureVector, dependencies=[require("read")])
async def get_features(
    request: Request,
    entity: str,
    entity_id: str,
    features: Annotated[str | None, Query(description="comma-separated names; default all")] = None,
    as_of: Annotated[int | None, Query(description="epoch ms; default now")] = None,
) -> Any:
    """All (or the named) features of one entity at ``as_of``. Pair ids join keys with ``|``."""
    names = [n for n in features.split(",") if n] if features else None
    at = now_ms() if as_of is None else as_of
    [row] = await _store(request).read_rows([(entity, entity_id, names)], as_of=at)
    return _vector(entity, entity_id, at, row)


@router.post("/features:batch", response_model=list[FeatureVector], dependencies=[require("read")])
async def batch_features(request: Request, body: BatchRequest) -> Any:
    """Features of many entities of one kind, in one Redis round trip."""
    at = now_ms() if body.as_of is None else body.as_of
    rows = await _store(request).read_rows([(body.entity, i, body.features) for i in body.ids], as_of=at)
    return [_vector(body.entity, i, at, row) for i, row in zip(body.ids, rows, strict=True)]
