"""Property-based fuzzing of every route of each service's OpenAPI document (schemathesis) against the four
services running under uvicorn on loopback ports, on the real broker and redis-server.

Each operation gets schemathesis' examples and fuzzing phases (valid and invalid requests) with a fixed seed
and derandomized generation (reproducible in CI), a modest number of examples, and a per-request timeout (a
hang fails the test). Every response is checked: no 5xx (a 503 would need a real dependency problem, and
there is none here), the status, content type, headers and body conform to what the document declares, data
the schema rejects is refused with a 4xx, and valid data with a valid key is not refused for auth.
Requests carry an admin key (RTML_API_KEYS is set), so the fuzzer gets past auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from rtml.cli.serve import Service, create_service_app
from rtml.core.kafka import create_topics
from rtml.core.settings import Settings
from rtml.serving.registry import MODEL_NAME
from rtml.serving.routes import RolloutRequest
from tests.helpers import free_port, served
from tests.integration.test_auth_routes import ADMIN, API_KEYS, tiny_onnx

pytestmark = [
    pytest.mark.integration,
    # The services run in this process (a thread of their own); their libraries' use of the global `random`
    # module while hypothesis draws a case looks to hypothesis like a strategy using it. The cases themselves
    # are drawn from hypothesis' own seeded generator.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
# Modest for CI; RTML_FUZZ_EXAMPLES=200 RTML_FUZZ_COVERAGE=1 for a deeper hunt by hand (not reproducible
# across versions of schemathesis, nor fast).
MAX_EXAMPLES = int(os.environ.get("RTML_FUZZ_EXAMPLES", "15"))
COVERAGE_PHASE = os.environ.get("RTML_FUZZ_COVERAGE") == "1"
REQUEST_TIMEOUT_S = 10.0  # a request that takes this long is a hang: the services answer in milliseconds
AUTH = {"Authorization": f"Bearer {ADMIN}"}

CONFIG = SchemathesisConfig.from_dict({
    "seed": 20261129,
    "request-timeout": REQUEST_TIMEOUT_S,
    # 413 is the contract's answer to too much (a batch over 10,000 events), a rejection like any 4xx
    "checks": {"negative_data_rejection": {"expected-statuses": [
        "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]}},
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {
        "coverage": {"enabled": COVERAGE_PHASE},
        "stateful": {"enabled": False},
        # no learning from the server's answers: the cases depend on the seed alone
        "examples": {"extra-data-sources": {"responses": False}},
        "fuzzing": {"extra-data-sources": {"responses": False}, "error-feedback": {"enabled": False}},
    },
})  # fmt: skip


def _schema(service: str) -> Any:
    """The document the service publishes at /openapi.json (building it needs no broker nor Redis)."""
    app = create_service_app(Service(service), Settings(api_keys=API_KEYS))
    return schemathesis.openapi.from_dict(app.openapi(), config=CONFIG)


INGEST, FEATURES, SERVING, FEEDBACK = (_schema(s) for s in ("ingest", "features", "serving", "feedback"))


@pytest.fixture(scope="module")
def platform(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The four services under uvicorn, in one event loop on a thread of their own (schemathesis' calls are
    synchronous), with RTML_API_KEYS set and a live model; yields each one's base URL. Module-scoped: the
    settings are built like ``make_settings`` (a private topic and key prefix) since that one is per test."""
    unique = uuid.uuid4().hex[:10]
    s = Settings(
        kafka={"bootstrap": kafka_bootstrap, "partitions": 2},
        redis={"url": redis_url, "key_prefix": f"t{unique}:"},
        topic_prefix=f"t{unique}.",
        config=ROOT / "services" / "rtml" / "demo" / "rtml.yaml",
        examples_dir=tmp_path_factory.mktemp("examples"),
        api_keys=API_KEYS,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-services", daemon=True)
    thread.start()
    stack = contextlib.AsyncExitStack()

    async def start() -> dict[str, str]:
        await create_topics(s)
        urls = {}
        for name in Service:
            urls[name.value] = await stack.enter_async_context(served(create_service_app(name, s), free_port()))
        async with httpx.AsyncClient(base_url=urls["serving"], headers=AUTH) as client:
            up = await client.post("/v1/models/ctr/versions?promote=true", content=tiny_onnx())
            assert up.status_code == 201, up.text
        return urls

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=120)
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


