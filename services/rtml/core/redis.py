"""The one Redis access layer: a pooled asyncio client, key naming, Lua scripts, error mapping.

Keys put the entity in a hash tag (``rtml:{user:u1}:...``) so all keys of one entity live in one
Redis Cluster slot and one Lua call can touch them atomically.

Redis Cluster: ``RTML_REDIS_CLUSTER=true`` (``settings.redis.cluster``) with ``RTML_REDIS_URL`` naming any
node of the cluster (the startup node: the other nodes are discovered from it). Then

- ``connect`` returns redis-py's ``redis.asyncio.cluster.RedisCluster`` (typed as ``Redis``: the command
  API the services use is the same; routing, MOVED/ASK and non-transactional pipelines split per node are
  redis-py's). Transactions (``pipeline(transaction=True)``) and every Lua call must keep to one slot;
  every rtml call site does (their keys share a ``{hash tag}``).
- ``lean_client`` returns ``ClusterResp`` instead of ``Resp`` for the request path: the slot map comes from
  CLUSTER SLOTS, each master gets one pipelined ``Resp`` connection, each command goes to the master of its
  first key's slot, and a batch (``Scripts.run``) becomes ONE pipelined round trip per node, sent to all
  nodes at once. MOVED refreshes the map and resends; ASK sends ``ASKING`` + the command to the importing
  node. Commands of one slot keep their order (so a read after an apply of the same entity sees it);
  commands of different slots are independent, as they are on different nodes.

Single node (the default): ``connect`` and ``Resp`` are unchanged; ``ClusterResp`` is never built.

What a cluster changes at the call sites (audited; no key name changed, single node and cluster share one
layout): the feature store groups each apply/read Lua call by slot whenever its client is a cluster; the
quality store sends its EVALSHA calls one per key, concurrently (redis-py refuses EVALSHA inside a cluster
pipeline); multi-model reads (registry ``live_versions``/``serving_state``/``describe``) are
non-transactional pipelines that redis-py splits per node. The registry's transaction and scripts, the join,
label and due-index scripts, the learning loop's locks and logs each touch one ``{model:..}``,
``{p:..}``, ``{lbl:..}`` or ``{lbl-due:..}`` tag. On a cluster the URL's database must be 0 and unix
sockets are not supported (Redis Cluster has neither).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar, cast

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser  # redis-py's own reply-error mapping
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rtml.core.errors import DependencyUnavailable
from rtml.core.settings import Settings

Redis = aioredis.Redis
T = TypeVar("T")


def connect(settings: Settings) -> Redis:
    """The redis-py client of ``settings``: a ``RedisCluster`` when ``settings.redis.cluster`` (typed as
    ``Redis``: the commands rtml uses have the same signatures; see the module docstring)."""
    r = settings.redis
    if not r.url:
        raise DependencyUnavailable("redis", "RTML_REDIS_URL is not set")
    if r.cluster:
        return cast(
            Redis,
            RedisCluster.from_url(
                r.url,
                max_connections=r.max_connections,
                socket_timeout=r.socket_timeout_s,
                socket_connect_timeout=r.socket_timeout_s,
                health_check_interval=30,
            ),
        )
    return aioredis.Redis.from_url(
        r.url,
        max_connections=r.max_connections,
        socket_timeout=r.socket_timeout_s,
        socket_connect_timeout=r.socket_timeout_s,
        health_check_interval=30,
    )


class Keys:
    """Key names under the configured prefix; ``{...}`` is the Redis Cluster hash tag."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def entity(self, entity: str, entity_id: str) -> str:
        return f"{self.prefix}{{{entity}:{entity_id}}}"

    def feature(self, entity: str, entity_id: str, feature: str) -> str:
        return f"{self.entity(entity, entity_id)}:f:{feature}"

    def seen(self, entity: str, entity_id: str) -> str:
        return f"{self.entity(entity, entity_id)}:seen"

    def models_index(self) -> str:
        """The set of registered model names (its own slot)."""
        return f"{self.prefix}{{models}}"

    def model(self, name: str) -> str:
        return f"{self.prefix}{{model:{name}}}"

    def prediction(self, prediction_id: str) -> str:
        return f"{self.prefix}{{p:{prediction_id}}}"


def script_source(package: str, name: str) -> str:
    """The text of a Lua script shipped in ``package``."""
    return resources.files(package).joinpath(name).read_text(encoding="utf-8")


