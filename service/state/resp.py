"""The state store's Redis connection: one multiplexed, pipelined RESP2 connection per process.

Why not redis-py's asyncio client: each of its commands checks a connection out of a pool, runs its retry and
health-check machinery and parses through several layers; measured on this project's 2-core VM, a `MGET`
costs 110-180 us more of event-loop time through it than through this connection (1 and 128 keys;
`benchmarks/profile_decision.py` shows the decision path's three commands). Concurrent requests share the one
socket: each command is written at once and replies are matched in order (Redis answers a connection's
commands in the order they were sent), so concurrent decisions pipeline with no pool and no lock.

Failure model, the same as the store promised with redis-py:
- a command with no reply within `timeout_s` fails with `TimeoutError` and the connection is closed (a
  server that stopped answering makes every command in flight fail, not hang);
- when the connection drops, every command in flight fails with `ConnectionError`;
- the next command connects again (one attempt, bounded by `timeout_s`); nothing is retried, because a
  script may have run before its connection dropped;
- an error reply raises `ReplyError` (its message as Redis wrote it, e.g. starting with ``NOSCRIPT``).
URLs as redis-py reads them (`redis.connection.parse_url`): ``redis://[[user]:password@]host[:port][/db]``,
``rediss://`` (TLS with the system's default verification) and ``unix:///path?db=N``.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis.connection import parse_url
from redis.exceptions import DataError


class ReplyError(Exception):
    """An error reply from Redis."""


def pack_command(args: tuple[Any, ...]) -> bytes:
    """One command in RESP, byte for byte as redis-py's `Connection.pack_command` writes it (utf-8 strings,
    ints and floats by repr, a multi-word first argument split), packed by hiredis in C: redis-py re-joins
    its whole buffer once per argument, and even a Python loop costs ~0.5 us per argument (a 128-user
    decision sends ~650)."""
    first = args[0].encode() if isinstance(args[0], str) else args[0]
    if b" " in first:
        args = (*first.split(), *args[1:])
    try:
        return cast(bytes, hiredis.pack_command(args))
    except TypeError:
        pass
    # hiredis takes str, bytes, memoryview, int and float: the rest is converted or refused as redis-py does
    converted = []
    for arg in args:
        if isinstance(arg, bytearray):
            arg = bytes(arg)
        elif isinstance(arg, bool) or not isinstance(arg, str | bytes | memoryview | int | float):
            raise DataError(
                f"Invalid input of type: {type(arg).__name__!r}. Convert to a bytes, string, int or float first."
            )
        converted.append(arg)
    return cast(bytes, hiredis.pack_command(tuple(converted)))


@dataclass(frozen=True)
class Endpoint:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket instead of host:port
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        options = parse_url(url)
        return cls(
            host=options.get("host") or "127.0.0.1",
            port=int(options.get("port") or 6379),
            path=options.get("path"),
            db=int(options.get("db") or 0),
            username=options.get("username"),
            password=options.get("password"),
            tls=url.startswith("rediss://"),
        )


class _Protocol(asyncio.Protocol):
    """One socket: writes packed commands, feeds replies to hiredis, resolves the waiting futures in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ReplyError)  # error replies come back as values, not raised
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                future = self.waiting.popleft()
                if not future.done():  # its caller may have given up (cancelled): the reply is dropped
                    future.set_result(reply)
        except hiredis.ProtocolError as exc:
            self.close(ConnectionError(f"unreadable reply from redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(ConnectionError(f"connection to redis lost: {exc or 'closed by the server'}"))

    def send(self, packed: bytes, count: int) -> list[asyncio.Future[Any]]:
        """Write `count` packed commands at once; their replies' futures, in order."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(count)]
        self.transport.write(packed)
        self.waiting.extend(futures)
        return futures

    def close(self, error: BaseException) -> None:
        """Fail every command in flight with `error` and close the socket (idempotent)."""
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class RespConnection:
    def __init__(self, endpoint: Endpoint, *, timeout_s: float = 0.5) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 0.5) -> RespConnection:
        return cls(Endpoint.from_url(url), timeout_s=timeout_s)

    async def execute(self, *args: Any) -> Any:
        """One command; its reply as hiredis gives it (bytes, int, None, lists of those)."""
        (reply,) = await self.pipeline(args)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def pipeline(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Several commands in one write (not a transaction); replies in order, error replies as
        `ReplyError` values."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        return await self._roundtrip(protocol, commands)

    async def close(self) -> None:
        if self._protocol is not None:
            self._protocol.close(ConnectionError("connection closed by the service"))
            self._protocol = None

    async def _roundtrip(self, protocol: _Protocol, commands: tuple[tuple[Any, ...], ...]) -> list[Any]:
        futures = protocol.send(b"".join([pack_command(c) for c in commands]), len(commands))

        def expire() -> None:
            protocol.close(TimeoutError(f"no reply from redis within {self.timeout_s} s"))

        timer = asyncio.get_running_loop().call_later(self.timeout_s, expire)
        try:
            return [await future for future in futures]
        finally:
            timer.cancel()
            for future in futures:  # after a failure: the others' exceptions count as seen (no log noise)
                if future.done() and not future.cancelled():
                    future.exception()

    async def _connect(self) -> _Protocol:
        async with self._connecting:  # concurrent first commands open one connection, not one each
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            endpoint, loop = self.endpoint, asyncio.get_running_loop()
            opening = (
                loop.create_unix_connection(_Protocol, endpoint.path)
                if endpoint.path
                else loop.create_connection(
                    _Protocol,
                    endpoint.host,
                    endpoint.port,
                    ssl=ssl.create_default_context() if endpoint.tls else None,
                )
            )
            _, protocol = await asyncio.wait_for(opening, self.timeout_s)
            setup: list[tuple[Any, ...]] = []
            if endpoint.password is not None:
                user = () if endpoint.username is None else (endpoint.username,)
                setup.append(("AUTH", *user, endpoint.password))
            if endpoint.db:
                setup.append(("SELECT", endpoint.db))
            if setup:
                replies = await self._roundtrip(protocol, tuple(setup))
                failed = [r for r in replies if isinstance(r, ReplyError)]
                if failed:
                    protocol.close(ConnectionError("redis refused the connection setup"))
                    raise failed[0]
            self._protocol = protocol
            return protocol
