"""One error hierarchy for every service.

Errors carry their HTTP status, a stable machine code and, for consumers, whether a retry can help
(``retriable``): a retriable error pauses and retries, a non-retriable one sends the record to the
dead-letter topic with the reason. ``rtml.core.app`` maps them to the contract's JSON error shape.
"""

from __future__ import annotations

from typing import Any


class RtmlError(Exception):
    status: int = 500
    code: str = "internal"
    retriable: bool = False

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        return {"error": err}

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(RtmlError):
    status = 400
    code = "bad_request"


# problems listed in a 422: a body of 100,000 bad keys must not get a 100,000-entry answer
MAX_DETAILS = 100


class InvalidInput(RtmlError):
    """The caller sent something that does not validate; ``details`` names each bad field (at most
    ``MAX_DETAILS`` of them, the message saying how many there were)."""

    status = 422
    code = "invalid"


class Unauthorized(RtmlError):
    """No API key, or not a known one (RFC 9110: a 401 names the scheme to use)."""

    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(RtmlError):
    status = 403
    code = "forbidden"


class NotFound(RtmlError):
    status = 404
    code = "not_found"


class PayloadTooLarge(RtmlError):
    status = 413
    code = "payload_too_large"


class Overloaded(RtmlError):
    """Too much work in flight: refused at once (503 + Retry-After) rather than queued into timeouts."""

    status = 503
    code = "overloaded"
    retriable = True

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ConfigError(RtmlError):
    """The platform config (rtml.yaml) is invalid; the message names the bad key."""

    code = "config"


class DependencyUnavailable(RtmlError):
    """Kafka or Redis cannot be reached: 503 with Retry-After; consumers retry."""

    status = 503
    code = "unavailable"
    retriable = True

    def __init__(self, dependency: str, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, details={"dependency": dependency})
        self.dependency = dependency
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class UnprocessableRecord(RtmlError):
    """A consumed record that can never be processed: it goes to the dead-letter topic."""

    code = "unprocessable"
    retriable = False