# Server states a retry can outlive (restart, failover, memory pressure): never a reason to dead-letter.
_TRANSIENT = ("LOADING", "BUSY", "READONLY", "OOM", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS")


def outage(exc: BaseException, what: str = "Redis call") -> DependencyUnavailable | None:
    """``exc`` as the DependencyUnavailable it stands for (a connection failure, a timeout, a server state a
    retry can outlive), or None when it is something else (a bug, a script error): raise that as it is."""
    if (
        isinstance(exc, (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError, SlotNotCoveredError))
        # also raised for misuse (cross-slot keys): only outages are mapped
        or (isinstance(exc, RedisClusterException) and "cannot be connected" in str(exc))
        or (isinstance(exc, RedisError) and any(marker in str(exc) for marker in _TRANSIENT))
    ):
        return DependencyUnavailable("redis", f"{what} failed: {exc}")
    return None


async def guarded(call: Awaitable[T], what: str = "Redis call") -> T:
    """Await a Redis call, mapping connection failures to DependencyUnavailable (503 / consumer retry)."""
    try:
        return await call
    except Exception as exc:
        mapped = outage(exc, what)
        if mapped is None:
            raise
        raise mapped from exc


async def ping(client: Redis, timeout_s: float = 1.0) -> None:
    try:
        await asyncio.wait_for(client.ping(), timeout_s)
    except Exception as exc:
        # str and type: redis-py's repr of its errors hides the message ("network:ConnectionError")
        raise DependencyUnavailable("redis", f"Redis does not answer: {type(exc).__name__}: {exc}") from exc


async def run_pipeline(
    client: Redis, build: Callable[[Pipeline], None], what: str, *, raise_on_error: bool = True
) -> list[Any]:
    """Build a non-transactional pipeline and send it in one round trip. ``raise_on_error=False``: a command's
    error is returned in its place instead of raised (the others of the pipeline may have applied)."""

    async def go() -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            build(pipe)
            return list(await pipe.execute(raise_on_error=raise_on_error))

    return await guarded(go(), what)


# -- the lean client of the request path ------------------------------------------------------------------
Arg = bytes | str | int | float


def pack_commands(commands: Sequence[Sequence[Arg]]) -> bytes:
    """RESP2 encoding of several commands, for one write."""
    out: list[bytes] = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for a in cmd:
            if isinstance(a, bytes):
                b = a
            elif isinstance(a, str):
                b = a.encode()
            elif isinstance(a, int):
                b = b"%d" % a
            else:
                b = repr(float(a)).encode()
            out += (b"$%d\r\n" % len(b), b, b"\r\n")
    return b"".join(out)


def reply_error(err: hiredis.ReplyError) -> RedisError:
    """The exception redis-py raises for the same error reply (NoScriptError, AuthenticationError,
    BusyLoadingError, ReadOnlyError, ...), so ``guarded`` and the NOSCRIPT reload treat both clients alike."""
    exc: RedisError = BaseParser.parse_error(str(err))  # type: ignore[no-untyped-call]
    return exc


class _Waiter:
    __slots__ = ("future", "n", "replies", "sent")

    def __init__(self, future: asyncio.Future[list[Any]], n: int, sent: float) -> None:
        self.future, self.n, self.sent = future, n, sent
        self.replies: list[Any] = []


class _RespProtocol(asyncio.Protocol):
    """Replies arrive in request order: each completes the oldest waiter. A watchdog (one timer per
    connection, not one per call) drops the connection when the oldest call waits longer than ``timeout_s``.

    Writes are gathered until the end of the current loop iteration: requests handled in the same iteration
    (a busy server handles several) reach Redis in one write, one syscall and one wake-up of Redis, and their
    replies tend to come back in one read."""

    def __init__(self, timeout_s: float) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[_Waiter] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.timeout_s = timeout_s
        self._watchdog: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []

    def send(self, data: bytes, waiter: _Waiter) -> None:
        self.waiters.append(waiter)
        if not self._out:
            loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)
            if self._watchdog is None:
                self._watchdog = loop.call_later(self.timeout_s, self._watch)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and self.lost is None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _watch(self) -> None:
        self._watchdog = None
        if not self.waiters or self.lost is not None:
            return
        loop = asyncio.get_running_loop()
        age = loop.time() - self.waiters[0].sent
        if age >= self.timeout_s:
            self.drop(RedisTimeoutError(f"Redis did not answer within {self.timeout_s} s"))
        else:
            self._watchdog = loop.call_later(self.timeout_s - age, self._watch)

    def drop(self, reason: Exception) -> None:
        """Give up on the connection: every waiter fails with ``reason`` (in ``connection_lost``)."""
        self.lost = self.lost or reason
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        try:
            while (reply := self.reader.gets()) is not False:
                w = waiters[0]
                w.replies.append(reply)
                if len(w.replies) == w.n:
                    waiters.popleft()
                    if not w.future.done():  # a caller that gave up (deadline) leaves a cancelled future
                        w.future.set_result(w.replies)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.drop(RedisConnectionError(f"Redis protocol error: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = RedisConnectionError(f"connection to Redis lost: {exc!r}" if exc else "connection closed")
        for w in self.waiters:
            if not w.future.done():
                w.future.set_exception(type(self.lost)(str(self.lost)))
        self.waiters.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


class Resp:
    """A lean, pipelined RESP2 client for the feature store's Lua calls (the request path).

    Why not redis-py here: measured with uvloop, its asyncio client costs ~75 us of CPU per EVALSHA (pool,
    retry wrapper, command packing, stream reader) against ~14 us for this, which is more than the Lua read
    and the model together. One connection carries every concurrent call: Redis answers in order, replies
    complete a FIFO of waiters, and calls made in the same loop iteration share a write. Everything else
    (registry, scripts, admin commands) stays on redis-py.

    Errors are redis-py's (ConnectionError, TimeoutError, ResponseError/NoScriptError), so ``guarded`` maps
    them the same way. A call unanswered after ``timeout_s`` drops the connection (its waiters fail, the
    next call reconnects); more than ``max_pending`` calls waiting fail at once instead of queueing. Callers
    with a tighter budget (serving's deadline) cancel their wait: the late reply is read and discarded.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 2.0,
        max_pending: int = 10_000,
    ) -> None:
        self.host, self.port, self.db, self.path = host, port, db, path
        self._username, self._password, self._ssl = username, password, ssl_context
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._conn: _RespProtocol | None = None
        self._connecting: asyncio.Task[_RespProtocol] | None = None
        self._closed = False

    @classmethod
    def like(cls, client: Redis) -> Resp:
        """A client for the same server, database and credentials as a redis-py client."""
        pool = client.connection_pool
        kw = pool.connection_kwargs
        ctx = None
        if issubclass(pool.connection_class, SSLConnection):
            ctx = ssl.create_default_context(cafile=kw.get("ssl_ca_certs"))
            if kw.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        timeout = kw.get("socket_timeout") or 2.0
        return cls(kw.get("host", "127.0.0.1"), int(kw.get("port", 6379)), db=int(kw.get("db") or 0),
                   username=kw.get("username"), password=kw.get("password"), path=kw.get("path"),
                   ssl_context=ctx, timeout_s=float(timeout))  # fmt: skip

    def _where(self) -> str:
        return self.path or f"{self.host}:{self.port}"

    async def _connect(self) -> _RespProtocol:
        """The live connection, or one being opened. Every caller waiting for a connection shares one
        attempt (a task): a caller that gives up (its deadline) neither aborts it nor leaks it."""
        conn = self._conn
        if conn is not None and conn.lost is None:
            return conn
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.get_running_loop().create_task(self._open())
        return await asyncio.shield(task)

    async def _open(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()

        def factory() -> _RespProtocol:
            return _RespProtocol(self.timeout_s)

        conn: _RespProtocol | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.path:
                    _, conn = await loop.create_unix_connection(factory, self.path)
                else:
                    _, conn = await loop.create_connection(
                        factory, self.host, self.port, ssl=self._ssl, server_hostname=self.host if self._ssl else None
                    )
                    sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
                    if sock is not None:  # a peer or middlebox that vanished is noticed on an idle connection
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                hello: list[list[Arg]] = []
                if self._password is not None:
                    user = [self._username] if self._username else []
                    hello.append(["AUTH", *user, self._password])
                if self.db:
                    hello.append(["SELECT", self.db])
                if hello:
                    await self._send(conn, hello)
        except BaseException as exc:
            if conn is not None:
                conn.drop(RedisConnectionError("closed: the connection could not be set up"))
            if isinstance(exc, (ResponseError, AuthenticationError)):
                raise RedisConnectionError(f"Redis at {self._where()} refused AUTH/SELECT: {exc}") from exc
            if isinstance(exc, (OSError, TimeoutError)):
                raise RedisConnectionError(f"cannot connect to Redis at {self._where()}: {exc!r}") from exc
            raise
        if self._closed:
            conn.drop(RedisConnectionError("client closed"))
            raise RedisConnectionError("the Redis client is closed")
        self._conn = conn
        return conn

    async def _send(self, conn: _RespProtocol, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        replies = await self._send_raw(conn, commands)
        for r in replies:
            if isinstance(r, hiredis.ReplyError):
                raise reply_error(r)
        return replies

    def _send_raw(self, conn: _RespProtocol, commands: Sequence[Sequence[Arg]]) -> asyncio.Future[list[Any]]:
        """Queue ``commands`` on ``conn``; the future gets their replies, error replies included. A plain
        function returning the future (not a coroutine): the request path pays no extra coroutine frame."""
        assert conn.transport is not None
        if conn.lost is not None:
            raise type(conn.lost)(str(conn.lost))
        if len(conn.waiters) >= self.max_pending:
            raise RedisConnectionError(f"{len(conn.waiters)} calls already wait for Redis at {self._where()}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        conn.send(pack_commands(commands), _Waiter(future, len(commands), loop.time()))
        return future

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and conn.lost is None

    async def connect(self) -> None:
        """Open the connection now rather than on the first call (see ``Scripts.warm_up``)."""
        await self._connect()

    async def execute(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send ``commands`` in one write and return their replies (raises the first error reply)."""
        conn = self._conn
        if conn is None or conn.lost is not None:
            conn = await self._connect()
        return await self._send(conn, commands)

    async def execute_raw(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Like ``execute``, but error replies come back as ``hiredis.ReplyError`` values, not raised (the
        cluster client reads MOVED/ASK from them)."""
        conn = self._conn
        if conn is None or conn.lost is not None:
            conn = await self._connect()
        return await self._send_raw(conn, commands)

    async def aclose(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()


SLOTS = 16384
MAX_REDIRECTS = 5
Addr = tuple[str, int]


def first_key(cmd: Sequence[Arg]) -> bytes | None:
    """The key a command is routed by: EVAL/EVALSHA's first KEYS entry, else the first argument; None for a
    command without keys (sent to any node)."""
    name = cmd[0].upper() if isinstance(cmd[0], (str, bytes)) else b""
    if name in ("EVALSHA", "EVAL", b"EVALSHA", b"EVAL"):
        if len(cmd) < 4 or int(cmd[2]) < 1:
            return None
        key = cmd[3]
    elif len(cmd) > 1:
        key = cmd[1]
    else:
        return None
    return key if isinstance(key, bytes) else str(key).encode()


def text(raw: Any) -> str:
    """A Redis reply value as text (redis-py and ``Resp`` return bytes)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class ClusterResp:
    """The lean client (``Resp``) for a Redis Cluster: one pipelined ``Resp`` connection per master, each
    command routed to the master of its first key's hash slot (slot map from CLUSTER SLOTS), one pipelined
    round trip per node for a batch, every node's batch sent at once.

    Redirects: MOVED (a slot changed owner: resharding or failover) refreshes the whole map and resends the
    affected commands; ASK (a slot being migrated) resends the command once to the named node after
    ``ASKING``. Commands of one slot are sent in order on one connection and a redirect moves every command of
    that slot together, so their order holds. A broken connection marks the map stale (the next call reloads
    it: a failover) and raises, as ``Resp`` does. ``node_calls`` counts round trips per node (tests)."""

    def __init__(
        self,
        startup: Sequence[Addr],
        *,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 2.0,
        max_pending: int = 10_000,
    ) -> None:
        if not startup:
            raise ValueError("a cluster client needs at least one startup node")
        self.startup = list(startup)
        self._username, self._password, self._ssl = username, password, ssl_context
        self.timeout_s, self.max_pending = timeout_s, max_pending
        self._nodes: dict[Addr, Resp] = {}
        self._slots: list[Addr] | None = None
        self._refreshing: asyncio.Task[list[Addr]] | None = None
        self.node_calls: collections.Counter[Addr] = collections.Counter()

    @classmethod
    def like(cls, client: RedisCluster) -> ClusterResp:
        """A client for the same cluster and credentials as a redis-py ``RedisCluster``."""
        kw = client.get_connection_kwargs()
        nm = client.nodes_manager
        nodes = [*nm.nodes_cache.values(), *nm.startup_nodes.values()]
        startup = list(dict.fromkeys((n.host, int(n.port)) for n in nodes))
        ctx = None
        conn_class = kw.get("connection_class")
        if isinstance(conn_class, type) and issubclass(conn_class, SSLConnection):
            ctx = ssl.create_default_context(cafile=kw.get("ssl_ca_certs"))
            if kw.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        timeout = kw.get("socket_timeout") or 2.0
        return cls(startup, username=kw.get("username"), password=kw.get("password"), ssl_context=ctx,
                   timeout_s=float(timeout))  # fmt: skip

    def node(self, addr: Addr) -> Resp:
        resp = self._nodes.get(addr)
        if resp is None:
            resp = self._nodes[addr] = Resp(
                addr[0], addr[1], username=self._username, password=self._password, ssl_context=self._ssl,
                timeout_s=self.timeout_s, max_pending=self.max_pending,
            )  # fmt: skip
        return resp

    async def slot_map(self, *, refresh: bool = False) -> list[Addr]:
        """Slot -> master address; loaded once, reloaded on ``refresh`` (concurrent callers share one load)."""
        if self._slots is not None and not refresh:
            return self._slots
        task = self._refreshing
        if task is None or task.done():
            task = self._refreshing = asyncio.get_running_loop().create_task(self._load_map())
        return await asyncio.shield(task)

    @property
    def connected(self) -> bool:
        """Every master of the slot map has an open connection (False before the map is loaded)."""
        slots = self._slots
        return slots is not None and all(
            (node := self._nodes.get(addr)) is not None and node.connected for addr in set(slots)
        )

    async def connect(self) -> None:
        """Load the slot map and open a connection to every master now rather than on the first calls."""
        for addr in sorted(set(await self.slot_map())):
            await self.node(addr).connect()

    async def _load_map(self) -> list[Addr]:
        known = list(dict.fromkeys([*(self._slots or []), *self.startup]))
        last: Exception | None = None
        for addr in known:
            try:
                (reply,) = await self.node(addr).execute([("CLUSTER", "SLOTS")])
            except (RedisError, OSError) as exc:
                last = exc
                continue
            slots: list[Addr | None] = [None] * SLOTS
            for entry in reply:
                lo, hi, master = int(entry[0]), int(entry[1]), entry[2]
                host = text(master[0]) or addr[0]  # an empty host means "the address you asked"
                for s in range(lo, hi + 1):
                    slots[s] = (host, int(master[1]))
            missing = slots.count(None)
            if missing:
                last = RedisError(f"CLUSTERDOWN {missing} hash slots are not served (asked {addr[0]}:{addr[1]})")
                continue
            self._slots = cast(list[Addr], slots)
            return self._slots
        raise RedisConnectionError(f"no Redis Cluster node answers CLUSTER SLOTS ({known}): {last!r}") from last

    async def execute(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Replies of ``commands`` in order (raises the first error reply, like ``Resp.execute``)."""
        replies = await self.execute_raw(commands)
        for r in replies:
            if isinstance(r, hiredis.ReplyError):
                raise reply_error(r)
        return replies

    async def execute_raw(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        slots = await self.slot_map()
        keyed = [first_key(c) for c in commands]
        routes: list[Addr] = [slots[key_slot(k)] if k is not None else slots[0] for k in keyed]
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        asking: set[int] = set()
        for attempt in range(MAX_REDIRECTS + 1):
            by_node: dict[Addr, list[int]] = {}
            for i in todo:
                by_node.setdefault(routes[i], []).append(i)
            results = await self._round_trip(commands, by_node, asking)
            todo, asking, moved = [], set(), False
            for i, reply in results:
                replies[i] = reply
                if not isinstance(reply, hiredis.ReplyError) or attempt == MAX_REDIRECTS:
                    continue
                kind, _, rest = str(reply).partition(" ")
                if kind not in ("MOVED", "ASK"):
                    continue
                _, _, where = rest.partition(" ")
                host, _, port = where.rpartition(":")
                target = (host or routes[i][0], int(port))
                todo.append(i)
                if kind == "ASK":
                    asking.add(i)
                    routes[i] = target
                else:
                    moved = True
            if not todo:
                break
            if moved:
                slots = await self.slot_map(refresh=True)
                for i in todo:
                    if i not in asking:
                        k = keyed[i]
                        routes[i] = slots[key_slot(k)] if k is not None else slots[0]
            todo.sort()  # a slot's commands keep their order
        return replies

    async def _round_trip(
        self, commands: Sequence[Sequence[Arg]], by_node: dict[Addr, list[int]], asking: set[int]
    ) -> list[tuple[int, Any]]:
        """Send each node its commands (one pipelined write per node, all nodes at once)."""

        async def one(addr: Addr, idx: list[int]) -> list[tuple[int, Any]]:
            batch: list[Sequence[Arg]] = []
            for i in idx:
                if i in asking:
                    batch.append(("ASKING",))
                batch.append(commands[i])
            self.node_calls[addr] += 1
            got = await self.node(addr).execute_raw(batch)
            out: list[tuple[int, Any]] = []
            pos = 0
            for i in idx:
                pos += i in asking  # skip ASKING's +OK
                out.append((i, got[pos]))
                pos += 1
            return out

        items = list(by_node.items())
        if len(items) == 1:
            pairs = [await self._guard(one(*items[0]))]
        else:
            pairs = await asyncio.gather(*(self._guard(one(a, idx)) for a, idx in items))
        return [p for group in pairs for p in group]

    async def _guard(self, call: Awaitable[list[tuple[int, Any]]]) -> list[tuple[int, Any]]:
        try:
            return await call
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self._slots_stale()
            raise

    def _slots_stale(self) -> None:
        """A node failed: reload the slot map on the next call (a failover moves its slots)."""
        self._slots = None

    async def aclose(self) -> None:
        nodes, self._nodes = list(self._nodes.values()), {}
        for resp in nodes:
            await resp.aclose()


def is_cluster(client: Redis) -> bool:
    """Whether ``client`` is a Redis Cluster client (``connect`` with ``settings.redis.cluster``)."""
    return isinstance(client, RedisCluster)


def lean_client(client: Redis) -> Resp | ClusterResp:
    """The request-path client for the same server (or cluster) as a redis-py client."""
    if isinstance(client, RedisCluster):
        return ClusterResp.like(client)
    return Resp.like(client)


Call = tuple[str, Sequence[Arg], Sequence[Arg]]  # (script name, KEYS, ARGV)


class Scripts:
    """Named Lua scripts run by EVALSHA through ``Resp``: several calls in one round trip, in order (so a
    call sees the effects of the calls before it). Loaded on first use and once more when Redis lost them
    (a restart or SCRIPT FLUSH). The one way the feature store and the join store talk to Redis on their
    hot paths."""

    def __init__(self, client: Redis, sources: dict[str, str]) -> None:
        self.client = client
        self.resp = lean_client(client)
        self._sources = sources
        self._shas: dict[str, str] = {}

    async def load(self) -> dict[str, str]:
        """SCRIPT LOAD every script (idempotent: a script's SHA1 is its text's)."""
        shas = {name: await guarded(self.client.script_load(src), "SCRIPT LOAD") for name, src in self._sources.items()}
        self._shas = shas
        return shas

    @property
    def warm(self) -> bool:
        """The scripts are loaded and the request path's connections are open."""
        return len(self._shas) == len(self._sources) and self.resp.connected

    async def warm_up(self) -> None:
        """Load the scripts and open the request path's connections before the first call. Without it the
        first call after a start pays SCRIPT LOAD and one or two connects, which can exceed a tight deadline
        (serving's 50 ms) on a busy machine and answer ``degraded``. DependencyUnavailable when Redis is
        down (the first call then does it)."""
        await self.load()
        await guarded(self.resp.connect(), "Redis connect")

    async def run(self, calls: Sequence[Call], what: str = "Lua call") -> list[Any]:
        """Replies of ``calls``, in order; DependencyUnavailable when Redis is down or busy. Reloads the
        scripts once when Redis lost them, and retries once on a broken connection (every rtml script is
        safe to run again: reads, deduplicated applies, token-checked joins)."""
        shas = self._shas if len(self._shas) == len(self._sources) else await self.load()
        reloaded = retried = False
        while True:
            commands = [("EVALSHA", shas[name], len(keys), *keys, *args) for name, keys, args in calls]
            try:
                return await guarded(self.resp.execute(commands), what)
            except NoScriptError:
                if reloaded:
                    raise
                reloaded = True
                shas = await self.load()
            except DependencyUnavailable as exc:
                if retried or not isinstance(exc.__cause__, RedisConnectionError):
                    raise
                retried = True  # a connection that died while idle: one fresh attempt

    async def aclose(self) -> None:
        await self.resp.aclose()
