"""``POST /v1/predict`` and ``POST /v1/recommend``, answered before FastAPI's middleware stack and router.

Why: web apps call these on their own request path, and on 2 cores FastAPI's share of a request (routing,
dependency injection, its middleware stack, body handling) cost more CPU than the Redis read and the model
together (see README "Performance"). This layer does, for these two routes only, everything the stack did —
API key scope, admission, body limit, validation, errors in the contract's shape, request metrics — in a few
microseconds, and leaves every other route to FastAPI (``ServingApp``).

It validates with the same pydantic models the FastAPI routes declare (``PredictRequest``,
``RecommendRequest``, by pydantic-core straight from the bytes), so the OpenAPI schema FastAPI publishes for
these routes describes exactly what is accepted.

Admission, for web apps that would rather have a fast fallback than a slow answer:

- **Deadline.** ``X-Request-Timeout-Ms`` (else ``RTML_PREDICT_TIMEOUT_MS``) sets when the request must be
  answered. The feature read gets what is left of it; when Redis is slower, the read is abandoned and the
  model scores with defaults, ``degraded: true`` (see ``Predictor``).
- **Shedding.** Past ``RTML_PREDICT_MAX_IN_FLIGHT`` requests in this process, or past the lower cap its event
  loop's lag sets while the loop runs ``RTML_MAX_LOOP_LAG_MS`` behind on its own work (``rtml.core.looplag``:
  the CPU is the bottleneck), the next one is answered 503 with ``Retry-After`` at once instead of queueing
  into everyone's timeouts. Under ``rtml serve`` that 503 is written by the HTTP protocol as soon as the
  headers are parsed, before a task exists (``early_refusal``, ``rtml.core.early``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import State
from starlette.types import Receive, Scope, Send

from rtml.core import metrics
from rtml.core.app import invalid_body
from rtml.core.auth import ApiKeys
from rtml.core.errors import BadRequest, Overloaded, PayloadTooLarge, RtmlError
from rtml.core.looplag import LoopLag
from rtml.serving.predict import Predictor
from rtml.serving.routes import PredictRequest, RecommendRequest, answer_predict, answer_recommend

if TYPE_CHECKING:
    from rtml.core.early import Headers  # a type only: the apps do not need uvicorn's protocol

log = logging.getLogger(__name__)

TIMEOUT_HEADER = b"x-request-timeout-ms"
MAX_TIMEOUT_MS = 60_000
JSON_TYPE = (b"content-type", b"application/json")
Handler = Callable[[Predictor, Any, float | None], Awaitable[dict[str, Any]]]


class ClientGone(Exception):
    """The client disconnected before sending its whole body: nothing to answer."""


class _Route:
    """One fast route: its validator, its handler and its request metrics (label children bound once)."""

    def __init__(self, path: str, model: type[BaseModel], handler: Handler) -> None:
        self.path = path
        self.adapter: TypeAdapter[Any] = TypeAdapter(model)
        self.handler = handler
        self.seconds = metrics.HTTP_REQUEST_SECONDS.labels("serving", path, "POST")
        self._counts: dict[int, Any] = {}

    def count(self, status: int) -> None:
        child = self._counts.get(status)
        if child is None:
            child = self._counts[status] = metrics.HTTP_REQUESTS.labels("serving", self.path, "POST", str(status))
        child.inc()


class FastPath:
    """Answers the hot routes.

    ``state`` is the FastAPI app's state: settings and API keys now, the predictor once the lifespan has
    opened it (no request reaches an app before its lifespan started).
    """

    def __init__(self, state: State) -> None:
        self.state = state
        settings = state.settings
        self.keys: ApiKeys = state.api_keys
        self.limit: int = settings.max_body_bytes
        self.max_in_flight: int = settings.predict_max_in_flight
        self.default_timeout_s: float = settings.predict_timeout_ms / 1000
        self.in_flight = 0
        self.lag: LoopLag = state.loop_lag
        self.lag.watch(lambda: self.in_flight)  # its cap halves from what is in flight
        self.routes = {
            "/v1/predict": _Route("/v1/predict", PredictRequest, answer_predict),
            "/v1/recommend": _Route("/v1/recommend", RecommendRequest, answer_recommend),
        }
        self._shed = {path: metrics.SERVING_SHED.labels(route=path) for path in self.routes}
        self._by_raw_path = {path.encode(): route for path, route in self.routes.items()}

    async def serve(self, route: _Route, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            status, body, headers = await self._answer(route, scope, receive)
        except ClientGone:
            return
        # with a Content-Length the server need not chunk the body
        headers += (JSON_TYPE, (b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        route.seconds.observe(time.perf_counter() - started)
        route.count(status)

    async def _answer(self, route: _Route, scope: Scope, receive: Receive) -> tuple[int, bytes, list[Any]]:
        auth = length = timeout = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if auth is None:  # the first, as early_refusal and Starlette's headers.get read it
                    auth = value
            elif name == b"content-length":
                length = value
            elif name == TIMEOUT_HEADER:
                timeout = value
        try:
            if self.keys.enabled:
                self.keys.check(None if auth is None else auth.decode("latin-1"), "predict")
            refusal = self._refusal()
            if refusal is not None:
                self._shed[route.path].inc()
                raise refusal
            deadline = asyncio.get_running_loop().time() + (
                self.default_timeout_s if timeout is None else _timeout_s(timeout)
            )
            self.in_flight += 1
            try:
                raw = await self._body(receive, length)
                try:
                    request = route.adapter.validate_json(raw)
                except ValidationError as exc:  # the caller's body only: a ValidationError deeper is a 500
                    return 422, orjson.dumps(invalid_body(exc.errors())), []
                payload = await route.handler(self.state.predictor, request, deadline)
            finally:
                self.in_flight -= 1
            return 200, orjson.dumps(payload), []
        except RtmlError as exc:
            extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
            return exc.status, orjson.dumps(exc.to_body()), extra
        except ClientGone:
            raise
        except Exception:
            log.exception("unhandled error on POST %s", route.path)
            return 500, b'{"error":{"code":"internal","message":"internal error"}}', []

    def _refusal(self) -> Overloaded | None:
        """The 503 for the next request while this process is full, else None."""
        if self.in_flight >= self.max_in_flight:
            return Overloaded(f"more than {self.max_in_flight} requests in flight; retry shortly")
        if not self.lag.admits(self.in_flight):
            return self.lag.refusal()
        return None

    def early_refusal(self, method: bytes, path: bytes, headers: Headers) -> RtmlError | None:
        """For ``rtml.core.early``: the 503 ``serve`` would answer this request with for load, counted the same
        way, else None (admitted, not a fast route, or a key problem that ``serve`` answers 401/403)."""
        if method != b"POST":
            return None
        route = self._by_raw_path.get(path)
        if route is None:
            return None
        started = time.perf_counter()
        refusal = self._refusal()
        if refusal is None:
            return None
        if not self.keys.allows(headers, "predict"):
            return None  # serve answers its 401/403
        self._shed[route.path].inc()
        route.seconds.observe(time.perf_counter() - started)
        route.count(refusal.status)
        return refusal

    async def _body(self, receive: Receive, length: bytes | None) -> bytes:
        """The whole body, refused with 413 past the limit (by Content-Length at once, else while reading)."""
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise BadRequest("Content-Length is not a number") from None
            if declared > self.limit:
                raise PayloadTooLarge(f"request body is over {self.limit} bytes")
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > self.limit:
                raise PayloadTooLarge(f"request body is over {self.limit} bytes")
            return body
        chunks, size = [body], len(body)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise PayloadTooLarge(f"request body is over {self.limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _timeout_s(raw: bytes) -> float:
    try:
        ms = int(raw)
    except ValueError:
        ms = 0
    if not 1 <= ms <= MAX_TIMEOUT_MS:
        raise BadRequest(f"X-Request-Timeout-Ms must be a whole number of ms from 1 to {MAX_TIMEOUT_MS}")
    return ms / 1000


class ServingApp(FastAPI):
    """The serving service's app: POST to a hot route goes straight to ``fast`` (set by ``create_app``);
    everything else takes FastAPI's usual way."""

    fast: FastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast
        if fast is not None and scope["type"] == "http" and scope["method"] == "POST":
            route = fast.routes.get(scope["path"])
            if route is not None:
                await fast.serve(route, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def early_refusal(self, method: bytes, path: bytes, headers: Headers) -> RtmlError | None:
        fast = self.fast
        return None if fast is None else fast.early_refusal(method, path, headers)
