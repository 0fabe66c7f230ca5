"""The baseline that ``rtml bench predict|recommend`` measures rtml against, in the same run.

A plain FastAPI service written the obvious way: redis-py asyncio ``HGETALL`` of one hash (or one pipeline
of N hashes for recommend) and scikit-learn ``predict_proba`` on a small GradientBoostingClassifier trained
at start-up on synthetic data. No rtml code is imported, so it stays a fair "what you would write first".

The bench seeds the hashes under a scratch key prefix, starts this file as a subprocess on a free loopback
port, drives it with the same client and concurrency as rtml, stops it and deletes the keys. By hand:

    python benchmarks/baseline_app.py --port 8103 --redis-url redis://127.0.0.1:6379/0 \
        --prefix bench-x:base: --features 3

    POST /predict   {"user_id": "u1", "item_id": "t9"}            -> {"score": float}
    POST /recommend {"user_id": "u1", "candidates": [...], "k": 10} -> {"items": [{"item_id", "score"}]}

Hashes: ``{prefix}u{id}`` / ``{prefix}t{id}`` with fields ``f0`` .. ``f19`` (floats as strings); the model
reads ``f0`` .. ``f{features-1}``, a missing field reads 0.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sklearn.ensemble import GradientBoostingClassifier


class PredictBody(BaseModel):
    user_id: str
    item_id: str


class RecommendBody(BaseModel):
    user_id: str
    candidates: list[str]
    k: int = 10


def train(n_features: int, seed: int = 0) -> GradientBoostingClassifier:
    """The same kind and size of model as rtml's demo (80 trees of depth 3), on synthetic rows."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 2.0, size=(3000, n_features))
    logit = x @ rng.normal(0, 0.5, n_features) - 1.0
    y = (rng.random(3000) < 1 / (1 + np.exp(-logit))).astype(int)
    clf = GradientBoostingClassifier(n_estimators=80, max_depth=3, learning_rate=0.1, random_state=seed)
    clf.fit(x, y)
    return clf


def row(fields: dict[bytes, bytes], names: list[bytes]) -> list[float]:
    return [float(fields.get(n, 0.0)) for n in names]


def create_app(redis_url: str, prefix: str, n_features: int) -> FastAPI:
    model = train(n_features)
    names = [f"f{i}".encode() for i in range(n_features)]
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["redis"] = aioredis.Redis.from_url(redis_url)
        yield
        await state["redis"].aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(body: PredictBody) -> dict[str, float]:
        fields = await state["redis"].hgetall(f"{prefix}{body.user_id}")
        score = model.predict_proba(np.array([row(fields, names)]))[0, 1]
        return {"score": float(score)}

    @app.post("/recommend")
    async def recommend(body: RecommendBody) -> dict[str, list[dict[str, Any]]]:
        async with state["redis"].pipeline(transaction=False) as pipe:
            for item in body.candidates:
                pipe.hgetall(f"{prefix}{item}")
            hashes = await pipe.execute()
        scores = model.predict_proba(np.array([row(h, names) for h in hashes]))[:, 1]
        top = np.argsort(-scores)[: body.k]
        return {"items": [{"item_id": body.candidates[i], "score": float(scores[i])} for i in top]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True, help="key prefix of the seeded hashes")
    parser.add_argument("--features", type=int, default=3, help="model inputs (rtml's model's feature count)")
    args = parser.parse_args()
    app = create_app(args.redis_url, args.prefix, args.features)
    loop, http = "asyncio", "h11"
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        loop = "uvloop"
    with contextlib.suppress(ImportError):
        import httptools  # noqa: F401

        http = "httptools"
    uvicorn.run(app, host=args.host, port=args.port, loop=loop, http=http, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
