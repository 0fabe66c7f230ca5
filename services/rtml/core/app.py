"""The app builder every service uses: health, readiness, metrics, errors, auth, body limits.

``build_app`` returns a FastAPI app whose lifespan runs the service's own ``open`` hook (which opens its
producer, Redis pool, consumers, ONNX sessions and returns them as typed state) and closes them after.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from fastapi.routing import iter_route_contexts
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rtml import __version__
from rtml.core import metrics
from rtml.core.auth import ApiKeys
from rtml.core.auth import Scope as AuthScope
from rtml.core.errors import MAX_DETAILS, DependencyUnavailable, PayloadTooLarge, RtmlError
from rtml.core.looplag import LoopLag
from rtml.core.settings import ServiceName, Settings

log = logging.getLogger(__name__)

GC_GEN0_THRESHOLD = 10_000
ReadinessCheck = Callable[[], Awaitable[None]]
OpenHook = Callable[[FastAPI, Settings], AbstractAsyncContextManager[dict[str, ReadinessCheck]]]


class JSONBytes(Response):
    """JSON rendered by orjson, for responses built by hand (errors, health). Routes with a
    response model are serialised by pydantic directly, which FastAPI now prefers."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: RtmlError) -> JSONBytes:
    return JSONBytes(exc.to_body(), status_code=exc.status, headers=exc.headers())


