"""Refusals written by the HTTP protocol itself, before a request becomes an ASGI task.

Why. When the CPU is the bottleneck, a refusal that goes the usual way waits twice for a busy event loop:
uvicorn parses the request in one turn and only creates the task that runs the app, and so the code that
refuses, for the next turn, after every request already scheduled. Under overload that turn is the long one
(``rtml.core.looplag`` keeps it near ``RTML_MAX_LOOP_LAG_MS``), so the refusal's latency doubles, and every
refusal also pays for a task, a scope, and the ASGI send/receive calls that admitted requests need the CPU for.

``RefusingHttpToolsProtocol`` is uvicorn's httptools protocol with one step added: once a request's headers
are parsed, it asks the app (its ``early_refusal(method, path, headers)``, when the app has one) whether the
request would be refused for load. If so, it writes the 503 straight to the socket in the same callback, and
skips the request's body; the connection stays open for the next request. The app makes the same decision
again for every request that gets through (``FastPath``, ``IngestApp``), so the app refuses the same requests
under any other ASGI server; this only makes the refusal cheaper and sooner under ``rtml serve``.

A request is left to the usual path (and so to the app) when writing at once would break HTTP/1.1: an earlier
request on the connection is still being answered (pipelining: answers go out in order), the client waits for
``100 Continue``, the connection closes after this request, the socket is not being read by the peer (a paused
write), or it asks for an upgrade.

It subclasses uvicorn's protocol class and uses its attributes (``cycle``, ``parser``, ``url``, ``headers``,
``flow``, ``on_response_complete``); ``tests/integration/test_early_refusal.py`` runs it in a real uvicorn
server so a uvicorn release that changes them fails there.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Sequence
from typing import Protocol

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rtml.core.errors import RtmlError

log = logging.getLogger(__name__)

Headers = Sequence[tuple[bytes, bytes]]


class EarlyRefusals(Protocol):
    def early_refusal(self, method: bytes, path: bytes, headers: Headers) -> RtmlError | None:
        """The error to answer at once (counted by the app as it would count its own), or None to go on."""


def response_bytes(exc: RtmlError, default_headers: Headers = ()) -> bytes:
    """A whole HTTP/1.1 response for ``exc``, in the contract's error shape."""
    body = orjson.dumps(exc.to_body())
    lines = [b"HTTP/1.1 %d %s" % (exc.status, http.HTTPStatus(exc.status).phrase.encode())]
    lines += [b"%s: %s" % (name, value) for name, value in default_headers]
    lines += [b"content-type: application/json", b"content-length: %d" % len(body)]
    lines += [b"%s: %s" % (k.lower().encode(), v.encode("latin-1")) for k, v in exc.headers().items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class RefusingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with load refusals answered as soon as the headers are parsed."""

    _refused = False  # the request being parsed was answered: its body is skipped

    def on_message_begin(self) -> None:
        self._refused = False
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        gate = getattr(self.app, "early_refusal", None)
        if gate is not None and self._may_answer_now():
            path = httptools.parse_url(self.url).path  # a bad URL raises the parser's error: a 400, as before
            try:
                refusal = gate(self.parser.get_method(), path, self.headers)
            except Exception:  # a bug here must not become the parser's 400: the app answers instead
                log.exception("early_refusal failed; the request goes to the app")
                refusal = None
            if refusal is not None:
                self._refused = True
                self.transport.write(response_bytes(refusal, self.server_state.default_headers))
                self.on_response_complete()  # counts it, arms the keep-alive timeout, resumes reading
                return
        super().on_headers_complete()

    def _may_answer_now(self) -> bool:
        cycle = self.cycle
        return (
            (cycle is None or cycle.response_complete)
            and not self.expect_100_continue
            and self.parser.should_keep_alive()
            and self.parser.get_http_version() == "1.1"
            and not self.flow.write_paused
            and not self.parser.should_upgrade()
        )

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()
