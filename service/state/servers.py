"""Starting `redis-server` processes: the embedded store's private server, and the throwaway standalone
servers and 3-master clusters that tests and benchmarks run against. One place knows how."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import redis

CLUSTER_SLOTS = 16384
PR_SET_PDEATHSIG = 1


class RedisServerError(RuntimeError):
    """A redis-server could not be found or did not start (the message says which and why)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """`SACO_REDIS_SERVER`, else `redis-server` on PATH (or Debian's /usr/bin/redis-server)."""
    configured = os.environ.get("SACO_REDIS_SERVER")
    found = configured or shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(found, os.X_OK):
        raise RedisServerError(
            f"no redis-server binary ({found!r} is not executable): install Redis (`apt install redis-server`, "
            "or run scripts/setup), point SACO_REDIS_SERVER at one, or give the service a Redis URL"
        )
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the parent dies (Linux), so that a killed service does
    not leave its private Redis behind; Redis flushes its append-only file on SIGTERM. (Linux sends it
    when the thread that started the child ends: start it from a thread that lives as long as its user.)"""
    name = ctypes.util.find_library("c")
    if name is not None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class RedisServer:
    """A redis-server child process; `url` reaches it. Stop it with `stop()` (or use it as a context)."""

    process: subprocess.Popen[bytes]
    url: str
    directory: Path
    owned_directory: bool = False
    log_path: Path | None = None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.owned_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis(
    *,
    directory: Path | None = None,
    unix_socket: Path | None = None,
    port: int | None = None,
    append_only: bool = False,
    extra_args: tuple[str, ...] = (),
    die_with_parent: bool = False,
    timeout_s: float = 10.0,
    password: str | None = None,
    database: int = 0,
) -> RedisServer:
    """Start a redis-server and wait until it answers PING.

    It listens on `unix_socket` when given (no TCP port then), else on 127.0.0.1:`port` (a free one by
    default). Its files (append-only file, cluster config, log) go to `directory` (a fresh temporary
    directory, removed on stop, by default). With `password` it requires that password (the URL carries
    it); the URL names `database`."""
    owned = directory is None
    directory = Path(tempfile.mkdtemp(prefix="saco-redis-")) if directory is None else directory
    directory.mkdir(parents=True, exist_ok=True)
    args = [redis_server_binary(), "--dir", str(directory), "--save", "", "--daemonize", "no"]
    args += ["--appendonly", "yes" if append_only else "no"]
    if unix_socket is not None:
        args += ["--port", "0", "--unixsocket", str(unix_socket), "--unixsocketperm", "700"]
        url = f"unix://{unix_socket}" + (f"?db={database}" if database else "")
    else:
        port = port or free_port()
        args += ["--port", str(port), "--bind", "127.0.0.1"]
        userinfo = "" if password is None else f":{quote(password, safe='')}@"
        url = f"redis://{userinfo}127.0.0.1:{port}/{database}"
    if password is not None:
        args += ["--requirepass", password]
    log_path = directory / "redis.log"
    args += ["--logfile", str(log_path), *extra_args]
    process = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent if die_with_parent else None,
    )
    server = RedisServer(process, url, directory, owned, log_path)
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                log = log_path.read_text(errors="replace")[-500:] if log_path.exists() else ""
                raise RedisServerError(f"redis-server exited with {process.returncode}: {(stderr or log).strip()}")
            try:
                if client.ping():
                    return server
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RedisServerError(f"redis-server at {url} did not answer within {timeout_s:.0f} s")
            time.sleep(0.02)
    finally:
        client.close()


@dataclass
class RedisCluster:
    """A Redis Cluster of `len(nodes)` masters (no replicas) on 127.0.0.1; `url` names its first node."""

    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(masters: int = 3, timeout_s: float = 30.0) -> RedisCluster:
    """Start `masters` cluster-enabled servers, give each an equal share of the 16,384 slots, join them
    and wait until every node reports `cluster_state:ok`."""
    cluster = RedisCluster()
    try:
        for _ in range(masters):
            # the cluster bus port is given explicitly: its default (port + 10000) may not exist
            bus_port = str(free_port())
            options = ("--cluster-enabled", "yes", "--cluster-node-timeout", "5000", "--cluster-port", bus_port)
            cluster.nodes.append(start_redis(extra_args=options))
        clients = [redis.Redis.from_url(node.url, socket_timeout=5) for node in cluster.nodes]
        bounds = [CLUSTER_SLOTS * i // masters for i in range(masters + 1)]
        for i, client in enumerate(clients):
            client.cluster("ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
        first_port = clients[0].connection_pool.connection_kwargs["port"]
        first_bus_port = clients[0].config_get("cluster-port")["cluster-port"]
        for client in clients[1:]:
            client.cluster("MEET", "127.0.0.1", first_port, first_bus_port)
        deadline = time.monotonic() + timeout_s
        while not all(
            client.cluster("INFO").get("cluster_state") == "ok"
            and int(client.cluster("INFO").get("cluster_known_nodes", 0)) == masters
            for client in clients
        ):
            if time.monotonic() > deadline:
                raise RedisServerError(f"the {masters}-node Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        for client in clients:
            client.close()
        return cluster
    except BaseException:
        cluster.stop()
        raise