def invalid_body(errors: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The 422 body for pydantic errors (FastAPI's or pydantic's own): each bad field as a dotted path, the
    first ``MAX_DETAILS`` of them (the message says how many there were)."""
    errors = list(errors)
    details = [
        {"field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"), "message": err.get("msg", "")}
        for err in errors[:MAX_DETAILS]
    ]
    message = "request does not validate"
    if len(errors) > MAX_DETAILS:
        message += f"; {len(errors)} problems, the first {MAX_DETAILS} listed"
    return {"error": {"code": "invalid", "message": message, "details": details}}


class MetricsMiddleware:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): latency per route template."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope.get("method", "GET")
            metrics.HTTP_REQUEST_SECONDS.labels(self.service, path, method).observe(time.perf_counter() - start)
            metrics.HTTP_REQUESTS.labels(self.service, path, method, str(status)).inc()


class BodyLimitMiddleware:
    """413 for bodies over the limit, by Content-Length up front or while streaming a chunked body.

    ``overrides`` maps path patterns (regular expressions matched against the whole path) to their own limit,
    e.g. serving's model uploads, which may be as large as the registry accepts; the first match wins."""

    def __init__(self, app: ASGIApp, limit: int, overrides: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.overrides = [(re.compile(pattern), size) for pattern, size in (overrides or {}).items()]

    def limit_for(self, path: str) -> int:
        for pattern, size in self.overrides:
            if pattern.fullmatch(path):
                return size
        return self.limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"]) if self.overrides else self.limit
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    resp = error_response(PayloadTooLarge(f"request body is over {limit} bytes"))
                    await resp(scope, receive, send)
                    return
        seen = 0
        over = False
        answered = False

        async def limited_receive() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise PayloadTooLarge(f"request body is over {limit} bytes")
            return message

        async def checked_send(message: Message) -> None:
            # FastAPI answers any error raised while reading a body for a pydantic model with 400: once the
            # limit was crossed, whatever the app answers becomes the 413 it is.
            nonlocal answered
            if not over:
                await send(message)
            elif not answered and message["type"] == "http.response.start":
                answered = True
                await error_response(PayloadTooLarge(f"request body is over {limit} bytes"))(scope, receive, send)

        await self.app(scope, limited_receive, checked_send)


def build_app(
    service: ServiceName,
    settings: Settings,
    open_hook: OpenHook,
    body_limits: Mapping[str, int] | None = None,
    app_class: type[FastAPI] = FastAPI,
) -> FastAPI:
    """A service app: ``open_hook`` opens the service's resources and returns its readiness checks.
    ``body_limits``: path pattern -> body limit for the routes that take more than ``max_body_bytes``.
    ``app_class``: a FastAPI subclass (serving answers its hot routes before the middleware stack)."""
    api_keys = ApiKeys.parse(settings.api_keys.get_secret_value() if settings.api_keys else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with open_hook(app, settings) as checks:
                app.state.checks = checks
                # Start-up objects (modules, sessions, config) never die: move them out of the GC's sight so
                # collections on the request path stay short (measured: most tail latency is GC pauses).
                gc.collect()
                gc.freeze()
                # Young collections every 10,000 allocations instead of 700: a predict request allocates a few
                # hundred objects, so the default collected every couple of requests, on the request path.
                gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
                metrics.watch_gc()
                app.state.loop_lag.start()
                try:
                    yield
                finally:
                    await app.state.loop_lag.stop()
        finally:
            metrics.process_exited()  # several workers: this one's "live" gauges stop counting

    app = app_class(
        title=f"rtml {service}",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.api_keys = api_keys
    app.state.checks = {}
    app.state.loop_lag = LoopLag(settings.max_loop_lag_ms / 1000)

    @app.exception_handler(RtmlError)
    async def _rtml_error(request: Request, exc: RtmlError) -> JSONBytes:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONBytes:
        return auth_refusal(request) or JSONBytes(invalid_body(exc.errors()), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONBytes:
        if exc.status_code == 400 and (refused := auth_refusal(request)) is not None:
            return refused  # a body FastAPI could not parse, sent without the right key
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:  # RFC 9110: a 405 names every method of the path, not only the first route's
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return JSONBytes({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                         headers=headers)  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONBytes:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONBytes({"error": {"code": "internal", "message": "internal error"}}, status_code=500)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONBytes:
        failed: dict[str, str] = {}
        for name, check in request.app.state.checks.items():
            try:
                await check()
            except DependencyUnavailable as exc:
                failed[name] = exc.message
            except Exception as exc:
                failed[name] = repr(exc)
        if failed:
            return JSONBytes(
                {"status": "unavailable", "failed": failed,
                 "error": {"code": "unavailable", "message": "not ready: " + ", ".join(sorted(failed))}},
                status_code=503, headers={"Retry-After": "1"},
            )  # fmt: skip
        return JSONBytes({"status": "ready", "service": service})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> PlainTextResponse:
        # Several workers (multiprocess mode): whichever worker answers merges the files of all of them.
        return PlainTextResponse(metrics.scrape(), media_type=CONTENT_TYPE_LATEST)

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = base_openapi()  # FastAPI's, cached until a route is added
        document_errors(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, overrides=body_limits)
    app.add_middleware(MetricsMiddleware, service=service)
    return app


# Declared so the OpenAPI document says how to authenticate (``components.securitySchemes.apiKey``) and each
# operation names the scope it needs (``security: [{"apiKey": [scope]}]``). The check itself is ``ApiKeys``'.
API_KEY_SCHEME = HTTPBearer(
    scheme_name="apiKey",
    auto_error=False,
    description="When RTML_API_KEYS is set: Authorization: Bearer KEY, a key with the scope the operation lists "
    "(or admin). 401 without a known key, 403 when the key lacks the scope.",
)


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"description": "what was wrong, e.g. each bad field of a 422"},
            },
        }
    },
}
_ERRORS: dict[str, str] = {
    "400": "the request cannot be read (e.g. a body that is not JSON, a bad header value)",
    "401": "RTML_API_KEYS is set and the request has no known key (Authorization: Bearer KEY)",
    "403": "the key lacks the scope this operation needs",
    "404": "an unknown model, version or other resource",
    "413": "the body is over the size limit",
    "422": "the request does not validate; details names each bad field",
    "503": "a dependency (broker or Redis) is unavailable, or the process is overloaded (too many requests in "
    "flight, or more than it takes while behind on its own work): retry after Retry-After seconds",
}
_HEADERS: dict[str, dict[str, Any]] = {
    "401": {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
    "503": {"Retry-After": {"schema": {"type": "string"}, "required": True}},
}


def document_errors(schema: dict[str, Any]) -> None:
    """Add the contract's errors to every ``/v1`` operation of an OpenAPI document (idempotent): the JSON
    ``{"error": {"code", "message"}}`` shape of each 4xx/503 the operation can answer (401/403 where it
    needs a key, 400/413 where it takes a body), instead of FastAPI's own 422 shape, which rtml never sends."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith("/v1"):
            continue
        for operation in operations.values():
            codes = ["404", "422", "503"]
            if operation.get("security"):
                codes += ["401", "403"]
            if "requestBody" in operation:
                codes += ["400", "413"]
            responses = operation.setdefault("responses", {})
            for code in sorted(codes):
                entry = responses.setdefault(code, {"description": _ERRORS[code]})
                described = entry.get("content", {}).get("application/json", {}).get("schema", {})
                if not described or "HTTPValidationError" in str(described.get("$ref", "")):
                    entry["content"] = content
                if code in _HEADERS:
                    entry.setdefault("headers", {}).update(_HEADERS[code])


def allowed_methods(request: Request) -> str:
    """The ``Allow`` value for the request's path: the methods of every route that matches it (FastAPI has
    one route per method, and its 405 lists only the first one's)."""
    methods: set[str] = set()
    for ctx in iter_route_contexts(request.app.routes):
        match, _ = ctx.matches(request.scope)
        if match != Match.NONE:
            methods |= ctx.methods or set()
    return ", ".join(sorted(methods))


def require(scope: AuthScope) -> Any:
    """Route dependency: the caller's API key must carry ``scope`` (when RTML_API_KEYS is set). The check
    carries its scope as ``required_scope``, which ``route_scope`` reads."""

    def check(request: Request, _: Annotated[Any, Depends(API_KEY_SCHEME)]) -> None:
        request.app.state.api_keys.check(request.headers.get("authorization"), scope)

    check.required_scope = scope  # type: ignore[attr-defined]
    return Security(check, scopes=[scope])


def route_scope(route: Any) -> AuthScope | None:
    """The scope a route declared with ``require`` (None: an open route, or not an API route)."""
    dependant = getattr(route, "dependant", None)
    for dep in dependant.dependencies if dependant is not None else ():
        scope: AuthScope | None = getattr(dep.call, "required_scope", None)
        if scope is not None:
            return scope
    return None


def auth_refusal(request: Request) -> JSONBytes | None:
    """The 401/403 a request to an authenticated route gets, if any. FastAPI parses a JSON body before it
    runs a route's dependencies: the handlers of body errors ask this first, so a caller without the right
    key learns that (401/403), not what is wrong with the body."""
    scope = route_scope(request.scope.get("route"))
    if scope is None:
        return None
    try:
        request.app.state.api_keys.check(request.headers.get("authorization"), scope)
    except RtmlError as exc:
        return error_response(exc)
    return None


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(settings_of)]