# What a schema cannot say: an upload's bytes must be a loadable ONNX model whose input fits its features (and
# ``metadata`` a JSON object), so schema-valid uploads are rightly refused (422) and that check cannot apply.
# A rollout's ``share`` applies to stage canary only (a rule across two fields).
SCHEMA_CANNOT_SAY = {
    "POST /v1/models/{name}/versions": [positive_data_acceptance],
    "POST /v1/models/{name}/rollout": [positive_data_acceptance],
}


def _too_far_ahead(body: Any) -> bool:
    """Whether a generated event or outcome has a ``ts`` over 5 minutes ahead of now: the contract refuses it
    (422), and a schema cannot say "relative to the clock"."""
    from rtml.core.schemas import parse_ts
    from rtml.core.timeutil import now_ms

    items = body.get("events", [body]) if isinstance(body, dict) else []
    for item in items if isinstance(items, list) else []:
        ts = item.get("ts") if isinstance(item, dict) else None
        try:
            if ts is not None and parse_ts(ts) > now_ms() + 300_000:
                return True
        except ValueError:
            pass
    return False


def _check(case: Any, base_url: str) -> None:
    excluded = list(SCHEMA_CANNOT_SAY.get(f"{case.method.upper()} {case.path}", []))
    if _too_far_ahead(case.body):
        excluded.append(positive_data_acceptance)
    case.call_and_validate(base_url=base_url, headers=AUTH, excluded_checks=excluded, timeout=REQUEST_TIMEOUT_S)


@pytest.mark.slow  # with the services' start, the four take ~22 s
@INGEST.parametrize()
def test_fuzz_ingest(case: Any, platform: dict[str, str]) -> None:
    _check(case, platform["ingest"])


@pytest.mark.slow  # with the services' start, the four take ~22 s
@FEATURES.parametrize()
def test_fuzz_features(case: Any, platform: dict[str, str]) -> None:
    _check(case, platform["features"])


@pytest.mark.slow  # with the services' start, the four take ~22 s
@SERVING.parametrize()
def test_fuzz_serving(case: Any, platform: dict[str, str]) -> None:
    _check(case, platform["serving"])


@pytest.mark.slow  # with the services' start, the four take ~22 s
@FEEDBACK.parametrize()
def test_fuzz_feedback(case: Any, platform: dict[str, str]) -> None:
    _check(case, platform["feedback"])


# --- What the fuzzer found, each as a plain regression test -------------------------------------------------


def _openapi(service: str) -> dict[str, Any]:
    doc: dict[str, Any] = create_service_app(Service(service), Settings(api_keys=API_KEYS)).openapi()
    return doc


def _schema_accepts(doc: dict[str, Any], path: str, method: str, body: Any) -> bool:
    """Whether ``body`` validates against the operation's published JSON request body schema."""
    import jsonschema

    schema = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**schema, "components": doc["components"]})
    return validator.is_valid(body)


@pytest.mark.parametrize(
    ("service", "method", "path", "allow"),
    [("ingest", "TRACE", "/v1/events", "POST"), ("serving", "OPTIONS", "/v1/models/ctr/rollout", "DELETE, GET, POST"),
     ("serving", "PUT", "/v1/predict", "POST"), ("feedback", "PATCH", "/v1/models/ctr/quality", "GET")],
)  # fmt: skip
async def test_405_names_every_method_of_the_path(service: str, method: str, path: str, allow: str) -> None:
    """Found by the fuzzer: a 405 came without ``Allow`` (RFC 9110), then with only the first route's method
    where a path has several (one FastAPI route per method)."""
    app = create_service_app(Service(service), Settings(api_keys=API_KEYS))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        resp = await client.request(method, path, headers=AUTH)
    assert resp.status_code == 405, resp.text
    assert resp.headers.get("allow") == allow
    assert resp.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("service", ["ingest", "features", "serving", "feedback"])
