"""Model uploads may be as large as the registry accepts (64 MiB), past the 10 MiB limit of other bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rtml.core.settings import Settings
from rtml.serving.app import create_app
from rtml.serving.registry import MAX_MODEL_BYTES
from tests.helpers import error_of, running

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


async def chunked(total: int, size: int = MiB) -> AsyncIterator[bytes]:
    block = b"\0" * size
    sent = 0
    while sent < total:
        yield block[: total - sent]
        sent += size


async def test_uploads_take_the_model_cap_and_other_bodies_the_global_limit(settings: Settings) -> None:
    assert settings.max_body_bytes < 11 * MiB < MAX_MODEL_BYTES < 65 * MiB
    async with running(create_app(settings)) as client:
        # past the body limit: onnxruntime is what refuses these bytes (422), not the 413 of the limit
        resp = await client.post("/v1/models/ctr/versions", content=b"\0" * (11 * MiB))
        assert resp.status_code == 422, resp.text
        assert error_of(resp)["code"] == "invalid"
        resp = await client.post("/v1/models/ctr/versions", content=chunked(11 * MiB))
        assert resp.status_code == 422, resp.text
        # over the model cap: 413 by Content-Length and while streaming a chunked body
        resp = await client.post("/v1/models/ctr/versions", content=b"\0" * (65 * MiB))
        assert resp.status_code == 413 and error_of(resp)["code"] == "payload_too_large"
        resp = await client.post("/v1/models/ctr/versions", content=chunked(65 * MiB))
        assert resp.status_code == 413 and error_of(resp)["code"] == "payload_too_large"
        # every other route keeps the global limit
        resp = await client.post("/v1/predict", content=b"\0" * (11 * MiB))
        assert resp.status_code == 413
        resp = await client.post("/v1/models/ctr/promote", content=b"\0" * (11 * MiB))
        assert resp.status_code == 413
