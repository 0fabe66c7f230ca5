"""``rtml.core.early``: load refusals written by uvicorn's HTTP protocol, in a real uvicorn server on a real socket.

What could break: the refused request's body left in the parser (the next request on the connection misread),
answers out of order on a pipelined connection, a refusal sent where HTTP/1.1 does not allow an early answer,
or a uvicorn release that renamed what the protocol subclass uses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import uvicorn

from rtml.bench.rawhttp import RawConnection, build_request
from rtml.cli.serve import Service, _uvicorn_options, create_service_app
from rtml.core.early import Headers, RefusingHttpToolsProtocol, find_gate
from rtml.core.errors import Overloaded, RtmlError
from rtml.core.settings import Settings
from tests.helpers import free_port

HOST = "127.0.0.1"


class App:
    """Answers every request it gets with what it saw; ``early_refusal`` refuses the paths in ``refuse``."""

    def __init__(self) -> None:
        self.reached: list[str] = []
        self.refuse: set[bytes] = set()
        self.asked: list[bytes] = []
        self.release = asyncio.Event()

    def early_refusal(self, method: bytes, path: bytes, headers: Headers) -> RtmlError | None:
        self.asked.append(path)
        if path == b"/bug":
            raise ValueError("a bug in the gate")
        return Overloaded("full, retry shortly") if path in self.refuse else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        self.reached.append(scope["path"])
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if scope["path"] == "/slow":
            await self.release.wait()
        body = orjson.dumps({"path": scope["path"], "body": size})
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(app: Any, **options: Any) -> AsyncIterator[int]:
    port = free_port()
    options = {"lifespan": "off", "log_level": "warning", "proxy_headers": False, **options}
    config = uvicorn.Config(app, host=HOST, port=port, http=RefusingHttpToolsProtocol, **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), task
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


def post(port: int, path: str, body: bytes = b"", **headers: str) -> bytes:
    return build_request("POST", HOST, port, path, body, headers)


async def answer(conn: RawConnection) -> tuple[int, dict[bytes, bytes], bytes]:
    """The next response, or a failure (not a hung suite) when none comes."""
    return await asyncio.wait_for(conn.response(), 5)


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    """Whether the server closes the connection within ``within_s`` (everything before the close is dropped)."""
    try:
        async with asyncio.timeout(within_s):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


async def test_a_refusal_is_written_before_the_app_and_its_body_is_skipped() -> None:
    app = App()
    app.refuse = {b"/refuse"}
    async with serving(app) as port, RawConnection(HOST, port) as conn:
        assert (await conn.exchange(post(port, "/ok", b"12345")))[0] == 200
        # pipelined in one write: a refused request with a body, then an admitted one
        conn.write(post(port, "/refuse", b"x" * 3000) + post(port, "/ok", b"1234567"))
        refused, last = await answer(conn), await answer(conn)
        status, headers, body = refused
        assert status == 503 and headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
        assert orjson.loads(body) == {"error": {"code": "overloaded", "message": "full, retry shortly"}}
        assert b"date" in headers  # the server's default headers, as on its other answers
        # the refused body (3000 bytes) was not read as the next request
        assert (last[0], orjson.loads(last[2])) == (200, {"path": "/ok", "body": 7})
        # and the connection stays usable after a refusal alone
        status, _, body = await conn.exchange(post(port, "/refuse", b"abc"))
        assert status == 503
        assert (await conn.exchange(post(port, "/after")))[0] == 200
    assert app.reached == ["/ok", "/ok", "/after"]  # the refused ones never became an ASGI call


async def test_a_refusal_waits_its_turn_behind_a_request_still_being_answered() -> None:
    """Answers on a connection go out in order: behind an unanswered request, the protocol does not answer
    early and leaves the request to the app (which, in rtml, makes the same decision)."""
    app = App()
    app.refuse = {b"/refuse"}
    async with serving(app) as port, RawConnection(HOST, port) as conn:
        conn.write(post(port, "/slow") + post(port, "/refuse", b"abc"))
        while "/slow" not in app.reached:
            await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):  # nothing may come before /slow's answer
            await asyncio.wait_for(conn.response(), 0.3)
        app.release.set()
        # (the timed-out read consumed nothing: readuntil keeps the buffer on cancellation)
        slow, behind = await answer(conn), await answer(conn)
    assert orjson.loads(slow[2])["path"] == "/slow"
    assert orjson.loads(behind[2]) == {"path": "/refuse", "body": 3}  # answered by the app, in order
    assert app.reached == ["/slow", "/refuse"]


async def test_the_first_request_of_a_connection_refused_with_its_body_then_the_next_is_answered() -> None:
    """A new connection (no request answered on it yet): the refused body, sized or chunked, is discarded and
    the connection serves the next request."""
    app = App()
    app.refuse = {b"/refuse"}
    chunked = (
        b"POST /refuse HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    async with serving(app) as port:
        for refused in (post(port, "/refuse", b"y" * 70_000), chunked):
            async with RawConnection(HOST, port) as conn:
                conn.write(refused)
                status, _, body = await answer(conn)
                assert status == 503 and orjson.loads(body)["error"]["code"] == "overloaded"
                status, _, body = await conn.exchange(post(port, "/next", b"12"))
                assert (status, orjson.loads(body)) == (200, {"path": "/next", "body": 2})
    assert app.reached == ["/next", "/next"]


async def test_an_idle_connection_after_a_refusal_whose_body_came_later_is_closed_on_time() -> None:
    """The keep-alive timeout counts from the end of the refused request, even when its body arrives in a
    later read than its headers."""
    app = App()
    app.refuse = {b"/refuse"}
    async with serving(app, timeout_keep_alive=1) as port:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 503")
            await asyncio.sleep(0.2)
            writer.write(b"body")  # the rest of the refused request, in its own read
            assert await closed_by_server(reader, within_s=5)  # idle 1 s after it: closed
        finally:
            writer.close()
    assert app.reached == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /refuse HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",  # body held back
        b"POST /refuse HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"POST /refuse HTTP/1.0\r\nContent-Length: 2\r\n\r\nok",  # what nginx sends upstream by default
    ],
    ids=["expect-100-continue", "connection-close", "http-1.0"],
)
async def test_a_refusal_the_connection_cannot_outlive_is_answered_then_closed(request_bytes: bytes) -> None:
    app = App()
    app.refuse = {b"/refuse"}
    async with serving(app) as port:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(request_bytes)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 503") and b"connection: close" in head.lower()
            assert await closed_by_server(reader, within_s=5)
        finally:
            writer.close()
    assert app.reached == []


async def test_a_body_framing_the_parser_rejects_gets_one_answer_the_parsers() -> None:
    app = App()
    app.refuse = {b"/refuse"}
    async with serving(app) as port:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(b"POST /refuse HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nxx")
            everything = await asyncio.wait_for(reader.read(), 5)  # the server closes after its answer
        finally:
            writer.close()
    assert everything.startswith(b"HTTP/1.1 400") and everything.count(b"HTTP/1.1") == 1  # no 503 before it
    assert app.asked == []  # the gate was not asked (uvicorn's own path started the app, then the 400)


def test_the_gate_is_found_through_uvicorns_wrapping_middlewares() -> None:
    from uvicorn.middleware.message_logger import MessageLoggerMiddleware
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    app = App()
    wrapped = ProxyHeadersMiddleware(MessageLoggerMiddleware(app))  # type: ignore[arg-type]
    assert find_gate(wrapped) == app.early_refusal
    assert find_gate(object()) is None


async def test_a_gate_that_fails_leaves_the_request_to_the_app(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RefusingHttpToolsProtocol, "_gate_failed", False)
    app = App()
    async with serving(app) as port, RawConnection(HOST, port) as conn:
        for _ in range(3):
            status, _, body = await conn.exchange(post(port, "/bug", b"ok"))
            assert (status, orjson.loads(body)) == (200, {"path": "/bug", "body": 2})  # not the parser's 400
    assert app.asked == [b"/bug"] * 3
    assert caplog.text.count("early_refusal failed") == 1  # once, not once a request


@pytest.mark.parametrize("name", [Service.serving, Service.ingest])
def test_rtml_serve_runs_the_refusing_protocol_on_an_app_it_can_ask(make_settings: Any, name: Service) -> None:
    """uvicorn, as rtml serve configures it, hands the protocol the service's app itself (not wrapped in a
    middleware that hides ``early_refusal``)."""
    s: Settings = make_settings()
    options = _uvicorn_options(s, name)
    assert options["http"] is RefusingHttpToolsProtocol
    config = uvicorn.Config(create_service_app(name, s), **options)
    config.load()
    assert callable(getattr(config.loaded_app, "early_refusal", None))
