"""What the sync and async clients share, with no I/O: URLs, headers, request building, response parsing, the
retry policy and event batching. ``Client`` and ``AsyncClient`` only send the :class:`Call` objects built here
(the "sans-I/O" split well-kept twins such as httpx use), so both behave the same by construction.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote, urlsplit

import httpx
import orjson
from pydantic import TypeAdapter, ValidationError

from rtml import __version__
from rtml.client.errors import (
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RtmlError,
    Timeout,
    TransportError,
    Unavailable,
    error_for,
)
from rtml.client.models import (
    Decision,
    Features,
    ModelInfo,
    Prediction,
    Promoted,
    Quality,
    Recommendation,
    RolloutState,
)

T = TypeVar("T")
Service = Literal["ingest", "features", "serving", "feedback"]
DEFAULT_PORTS: dict[Service, int] = {"ingest": 8001, "features": 8002, "serving": 8003, "feedback": 8004}
MAX_BATCH_EVENTS = 10_000  # the contract's cap per POST /v1/events
MAX_BATCH_BYTES = 10 * 1024 * 1024  # the services' default body cap (RTML_MAX_BODY_BYTES)
TimeoutArg = float | httpx.Timeout | None
_HEAD = b'{"events":['
_TAIL = b"]}"


def new_event_id() -> str:
    """A fresh event id (128 random bits as 32 hex digits, the same form the platform generates)."""
    return uuid.uuid4().hex


def resolve_urls(base_url: str, overrides: Mapping[Service, str | None]) -> dict[Service, str]:
    """Each service's base URL. ``base_url`` without a port or path (``http://10.0.0.5``) means every service
    on its default port of that host; with a port or a path (``https://api.example.com/rtml``) it is one
    gateway that routes every ``/v1`` path. An explicit per-service URL wins."""
    parts = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
    if not parts.hostname:
        raise ValueError(f"base_url {base_url!r} has no host")
    root = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    gateway = parts.port is not None or parts.path.strip("/") != ""
    urls: dict[Service, str] = {}
    for service, port in DEFAULT_PORTS.items():
        explicit = overrides.get(service)
        if explicit:
            urls[service] = explicit.rstrip("/")
        elif gateway:
            urls[service] = root
        else:
            urls[service] = f"{root}:{port}"
    return urls


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


@dataclass(frozen=True)
class Retry:
    """When and how long to wait before trying a request again.

    Retried: answers 429/502/503/504 and requests that never reached the server (connection refused, connect
    timeout); other transport failures (reset, read timeout: the server may have done the work) only for
    idempotent calls (events, which carry their ``event_id``; outcomes; reads; promote), never predict or
    recommend. The wait is exponential (``backoff * 2**(n-1)`` capped at ``max_backoff``) with jitter, and at
    least the server's ``Retry-After``. At most ``attempts`` tries, and no wait that would end more than
    ``max_elapsed`` seconds after the first try started: then the last error is raised.
    """

    attempts: int = 5
    backoff: float = 0.2
    max_backoff: float = 5.0
    max_elapsed: float = 30.0
    statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    rand: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry.attempts must be at least 1 (1 = no retry)")

    def next_delay(self, error: RtmlError, attempt: int, elapsed: float, idempotent: bool) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up and raise ``error``."""
        if attempt >= self.attempts:
            return None
        if isinstance(error, TransportError):
            if error.maybe_processed and not idempotent:
                return None
        elif error.status not in self.statuses:
            return None
        cap = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        delay = cap / 2 + self.rand() * cap / 2  # "equal jitter": spread out, never ~0
        retry_after = error.retry_after if isinstance(error, Unavailable) else None
        if retry_after is not None:
            delay = max(delay, retry_after * (1 + 0.1 * self.rand()))  # at least what the server asked
        if elapsed + delay > self.max_elapsed:
            return None
        return delay


NO_RETRY = Retry(attempts=1)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request and how to read its answer."""

    method: str
    url: str
    parse: Callable[[Any], T]
    body: bytes | None = None
    params: Mapping[str, str | int] | None = None
    headers: Mapping[str, str] | None = None
    idempotent: bool = True


def transport_error(exc: httpx.TransportError) -> TransportError:
    """The client error for an httpx transport failure, chained to it."""
    cls = Timeout if isinstance(exc, httpx.TimeoutException) else TransportError
    err = cls(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, code="transport")
    # the request surely never reached the server: retrying cannot do anything twice
    err.maybe_processed = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    err.__cause__ = exc
    return err


def error_from_response(resp: httpx.Response) -> RtmlError:
    """The typed error for a non-2xx answer, from the contract's ``{"error": {"code", "message"}}``."""
    code, message, details = f"http_{resp.status_code}", resp.reason_phrase or "", None
    try:
        body = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = str(err.get("code", code))
        message = str(err.get("message", message))
        details = err.get("details")
    elif resp.content:
        message = resp.text[:500]
    return error_for(resp.status_code, code, message, details, parse_retry_after(resp.headers.get("retry-after")))


def result(call: Call[T], resp: httpx.Response) -> T:
    """The parsed result of a 2xx answer; the typed error of any other."""
    if not resp.is_success:
        raise error_from_response(resp)
    try:
        return call.parse(orjson.loads(resp.content) if resp.content else None)
    except (orjson.JSONDecodeError, ValidationError, KeyError, TypeError) as exc:
        raise RtmlError(f"unexpected answer from {call.url}: {exc}", status=resp.status_code,
                        code="bad_response") from exc  # fmt: skip


# -- events -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Encoded:
    """One event ready to send: its id and its JSON."""

    event_id: str
    json: bytes


@dataclass(frozen=True, slots=True)
class Chunk:
    """Events ``offset .. offset + count - 1`` of a ``send_events`` call, as one request body."""

    offset: int
    count: int
    body: bytes


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_event(event: Mapping[str, Any], index: int | None = None) -> Encoded:
    """Copy ``event`` (the caller's mapping is not changed), give it an ``event_id`` when it has none, encode it.
    ``ts`` may be epoch ms, an RFC 3339 string or an aware ``datetime``."""
    if not isinstance(event, Mapping):
        raise InvalidRequest("an event must be a mapping (dict)", code="invalid",
                             details=[{"index": index, "field": "(event)", "message": "not a mapping"}])  # fmt: skip
    ev = dict(event)
    event_id = ev.get("event_id")
    if event_id is None:
        event_id = ev["event_id"] = new_event_id()
    try:
        data = orjson.dumps(ev, default=_default, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        raise InvalidRequest(f"event cannot be encoded as JSON: {exc}", code="invalid",
                             details=[{"index": index, "field": "(event)", "message": str(exc)}]) from None  # fmt: skip
    return Encoded(str(event_id), data)


def chunks(encoded: Sequence[Encoded], max_events: int, max_bytes: int) -> list[Chunk]:
    """Split into request bodies of at most ``max_events`` events and ``max_bytes`` bytes, in order."""
    out: list[Chunk] = []
    parts: list[bytes] = []
    start, size = 0, len(_HEAD) + len(_TAIL)
    for i, enc in enumerate(encoded):
        alone = len(_HEAD) + len(enc.json) + len(_TAIL)
        if alone > max_bytes:
            raise PayloadTooLarge(f"event {i} alone is {alone} bytes, over the {max_bytes}-byte body cap",
                                  code="payload_too_large",
                                  details=[{"index": i, "field": "(event)", "message": "too large"}])  # fmt: skip
        extra = len(enc.json) + (1 if parts else 0)
        if parts and (len(parts) >= max_events or size + extra > max_bytes):
            out.append(Chunk(start, len(parts), _HEAD + b",".join(parts) + _TAIL))
            start, parts, size = i, [], len(_HEAD) + len(_TAIL)
            extra = len(enc.json)
        parts.append(enc.json)
        size += extra
    if parts:
        out.append(Chunk(start, len(parts), _HEAD + b",".join(parts) + _TAIL))
    return out


def annotate(exc: RtmlError, chunk: Chunk, accepted: int, event_ids: list[str]) -> RtmlError:
    """A failure of one chunk of ``send_events``, told in the caller's terms: indices into the whole list,
    how many events earlier chunks got accepted, every event's id."""
    if chunk.offset and isinstance(exc.details, list):
        exc.details = [
            {**d, "index": d["index"] + chunk.offset} if isinstance(d, dict) and isinstance(d.get("index"), int) else d
            for d in exc.details
        ]
    exc.accepted = accepted
    exc.event_ids = event_ids
    return exc


def _accepted(body: Any) -> int:
    return int(body["accepted"])


_MODELS = TypeAdapter(list[ModelInfo])
_DECISIONS = TypeAdapter(list[Decision])
_FEATURES = TypeAdapter(list[Features])


def _seg(value: str) -> str:
    return quote(str(value), safe="")


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _json(d: Mapping[str, Any]) -> bytes:
    return orjson.dumps(_drop_none(d), default=_default)


class Core:
    """Configuration and request building shared by ``Client`` and ``AsyncClient``."""

    def __init__(
        self,
        base_url: str,
        urls: Mapping[Service, str | None],
        api_key: str | None,
        timeout: TimeoutArg,
        retry: Retry | None,
        headers: Mapping[str, str] | None,
        max_batch_events: int,
        max_batch_bytes: int,
        clock: Callable[[], float] | None,
    ) -> None:
        if not 1 <= max_batch_events <= MAX_BATCH_EVENTS:
            raise ValueError(f"max_batch_events must be in 1..{MAX_BATCH_EVENTS}")
        self.urls = resolve_urls(base_url, urls)
        self.timeout = timeout
        self.retry = retry or Retry()
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self.clock = clock or time.monotonic
        self.headers = {"User-Agent": f"rtml-client/{__version__}", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.headers.update(headers or {})

    def timeout_for(self, timeout: TimeoutArg) -> float | httpx.Timeout | None:
        return self.timeout if timeout is None else timeout

    def _url(self, service: Service, path: str) -> str:
        return self.urls[service] + path

    # -- calls ------------------------------------------------------------------------------------------------
    def encode_events(self, events: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[Chunk]]:
        encoded = [encode_event(ev, i) for i, ev in enumerate(events)]
        return [e.event_id for e in encoded], chunks(encoded, self.max_batch_events, self.max_batch_bytes)

    def events(self, chunk: Chunk) -> Call[int]:
        return Call("POST", self._url("ingest", "/v1/events"), _accepted, chunk.body, headers=_JSON_BODY)

    def predict(self, entities: Mapping[str, str | int], model: str | None,
                features: Mapping[str, float | None] | None, deadline_ms: int | None) -> Call[Prediction]:  # fmt: skip
        body = _json({"model": model, "entities": dict(entities), "features": features})
        return Call("POST", self._url("serving", "/v1/predict"), Prediction.model_validate, body,
                    headers=_deadline(deadline_ms), idempotent=False)  # fmt: skip

    def recommend(self, user_id: str, candidates: Sequence[str], k: int, model: str | None,
                  deadline_ms: int | None) -> Call[Recommendation]:  # fmt: skip
        body = _json({"model": model, "user_id": user_id, "candidates": list(candidates), "k": k})
        return Call("POST", self._url("serving", "/v1/recommend"), Recommendation.model_validate, body,
                    headers=_deadline(deadline_ms), idempotent=False)  # fmt: skip

    def outcome(self, prediction_id: str, label: float | bool, item_id: str | None,
                ts: int | str | datetime | None) -> Call[None]:  # fmt: skip
        body = _json({"prediction_id": prediction_id, "label": label, "item_id": item_id, "ts": ts})
        return Call("POST", self._url("feedback", "/v1/outcomes"), lambda _: None, body, headers=_JSON_BODY)

    def models(self) -> Call[list[ModelInfo]]:
        return Call("GET", self._url("serving", "/v1/models"), lambda b: _MODELS.validate_python(b["models"]))

    def promote(self, name: str, version: str) -> Call[Promoted]:
        return Call("POST", self._url("serving", f"/v1/models/{_seg(name)}/promote"), Promoted.model_validate,
                    _json({"version": str(version)}), headers=_JSON_BODY)  # fmt: skip

    def rollback(self, name: str) -> Call[Promoted]:
        # not idempotent: a repeated rollback steps back once more
        return Call("POST", self._url("serving", f"/v1/models/{_seg(name)}/rollback"), Promoted.model_validate,
                    idempotent=False)  # fmt: skip

    def rollout(self, name: str) -> Call[RolloutState]:
        return Call("GET", self._url("serving", f"/v1/models/{_seg(name)}/rollout"), RolloutState.model_validate)

    def quality(self, name: str) -> Call[Quality]:
        return Call("GET", self._url("feedback", f"/v1/models/{_seg(name)}/quality"), Quality.model_validate)

    def decisions(self, name: str, limit: int) -> Call[list[Decision]]:
        return Call("GET", self._url("feedback", f"/v1/models/{_seg(name)}/decisions"),
                    lambda b: _DECISIONS.validate_python(b["decisions"]), params={"limit": limit})  # fmt: skip

    def features(self, entity: str, id: str, names: Sequence[str] | None, as_of: int | None) -> Call[Features]:
        params: dict[str, str | int] = {}
        if names is not None:
            params["features"] = ",".join(names)
        if as_of is not None:
            params["as_of"] = as_of
        return Call("GET", self._url("features", f"/v1/features/{_seg(entity)}/{_seg(id)}"),
                    Features.model_validate, params=params or None)  # fmt: skip

    def features_batch(self, entity: str, ids: Sequence[str], names: Sequence[str] | None) -> Call[list[Features]]:
        body = _json({"entity": entity, "ids": list(ids), "features": None if names is None else list(names)})
        return Call("POST", self._url("features", "/v1/features:batch"), _FEATURES.validate_python, body,
                    headers=_JSON_BODY)  # fmt: skip


_JSON_BODY = {"Content-Type": "application/json"}


def _deadline(deadline_ms: int | None) -> dict[str, str]:
    headers = dict(_JSON_BODY)
    if deadline_ms is not None:
        headers["X-Request-Timeout-Ms"] = str(int(deadline_ms))
    return headers


def find_model(models: list[ModelInfo], name: str) -> ModelInfo:
    for m in models:
        if m.name == name:
            return m
    raise NotFound(f"unknown model {name!r}", status=404, code="not_found")
