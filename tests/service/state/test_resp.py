"""The store's multiplexed Redis connection against a real redis-server (and, for the failure cases, a
socket that never answers or hangs up)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvloop

from service.state.resp import Endpoint, ReplyError, RespConnection

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Both event loops the service may run on (uvicorn picks uvloop when installed)."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


def test_concurrent_commands_share_one_connection_and_each_gets_its_own_reply(
    run: Runner, redis_url: str, redis_prefix: str
) -> None:
    async def scenario() -> None:
        conn = RespConnection.from_url(redis_url)
        try:
            keys = [f"{redis_prefix}k{i}" for i in range(300)]
            await asyncio.gather(*(conn.execute("SET", key, f"v{i}") for i, key in enumerate(keys)))
            got = await asyncio.gather(*(conn.execute("GET", key) for key in keys), conn.execute("MGET", *keys))
            assert got[:-1] == [f"v{i}".encode() for i in range(300)]
            assert got[-1] == got[:-1]
            ids = await asyncio.gather(*(conn.execute("CLIENT", "ID") for _ in range(50)))
            assert len(set(ids)) == 1  # one socket for all of them
            counter = redis_prefix + "n"
            assert await conn.pipeline(("INCR", counter), ("GET", keys[1]), ("INCR", counter)) == [1, b"v1", 2]
        finally:
            await conn.close()

    run(scenario())


def test_an_error_reply_raises_and_the_connection_serves_on(run: Runner, redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> None:
        conn = RespConnection.from_url(redis_url)
        try:
            await conn.execute("SET", redis_prefix + "s", "text")
            with pytest.raises(ReplyError, match="WRONGTYPE"):
                await conn.execute("HGET", redis_prefix + "s", "f")
            with pytest.raises(ReplyError, match="NOSCRIPT"):
                await conn.execute("EVALSHA", "0" * 40, 0)
            replies = await conn.pipeline(("INCR", redis_prefix + "s"), ("GET", redis_prefix + "s"))
            assert isinstance(replies[0], ReplyError) and replies[1] == b"text"
            assert await conn.execute("EVAL", "return {1, 'two', {3}}", 0) == [1, b"two", [3]]
        finally:
            await conn.close()

    run(scenario())


@pytest.fixture
def silent_server() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP server that accepts connections, reads and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    server.settimeout(0.05)
    stop = False

    def accept_loop() -> None:
        while not stop:
            try:
                client, _ = server.accept()
                accepted.append(client)
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop = True
    thread.join()
    for client in accepted:
        client.close()
    server.close()


def test_no_reply_within_the_timeout_fails_every_command_in_flight(
    run: Runner,
    silent_server: tuple[int, list[socket.socket]],
) -> None:
    port, _ = silent_server

    async def scenario() -> float:
        conn = RespConnection(Endpoint(port=port), timeout_s=0.2)
        started = time.monotonic()
        results = await asyncio.gather(*(conn.execute("GET", f"k{i}") for i in range(5)), return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results
        await conn.close()
        return time.monotonic() - started

    assert run(scenario()) < 1.0


def test_a_dropped_connection_fails_what_is_in_flight_and_the_next_command_reconnects(
    run: Runner, redis_url: str, silent_server: tuple[int, list[socket.socket]]
) -> None:
    port, accepted = silent_server

    async def scenario() -> None:
        conn = RespConnection(Endpoint(port=port), timeout_s=5.0)
        in_flight = asyncio.ensure_future(conn.execute("GET", "k"))
        for _ in range(100):
            if accepted:
                break
            await asyncio.sleep(0.01)
        accepted[0].close()  # the server hangs up
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(in_flight, 2.0)
        await conn.close()

        real = RespConnection.from_url(redis_url)
        try:
            first = await real.execute("CLIENT", "ID")
            killer = redis.Redis.from_url(redis_url)
            killer.client_kill_filter(_id=first)
            killer.close()
            await asyncio.sleep(0.05)
            second = await real.execute("CLIENT", "ID")  # the dropped socket is noticed; a new one opens
            assert second != first
        finally:
            await real.close()

    run(scenario())


def test_nobody_listening_fails_fast_with_a_connection_error(run: Runner) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario() -> None:
        conn = RespConnection(Endpoint(port=port), timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            await conn.execute("PING")
        assert time.monotonic() - started < 0.5

    run(scenario())


def test_password_database_and_unix_socket_urls(run: Runner, tmp_path: Path) -> None:
    """URLs as redis-py reads them: AUTH and SELECT on connect, over TCP and over a unix socket."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unix = tmp_path / "redis.sock"
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    options = f"--port {port} --bind 127.0.0.1 --unixsocket {unix} --appendonly no --requirepass s3cret"
    proc = subprocess.Popen(
        [server, *options.split(), "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        check = redis.Redis(port=port, password="s3cret", db=3)
        for _ in range(100):
            try:
                check.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)

        async def scenario() -> None:
            tcp = RespConnection.from_url(f"redis://:s3cret@127.0.0.1:{port}/3")
            over_unix = RespConnection.from_url(f"unix://:s3cret@{unix}?db=3")
            wrong = RespConnection.from_url(f"redis://:nope@127.0.0.1:{port}/3")
            try:
                await tcp.execute("SET", "k", "over tcp")
                assert await over_unix.execute("GET", "k") == b"over tcp"
                with pytest.raises(ReplyError):
                    await wrong.execute("GET", "k")
            finally:
                for conn in (tcp, over_unix, wrong):
                    await conn.close()

        run(scenario())
        assert check.get("k") == b"over tcp" and redis.Redis(port=port, password="s3cret").get("k") is None
        check.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
