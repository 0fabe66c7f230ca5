"""Scoped API keys (contract "Security") on every ``/v1`` route of every service, and keys never in logs.

The routes are enumerated from each app (``app.routes``), so a route added later is exercised here without
anyone listing it; ``ROUTE_SCOPES`` is the one place that says which scope each route needs, and a route
missing from it (or declaring another scope, or none) fails ``test_every_v1_route_declares_its_scope``.

Scopes, decided from what each route does:
- ``ingest``: what writes the platform's input streams (``POST /v1/events``, ``POST /v1/outcomes``);
- ``predict``: scoring (``POST /v1/predict``, ``POST /v1/recommend``; answered by serving's fast path, which
  checks the key itself);
- ``read``: every read of state (features, the model list, a rollout, online quality, the loop's decisions);
- ``admin``: every change of the model registry (upload, promote, rollback, start or end a rollout).
A key with ``admin`` may call every route (``ApiKeys.check``). ``/healthz``, ``/readyz``, ``/metrics``,
``/openapi.json`` and ``/docs`` stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from rtml.cli.serve import Service, create_service_app
from rtml.core.app import route_scope
from rtml.core.auth import ApiKeys
from rtml.core.errors import ConfigError
from rtml.core.kafka import create_topics
from rtml.core.settings import Settings
from tests.helpers import eventually, free_port, running

pytestmark = pytest.mark.integration

# Key values long and odd enough that finding one in a log cannot be a coincidence.
KEYS: dict[str, frozenset[str]] = {
    "sk-ingest-3f9c0a71d2e8": frozenset({"ingest"}),
    "sk-predict-8b1e44c0f7a9": frozenset({"predict"}),
    "sk-read-5d27a9e613b4": frozenset({"read"}),
    "sk-admin-c04f1b8e92d6": frozenset({"admin"}),
    "sk-app-71ae0d3c55f1": frozenset({"ingest", "read"}),
    "sk-web-2c9b7e1fa043": frozenset({"predict", "read"}),
}
API_KEYS = ",".join(f"{key}:{'+'.join(sorted(scopes))}" for key, scopes in KEYS.items())
UNKNOWN_KEY = "sk-unknown-0e6a5b29c4d7"
ADMIN = "sk-admin-c04f1b8e92d6"

ROUTE_SCOPES: dict[str, dict[tuple[str, str], str]] = {
    "ingest": {("POST", "/v1/events"): "ingest"},
    "features": {
        ("GET", "/v1/features/{entity}/{entity_id}"): "read",
        ("POST", "/v1/features:batch"): "read",
    },
    "serving": {
        ("POST", "/v1/predict"): "predict",
        ("POST", "/v1/recommend"): "predict",
        ("GET", "/v1/models"): "read",
        ("POST", "/v1/models/{name}/versions"): "admin",
        ("POST", "/v1/models/{name}/promote"): "admin",
        ("POST", "/v1/models/{name}/rollback"): "admin",
        ("GET", "/v1/models/{name}/rollout"): "read",
        ("POST", "/v1/models/{name}/rollout"): "admin",
        ("DELETE", "/v1/models/{name}/rollout"): "admin",
    },
    "feedback": {
        ("POST", "/v1/outcomes"): "ingest",
        ("GET", "/v1/models/{name}/quality"): "read",
        ("GET", "/v1/models/{name}/decisions"): "read",
    },
}
SERVICES = list(ROUTE_SCOPES)
OPEN_PATHS = ("/healthz", "/metrics", "/openapi.json", "/docs")
PATH_VALUES = {"name": "ctr", "entity": "user", "entity_id": "u1"}
BODIES: dict[tuple[str, str], Any] = {  # a request each route accepts, where one is easy to write
    ("POST", "/v1/predict"): {"entities": {"user_id": "u1", "item_id": "t1"}},
    ("POST", "/v1/recommend"): {"user_id": "u1", "candidates": ["t1", "t2"], "k": 1},
    ("POST", "/v1/events"): {"type": "click", "user_id": "u1", "item_id": "t1"},
    ("POST", "/v1/outcomes"): {"prediction_id": "p1", "label": 1},
    ("POST", "/v1/features:batch"): {"entity": "user", "ids": ["u1"]},
}


def v1_routes(app: FastAPI) -> list[tuple[str, str, APIRoute]]:
    """(method, path template, route) of every ``/v1`` route; a ``/v1`` route that is not an APIRoute (a mount,
    a plain Starlette route) would bypass ``require`` and fails here."""
    found = []
    for ctx in iter_route_contexts(app.routes):  # included routers flattened, their prefixes applied
        path = ctx.path or ""
        if not path.startswith("/v1"):
            continue
        route = ctx.original_route
        assert isinstance(route, APIRoute), f"{path} is a {type(route).__name__}: its auth cannot be checked"
        found += [(method, path, route) for method in sorted(ctx.methods or ())]
    return found


def url_of(path: str) -> str:
    for name, value in PATH_VALUES.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"no test value for a parameter of {path}: add it to PATH_VALUES"
    return path


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def allowed(key: str, scope: str) -> bool:
    return scope in KEYS[key] or "admin" in KEYS[key]


def tiny_onnx(n_features: int = 3) -> bytes:
    """A hand-built ONNX model (sigmoid of a weighted sum): loads in milliseconds, unlike a trained one."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.full((n_features, 1), 0.1, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["score"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.parametrize("service", SERVICES)