def test_openapi_documents_the_error_shape_of_every_v1_operation(service: str) -> None:
    """Found by the fuzzer: the errors rtml answers (400, 401, 403, 413, ...) were undocumented and the 422
    documented was FastAPI's ``{"detail": ...}``, which rtml never sends. Every /v1 operation now documents the
    contract's ``{"error": {"code", "message"}}`` for each, with ``Retry-After`` on 503 and
    ``WWW-Authenticate`` on 401."""
    doc = _openapi(service)
    error = {"$ref": "#/components/schemas/Error"}
    assert doc["components"]["schemas"]["Error"]["required"] == ["error"]
    for path, ops in doc["paths"].items():
        if not path.startswith("/v1"):
            continue
        for method, op in ops.items():
            expected = {"401", "403", "404", "422", "503"} | ({"400", "413"} if "requestBody" in op else set())
            assert expected <= set(op["responses"]), (method, path, sorted(op["responses"]))
            for code in expected:
                assert op["responses"][code]["content"]["application/json"]["schema"] == error, (method, path, code)
            assert "Retry-After" in op["responses"]["503"]["headers"]
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"]


async def test_model_routes_publish_and_enforce_the_model_name_rule(make_settings: Any) -> None:
    """Found by the fuzzer: a model name the registry refuses was schema-valid (any string). The path
    parameter now carries the registry's pattern, and a name outside it is a 422 naming ``path.name``."""
    doc = _openapi("serving")
    for path, ops in doc["paths"].items():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "name" and param["in"] == "path":
                    assert param["schema"]["pattern"] == MODEL_NAME.pattern, path
    app = create_service_app(Service.serving, make_settings(api_keys=API_KEYS))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        bad = [("POST", "/v1/models/bad%20name!/rollback"), ("GET", "/v1/models/-x/rollout"),
               ("DELETE", "/v1/models/%C3%A9/rollout"), ("POST", f"/v1/models/{'m' * 65}/versions")]  # fmt: skip
        for method, path in bad:
            resp = await client.request(method, path, headers=AUTH)
            assert resp.status_code == 422, (method, path, resp.text)
            assert [d["field"] for d in resp.json()["error"]["details"]] == ["path.name"], resp.text


def test_rollout_share_bounds_and_upload_body_are_published() -> None:
    """Found by the fuzzer: the rollout ``share`` bounds were written as ``ge``/``le`` keys JSON Schema does not
    know (so a negative share was schema-valid), and the upload's body (the ONNX bytes) was not declared."""
    doc = _openapi("serving")
    share = doc["components"]["schemas"]["RolloutRequest"]["properties"]["share"]
    assert (share["type"], share["minimum"], share["maximum"]) == ("number", 0.0, 1.0)
    for bad in (-0.1, 1.5, "0.5", True):
        assert not _schema_accepts(doc, "/v1/models/{name}/rollout", "post", {"version": "1", "share": bad})
        with pytest.raises(ValueError):
            RolloutRequest.model_validate({"version": "1", "share": bad})
    assert RolloutRequest.model_validate({"version": "1", "share": 1}).share == 1.0  # an int is a number
    body = doc["paths"]["/v1/models/{name}/versions"]["post"]["requestBody"]
    assert body["required"] and "application/octet-stream" in body["content"]


def test_ingest_batch_schema_agrees_with_ingest() -> None:
    from rtml.core.errors import InvalidInput
    from rtml.ingest.validate import parse_events

    body = {"events": [{"type": "click", "user_id": "u1"}], "note": "x"}
    try:
        parse_events(body, now=0, max_future_ms=300_000, max_events=10_000)
        accepted = True
    except InvalidInput:
        accepted = False
    assert _schema_accepts(_openapi("ingest"), "/v1/events", "post", body) == accepted


def test_published_ts_schema_accepts_what_the_contract_does() -> None:
    from rtml.core.schemas import OutcomeIn

    body = {"prediction_id": "p1", "label": 1, "ts": "2026-01-31T12:00:00Z"}
    OutcomeIn.model_validate(body)  # the contract's RFC 3339 form is accepted...
    assert _schema_accepts(_openapi("feedback"), "/v1/outcomes", "post", body)  # ...so the schema must say so
