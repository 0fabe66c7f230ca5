"""Scoped API keys (``RTML_API_KEYS=key1:ingest+read,key2:admin``), compared in constant time.

Which scope each route needs is declared on the route (``rtml.core.app.require``, also published in the
OpenAPI document as the operation's ``security``); serving's fast path checks the ``predict`` scope itself
with the same ``ApiKeys.check``. ``tests/integration/test_auth_routes.py`` holds the table of every route."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from rtml.core.errors import ConfigError, Forbidden, RtmlError, Unauthorized

Scope = Literal["ingest", "predict", "admin", "read"]
SCOPES: frozenset[str] = frozenset({"ingest", "predict", "admin", "read"})


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, else None. The scheme is matched without regard
    to case (RFC 9110, 11.1), the token exactly."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if token and scheme.lower() == "bearer" else None


@dataclass(frozen=True, slots=True)
class ApiKeys:
    keys: tuple[tuple[bytes, frozenset[str]], ...]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @classmethod
    def parse(cls, spec: str | None) -> ApiKeys:
        if not spec or not spec.strip():
            return cls(())
        keys = []
        # Errors name the entry by its position, never by its text: an entry written the wrong way round
        # (``ingest:KEY``) would otherwise put the key in the error, and from there in a log.
        for n, part in enumerate(spec.split(","), start=1):
            part = part.strip()
            if not part:
                continue
            key, sep, scopes = part.rpartition(":")
            if not sep or not key:
                raise ConfigError(f"RTML_API_KEYS: entry {n} must be key:scope1+scope2")
            wanted = frozenset(s.strip() for s in scopes.split("+") if s.strip())
            if not wanted or not wanted <= SCOPES:
                raise ConfigError(
                    f"RTML_API_KEYS: entry {n} has an unknown or no scope; scopes are {', '.join(sorted(SCOPES))}"
                )
            keys.append((key.encode(), wanted))
        return cls(tuple(keys))

    def check(self, authorization: str | None, scope: Scope) -> None:
        """Raise 401 without a known key, 403 when the key lacks ``scope`` (a key with ``admin`` has every
        scope). No-op when keys are not set.

        The given key is compared with every configured key by ``hmac.compare_digest``, with no early exit,
        so the time taken says nothing about how much of a key matched nor which key it was (only, as
        ``compare_digest`` documents, whether the lengths differ). Neither error message contains the key."""
        if not self.keys:
            return
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized("missing API key: send Authorization: Bearer KEY")
        given = token.encode()
        found: frozenset[str] | None = None
        for key, scopes in self.keys:  # compare against every key: no early exit timing leak
            if hmac.compare_digest(given, key):
                found = scopes
        if found is None:
            raise Unauthorized("unknown API key")
        if scope not in found and "admin" not in found:
            raise Forbidden(f"this API key lacks the {scope!r} scope")

    def allows(self, headers: Iterable[tuple[bytes, bytes]], scope: Scope) -> bool:
        """Whether raw ASGI/HTTP ``headers`` (lower-case names) carry a key with ``scope``: their first
        ``authorization`` header, as Starlette's ``headers.get`` reads it. For paths that refuse for load
        only a caller ``check`` would let in (and leave the 401/403 to ``check``)."""
        if not self.keys:
            return True
        auth = next((v for k, v in headers if k == b"authorization"), None)
        try:
            self.check(None if auth is None else auth.decode("latin-1"), scope)
        except RtmlError:
            return False
        return True
