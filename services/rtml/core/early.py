"""Refusals written by the HTTP protocol itself, before a request becomes an ASGI task.

Why. When the CPU is the bottleneck, a refusal that goes the usual way waits twice for a busy event loop:
uvicorn parses the request in one turn and only creates the task that runs the app, and so the code that
refuses, for the next turn, after every request already scheduled. Under overload that turn is the long one
(``rtml.core.looplag`` keeps it near ``RTML_MAX_LOOP_LAG_MS``), so the refusal's latency doubles, and every
refusal also pays for a task, a scope, and the ASGI send/receive calls that admitted requests need the CPU for.

``RefusingHttpToolsProtocol`` is uvicorn's httptools protocol with one step added: once a request's headers
are parsed, it asks the app (its ``early_refusal(method, path, headers)``, when the app, or an app it wraps,
has one) whether the request would be refused for load. If so, it writes the 503 straight to the socket in the
same callback; the request's body, if any, is read and discarded as it arrives, and the connection stays open
for the next request (closed after the answer when the client asked for that: ``Connection: close``, HTTP/1.0,
or ``Expect: 100-continue``, whose body may never come). The app makes the same decision again for every
request that gets through (``FastPath``, ``IngestApp``), so the app refuses the same requests under any other
ASGI server; this only makes the refusal cheaper and sooner under ``rtml serve``.

A request is left to the usual path (and so to the app) when an earlier request on the connection is still
being answered (answers go out in order), the peer is not reading (a paused write), it asks for an upgrade,
or its body's framing is one the parser may still reject (a ``Transfer-Encoding`` other than ``chunked``).

It subclasses uvicorn's protocol class and uses its attributes (``app``, ``cycle``, ``parser``, ``url``,
``headers``, ``expect_100_continue``, ``flow``, ``transport``, ``server_state``, ``on_response_complete``,
``_unset_keepalive_if_required``); ``tests/integration/test_early_refusal.py`` runs it in a real uvicorn server
so that a uvicorn release that changes them fails there.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Sequence
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rtml.core.errors import RtmlError

log = logging.getLogger(__name__)

Headers = Sequence[tuple[bytes, bytes]]


def response_bytes(exc: RtmlError, default_headers: Headers = (), *, close: bool = False) -> bytes:
    """A whole HTTP/1.1 response for ``exc``, in the contract's error shape (``close``: the connection ends)."""
    body = orjson.dumps(exc.to_body())
    lines = [b"HTTP/1.1 %d %s" % (exc.status, http.HTTPStatus(exc.status).phrase.encode())]
    lines += [b"%s: %s" % (name, value) for name, value in default_headers]
    lines += [b"content-type: application/json", b"content-length: %d" % len(body)]
    lines += [b"%s: %s" % (k.lower().encode(), v.encode("latin-1")) for k, v in exc.headers().items()]
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def find_gate(app: Any) -> Any:
    """The ``early_refusal`` of ``app`` or of an app it wraps (uvicorn's proxy-headers or trace-logging
    middleware keep the app they wrap as ``.app``), else None."""
    for _ in range(8):
        gate = getattr(app, "early_refusal", None)
        if gate is not None or not hasattr(app, "app"):
            return gate
        app = app.app
    return None


class RefusingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with load refusals answered as soon as the headers are parsed."""

    _refused = False  # the request being parsed was answered: its body is discarded
    _gate_failed = False  # a failing gate is logged once per process, not per request

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate = find_gate(self.app)

    def on_message_begin(self) -> None:
        self._refused = False
        self._unset_keepalive_if_required()  # a refusal's timer must not run while this request does
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        gate = self._gate
        if gate is not None and self._may_answer_now():
            path = httptools.parse_url(self.url).path  # a bad URL raises the parser's error: a 400, as before
            close = (
                self.expect_100_continue  # its body may never come: it cannot be skipped to the next request
                or self.parser.get_http_version() != "1.1"
                or not self.parser.should_keep_alive()
            )
            try:
                refusal = gate(self.parser.get_method(), path, self.headers)
                answer = None if refusal is None else response_bytes(refusal, self.server_state.default_headers,
                                                                     close=close)  # fmt: skip
            except Exception:  # a bug here must not become the parser's 400: the app answers instead
                if not RefusingHttpToolsProtocol._gate_failed:
                    RefusingHttpToolsProtocol._gate_failed = True
                    log.exception("early_refusal failed; such requests go to the app (logged once)")
                answer = None
            if answer is not None:
                self._refused = True
                self.transport.write(answer)
                if close:
                    self.transport.close()
                return
        super().on_headers_complete()

    def _may_answer_now(self) -> bool:
        cycle = self.cycle
        if not (
            (cycle is None or cycle.response_complete)
            and not self.flow.write_paused
            and not self.transport.is_closing()
            and not self.parser.should_upgrade()
        ):
            return False
        for name, value in self.headers:  # a framing the parser may still reject after this callback
            if name == b"transfer-encoding" and value.lower() != b"chunked":
                return False
        return True

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            self.on_response_complete()  # counts it, arms the keep-alive timeout (unless closing)
            return
        super().on_message_complete()
