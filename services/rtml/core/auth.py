"""Scoped API keys (``RTML_API_KEYS=key1:ingest+read,key2:admin``), compared in constant time."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal

from rtml.core.errors import ConfigError, Forbidden, Unauthorized

Scope = Literal["ingest", "predict", "admin", "read"]
SCOPES: frozenset[str] = frozenset({"ingest", "predict", "admin", "read"})


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
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, scopes = part.rpartition(":")
            if not sep or not key:
                raise ConfigError("RTML_API_KEYS: each entry must be key:scope1+scope2")
            wanted = frozenset(s.strip() for s in scopes.split("+") if s.strip())
            unknown = wanted - SCOPES
            if unknown or not wanted:
                raise ConfigError(f"RTML_API_KEYS: unknown scope(s) {sorted(unknown)}; use {sorted(SCOPES)}")
            keys.append((key.encode(), wanted))
        return cls(tuple(keys))

    def check(self, authorization: str | None, scope: Scope) -> None:
        """Raise 401 without a known key, 403 when the key lacks ``scope``. No-op when keys are not set."""
        if not self.keys:
            return
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("missing API key: send Authorization: Bearer KEY")
        given = authorization[len("Bearer ") :].strip().encode()
        found: frozenset[str] | None = None
        for key, scopes in self.keys:  # compare against every key: no early exit timing leak
            if hmac.compare_digest(given, key):
                found = scopes
        if found is None:
            raise Unauthorized("unknown API key")
        if scope not in found and "admin" not in found:
            raise Forbidden(f"this API key lacks the {scope!r} scope")