def test_every_v1_route_declares_its_scope(service: str, make_settings: Any) -> None:
    """Each ``/v1`` route needs the scope ``ROUTE_SCOPES`` gives it, declared on the route and published in
    the OpenAPI document; serving's fast-path routes are ``predict`` routes (the scope it checks)."""
    app = create_service_app(Service(service), make_settings(api_keys=API_KEYS))
    declared = {(method, path): route_scope(route) for method, path, route in v1_routes(app)}
    unscoped = sorted(k for k, scope in declared.items() if scope is None)
    assert not unscoped, f"/v1 routes without a scope (add dependencies=[require(...)]): {unscoped}"
    assert declared == ROUTE_SCOPES[service], "a /v1 route changed: decide its scope in ROUTE_SCOPES"
    published = {
        (method.upper(), path): op.get("security")
        for path, ops in app.openapi()["paths"].items()
        if path.startswith("/v1")
        for method, op in ops.items()
    }
    assert published == {k: [{"apiKey": [scope]}] for k, scope in ROUTE_SCOPES[service].items()}
    scheme = app.openapi()["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    fast = getattr(app, "fast", None)
    if service == "serving":
        assert fast is not None and set(fast.routes) == {"/v1/predict", "/v1/recommend"}
        assert all(ROUTE_SCOPES["serving"][("POST", path)] == "predict" for path in fast.routes)
    else:
        assert fast is None


async def _request(client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str],
                   raw: bytes | None = None) -> httpx.Response:  # fmt: skip
    kwargs: dict[str, Any] = {"headers": dict(headers)}
    if raw is not None:
        kwargs["content"] = raw
        kwargs["headers"]["content-type"] = "application/json"
    elif method in ("POST", "PUT", "PATCH"):
        kwargs["json"] = BODIES.get((method, path), {})
    return await client.request(method, url_of(path), **kwargs)


