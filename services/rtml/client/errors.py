"""Typed errors of :mod:`rtml.client`, mirroring the services' error JSON ``{"error": {"code", "message"}}``.

Every error the client raises is an :class:`RtmlError`; catch that to catch them all. HTTP answers map by
status (401 :class:`Unauthorized`, 403 :class:`Forbidden`, 404 :class:`NotFound`, 400/422
:class:`InvalidRequest`, 413 :class:`PayloadTooLarge`, 409 :class:`Conflict`, 429/503 :class:`Unavailable`);
a request that never got an answer is a :class:`TransportError` (:class:`Timeout` when it timed out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem of a refused request: ``index`` of the event in the list given to ``send_events`` (None
    for a single object), the dotted ``field`` and a readable ``message``."""

    index: int | None
    field: str
    message: str


class RtmlError(Exception):
    """An error from rtml: ``status`` (None when no HTTP answer came), ``code`` (the contract's machine code,
    e.g. ``not_found``), ``message``, ``details`` (the error's ``details`` as sent, if any).

    ``send_events`` also sets ``accepted`` (events the platform accepted, in earlier requests of the same
    call, before this failure) and ``event_ids`` (every event's id, in the order given): sending the same
    events again with these ids is safe, the platform counts each ``event_id`` once.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str = "error", details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details
        self.accepted: int | None = None
        self.event_ids: list[str] | None = None

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"


class InvalidRequest(RtmlError):
    """400/422: the request does not validate. ``errors`` names each bad field (and event index)."""

    @property
    def errors(self) -> list[FieldError]:
        out: list[FieldError] = []
        if isinstance(self.details, list):
            for d in self.details:
                if isinstance(d, dict):
                    index = d.get("index")
                    out.append(FieldError(index if isinstance(index, int) else None, str(d.get("field", "")),
                                          str(d.get("message", ""))))  # fmt: skip
        return out


class Unauthorized(RtmlError):
    """401: no API key, or an unknown one."""


class Forbidden(RtmlError):
    """403: the API key lacks the route's scope."""


class NotFound(RtmlError):
    """404: unknown model, version, entity or route."""


class Conflict(RtmlError):
    """409: the request conflicts with the current state (e.g. another rollout runs)."""


class PayloadTooLarge(RtmlError):
    """413: the body is over the service's cap (the client splits event batches so this should not happen)."""


class Unavailable(RtmlError):
    """503 (a dependency is down, or ``overloaded``) or 429, still failing after the client's retries.
    ``retry_after``: the server's ``Retry-After`` in seconds, when it sent one."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "unavailable", details: Any = None,
                 retry_after: float | None = None) -> None:  # fmt: skip
        super().__init__(message, status=status, code=code, details=details)
        self.retry_after = retry_after


class TransportError(RtmlError):
    """No HTTP answer: connection refused or reset, DNS, TLS... (the httpx exception is the ``__cause__``).
    ``maybe_processed``: False when the request surely never reached the server (connect failures)."""

    maybe_processed: bool = True


class Timeout(TransportError):
    """The request timed out (connect, write, read or pool)."""


class BatcherError(RtmlError):
    """Events a background batcher could not send (after the client's retries), raised by ``flush``/``close``.
    ``failures`` holds each failed request's error and its events (with their ``event_id``), so nothing is lost
    silently: send them again (the same ids count once) or store them."""

    def __init__(self, failures: list[tuple[RtmlError, list[dict[str, Any]]]]) -> None:
        n = sum(len(events) for _, events in failures)
        super().__init__(f"{n} event(s) could not be sent; first error: {failures[0][0]}", code="batcher")
        self.failures = failures


class QueueFull(RtmlError):
    """A background batcher's queue stayed full for the whole ``timeout`` of ``add``."""


_BY_STATUS: dict[int, type[RtmlError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
}


def error_for(status: int, code: str, message: str, details: Any, retry_after: float | None) -> RtmlError:
    """The typed error for an HTTP error answer."""
    if status in (429, 502, 503, 504):
        return Unavailable(message, status=status, code=code, details=details, retry_after=retry_after)
    cls = _BY_STATUS.get(status, RtmlError)
    return cls(message, status=status, code=code, details=details)