@pytest.mark.parametrize("service", SERVICES)
async def test_every_v1_route_refuses_a_missing_unknown_or_wrong_key(service: str, make_settings: Any) -> None:
    """With RTML_API_KEYS set, on the running service (real broker and Redis): every /v1 route answers 401
    without a key, with an unknown one, with a key in another scheme or a near miss (also when the body does
    not parse), 403 to every key that lacks its scope, and neither to every key that has it; health, metrics
    and the OpenAPI document stay open."""
    s: Settings = make_settings(api_keys=API_KEYS, model_poll_interval_s=0.2)
    await create_topics(s)
    app = create_service_app(Service(service), s)
    failures: list[str] = []

    def expect(what: str, resp: httpx.Response, statuses: set[int], code: str | None = None) -> None:
        if resp.status_code not in statuses:
            failures.append(f"{what}: {resp.status_code} {resp.text[:200]}, expected {sorted(statuses)}")
        elif code is not None:
            body = resp.json()
            if body.get("error", {}).get("code") != code or "message" not in body["error"]:
                failures.append(f"{what}: body {body}, expected error code {code!r}")

    async with running(app) as client:
        if service == "serving":  # a live model, so predict and recommend can answer 200
            up = await client.post("/v1/models/ctr/versions?promote=true", content=tiny_onnx(), headers=bearer(ADMIN))
            assert up.status_code == 201, up.text
        exercised = set()
        for method, path, route in v1_routes(app):
            exercised.add((method, path))
            scope = route_scope(route)
            assert scope is not None, f"{method} {path} declares no scope"
            where = f"{method} {path}"
            for label, headers in [
                ("no key", {}),
                ("unknown key", bearer(UNKNOWN_KEY)),
                ("empty bearer", {"Authorization": "Bearer "}),
                ("admin key as Basic", {"Authorization": f"Basic {ADMIN}"}),
                ("admin key without scheme", {"Authorization": ADMIN}),
                ("admin key plus a character", bearer(ADMIN + "x")),
                ("admin key less a character", bearer(ADMIN[:-1])),
            ]:
                resp = await _request(client, method, path, headers)
                expect(f"{where} {label}", resp, {401}, "unauthorized")
                if resp.status_code == 401 and resp.headers.get("www-authenticate") != "Bearer":
                    failures.append(f"{where} {label}: 401 without WWW-Authenticate: Bearer")
            if method in ("POST", "PUT", "PATCH"):
                resp = await _request(client, method, path, {}, raw=b'{"not json')
                expect(f"{where} no key, body that does not parse", resp, {401}, "unauthorized")
            for key in KEYS:
                if allowed(key, scope):
                    continue
                expect(f"{where} key without {scope!r}", await _request(client, method, path, bearer(key)), {403},
                       "forbidden")  # fmt: skip
                if method in ("POST", "PUT", "PATCH"):
                    resp = await _request(client, method, path, bearer(key), raw=b'{"not json')
                    expect(f"{where} key without {scope!r}, body that does not parse", resp, {403}, "forbidden")
            for key in KEYS:
                if allowed(key, scope):
                    resp = await _request(client, method, path, bearer(key))
                    ok = set(range(200, 500)) - {401, 403}
                    expect(f"{where} key {sorted(KEYS[key])} (has {scope!r})", resp, ok)
        assert exercised == set(ROUTE_SCOPES[service])

        if service == "serving":  # the fast path let the right key through to a real answer
            for key in KEYS:
                if allowed(key, "predict"):
                    resp = await _request(client, "POST", "/v1/predict", bearer(key))
                    expect(f"predict with {sorted(KEYS[key])}", resp, {200})
                    if resp.status_code == 200 and not 0.0 < resp.json()["score"] < 1.0:
                        failures.append(f"predict with {sorted(KEYS[key])}: {resp.json()}")
                    resp = await _request(client, "POST", "/v1/recommend", bearer(key))
                    expect(f"recommend with {sorted(KEYS[key])}", resp, {200})

        for path in OPEN_PATHS:
            expect(f"GET {path} without a key", await client.get(path), {200})
        expect("GET /readyz without a key", await client.get("/readyz"), {200, 503})
    assert not failures, "\n".join(failures)


async def test_every_key_path_compares_with_every_key_in_constant_time(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever key is sent (the first configured, the last, an unknown one) and whichever way the request
    goes (serving's fast path, a FastAPI route), it is compared with every configured key, each by
    ``hmac.compare_digest``: no early exit says which key matched or how many were tried."""
    import hmac

    from rtml.core import auth

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = ApiKeys.parse(API_KEYS)
    configured = sorted(k.encode() for k in KEYS)
    for given in (next(iter(KEYS)), list(KEYS)[-1], UNKNOWN_KEY):
        calls.clear()
        with contextlib.suppress(Exception):
            keys.check(f"Bearer {given}", "admin")
        assert sorted(b for _, b in calls) == configured and {a for a, _ in calls} == {given.encode()}, given

    app = create_service_app(Service.serving, make_settings(api_keys=API_KEYS))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for method, path, key, status in [("POST", "/v1/predict", "sk-read-5d27a9e613b4", 403),  # fast path
                                          ("POST", "/v1/recommend", UNKNOWN_KEY, 401),  # fast path
                                          ("GET", "/v1/models", "sk-predict-8b1e44c0f7a9", 403)]:  # fmt: skip
            calls.clear()
            resp = await client.request(method, path, headers=bearer(key), json={})
            assert resp.status_code == status, (path, resp.text)
            assert sorted(b for _, b in calls) == configured, path


def test_key_errors_in_the_setting_never_echo_a_key() -> None:
    """A malformed RTML_API_KEYS fails start-up with an error naming the entry's position, never its text
    (a key written the wrong way round, ``scope:key``, would otherwise end up in a log)."""
    for spec in ("sk-good-0a1b2c:read,ingest:sk-swapped-9f8e7d", "sk-good-0a1b2c:read,sk-noscope-9f8e7d:",
                 "sk-good-0a1b2c:read,sk-nocolon-9f8e7d"):  # fmt: skip
        with pytest.raises(ConfigError) as exc:
            ApiKeys.parse(spec)
        assert "entry 2" in exc.value.message, exc.value.message
        assert "9f8e7d" not in exc.value.message and "0a1b2c" not in exc.value.message, exc.value.message


@contextlib.asynccontextmanager
async def served_verbose(app: FastAPI, port: int) -> AsyncIterator[str]:
    """``tests.helpers.served`` with uvicorn's access log on and every uvicorn logger at TRACE, propagating
    to the root logger (no logging config of its own), so ``caplog`` sees every record."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="trace",
                            access_log=True, lifespan="on")  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(400):
        if server.started or task.done():
            break
        await asyncio.sleep(0.05)
    assert server.started, "serving did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_no_key_appears_in_logs_output_or_error_bodies(
    make_settings: Any, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Serving under a real uvicorn (access log on, every logger at DEBUG or finer), driven through 401 (no
    key, unknown key, body that does not parse), 403, 200, 201, 422 and two internal errors (500 on the fast
    path and on a FastAPI route, with their tracebacks logged): no key value appears in any log record, in
    the process's stdout/stderr, or in any response."""
    caplog.set_level(1)  # everything, uvicorn's TRACE included
    # and aiokafka's own level too: a CLI test earlier in this worker (quiet_logging) may have raised it to CRITICAL
    caplog.set_level(1, logger="aiokafka")
    s: Settings = make_settings(api_keys=API_KEYS)
    await create_topics(s)
    app = create_service_app(Service.serving, s)
    predict_key, read_key = "sk-predict-8b1e44c0f7a9", "sk-read-5d27a9e613b4"
    responses: list[httpx.Response] = []
    async with served_verbose(app, free_port()) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def call(method: str, path: str, key: str | None, status: int, **kw: Any) -> httpx.Response:
            headers = {**kw.pop("headers", {}), **(bearer(key) if key else {})}
            resp = await client.request(method, path, headers=headers, **kw)
            responses.append(resp)
            assert resp.status_code == status, (method, path, resp.status_code, resp.text)
            return resp

        body = BODIES[("POST", "/v1/predict")]
        bad_json = {"content": b'{"entities": ', "headers": {"content-type": "application/json"}}
        await call("POST", "/v1/models/ctr/versions?promote=true", ADMIN, 201, content=tiny_onnx())
        await call("POST", "/v1/models/ctr/versions", ADMIN, 422, content=b"not an onnx model")
        await call("POST", "/v1/predict", None, 401, json=body)
        await call("POST", "/v1/predict", UNKNOWN_KEY, 401, json=body)
        await call("POST", "/v1/predict", read_key, 403, json=body)
        await call("POST", "/v1/predict", predict_key, 200, json=body)
        await call("POST", "/v1/predict", predict_key, 422, **bad_json)
        await call("POST", "/v1/predict", UNKNOWN_KEY, 401, **bad_json)
        await call("GET", "/v1/models", None, 401)
        await call("GET", "/v1/models", UNKNOWN_KEY, 401)
        await call("GET", "/v1/models", predict_key, 403)
        await call("GET", "/v1/models", read_key, 200)
        await call("POST", "/v1/models/ctr/promote", UNKNOWN_KEY, 401, **bad_json)
        await call("POST", "/v1/models/ctr/promote", read_key, 403, **bad_json)
        await call("POST", "/v1/models/ctr/promote", ADMIN, 422, **bad_json)
        # internal errors: the fast path's and FastAPI's handlers log the exception with its traceback
        predictor, registry = app.state.predictor, app.state.registry

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("simulated internal failure")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(predictor, "predict", broken)
            mp.setattr(registry, "describe", broken)
            await call("POST", "/v1/predict", predict_key, 500, json=body)
            await call("GET", "/v1/models", read_key, 500)
    out, err = capfd.readouterr()

    # the paths were really taken and logged: access lines for each request, the two tracebacks
    access = [r for r in caplog.records if r.name == "uvicorn.access"]
    assert len(access) >= len(responses), (len(access), len(responses))
    tracebacks = [r for r in caplog.records if r.exc_info and "simulated internal failure" in str(r.exc_info[1])]
    assert len(tracebacks) >= 2, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(r.name.startswith("aiokafka") and r.levelno == logging.DEBUG for r in caplog.records)

    everything = [caplog.text, out, err]
    everything += [f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records]
    everything += [f"{r.status_code} {r.headers!r} {r.text}" for r in responses]
    for key in [*KEYS, UNKNOWN_KEY]:
        leaks = [text[max(0, text.find(key) - 200) : text.find(key) + 50] for text in everything if key in text]
        assert not leaks, f"key {key[:6]}... found in: {leaks[:3]}"


async def test_no_key_in_the_output_of_a_real_serving_process(make_settings: Any, tmp_path: Path) -> None:
    """``rtml serve serving`` as its own process with RTML_API_KEYS in its environment and RTML_LOG_LEVEL=DEBUG,
    driven through 401, 403, 200, 201 and 422: nothing it writes (stdout and stderr, DEBUG logs included,
    from start to a SIGTERM stop) contains a key."""
    s: Settings = make_settings(api_keys=API_KEYS)
    await create_topics(s)
    port = free_port()
    env = {
        **os.environ,
        "RTML_KAFKA_BOOTSTRAP": str(s.kafka.bootstrap), "RTML_KAFKA_PARTITIONS": str(s.kafka.partitions),
        "RTML_REDIS_URL": str(s.redis.url), "RTML_REDIS_KEY_PREFIX": s.redis.key_prefix,
        "RTML_TOPIC_PREFIX": s.topic_prefix, "RTML_CONFIG": str(s.platform_config_path()),
        "RTML_API_KEYS": API_KEYS, "RTML_LOG_LEVEL": "DEBUG", "RTML_SERVING_PORT": str(port),
    }  # fmt: skip
    log = tmp_path / "serving.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rtml.cli.main", "serve", "serving"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    responses: list[httpx.Response] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

            async def ready() -> None:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    assert (await client.get("/readyz")).status_code == 200
                except httpx.HTTPError as exc:
                    raise AssertionError(str(exc)) from None

            await eventually(ready, timeout=60, every=0.1)

            async def call(method: str, path: str, key: str | None, status: int, **kw: Any) -> None:
                headers = {**kw.pop("headers", {}), **(bearer(key) if key else {})}
                resp = await client.request(method, path, headers=headers, **kw)
                responses.append(resp)
                assert resp.status_code == status, (method, path, resp.status_code, resp.text)

            body = BODIES[("POST", "/v1/predict")]
            bad_json = {"content": b'{"entities": ', "headers": {"content-type": "application/json"}}
            await call("POST", "/v1/models/ctr/versions?promote=true", ADMIN, 201, content=tiny_onnx())
            await call("POST", "/v1/predict", None, 401, json=body)
            await call("POST", "/v1/predict", UNKNOWN_KEY, 401, json=body)
            await call("POST", "/v1/predict", "sk-read-5d27a9e613b4", 403, json=body)
            await call("POST", "/v1/predict", "sk-web-2c9b7e1fa043", 200, json=body)
            await call("POST", "/v1/predict", "sk-predict-8b1e44c0f7a9", 422, **bad_json)
            await call("GET", "/v1/models", UNKNOWN_KEY, 401)
            await call("GET", "/v1/models", "sk-predict-8b1e44c0f7a9", 403)
            await call("GET", "/v1/models", "sk-app-71ae0d3c55f1", 200)
            await call("POST", "/v1/models/ctr/promote", UNKNOWN_KEY, 401, **bad_json)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    output = log.read_text(errors="replace")
    assert " DEBUG " in output, output[-2000:]  # the process did log at DEBUG: the check below can find things
    everything = [output, *(f"{r.status_code} {r.headers!r} {r.text}" for r in responses)]
    for key in [*KEYS, UNKNOWN_KEY]:
        leaks = [text[max(0, text.find(key) - 200) : text.find(key) + 50] for text in everything if key in text]
        assert not leaks, f"key {key[:6]}... found in: {leaks[:3]}"
