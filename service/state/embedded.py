"""The zero-configuration state store: a private redis-server that the service starts and stops.

With no Redis URL configured, the service runs the same store (the same Lua scripts, the same keys) on a
redis-server child process of its own: it listens on a Unix socket only (no TCP port to collide with or
expose), keeps its append-only file under `<state dir>` (by default `<model store>/state`), fsynced every
second, so the ledger survives a restart of the service, and is stopped with the service (or, on Linux,
when the service is killed). One service process at a time may use a state directory: a second one is
refused at start. Several service processes share state through a Redis they are all given
(`--redis-url`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from service.state.servers import RedisServer, RedisServerError, start_redis


class EmbeddedRedis:
    """The private redis-server of one service process, with its data in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock: int | None = None
        self._socket_dir: Path | None = None
        self.server: RedisServer | None = None

    def start(self) -> str:
        """Start the server (loading the append-only file if there is one); returns its URL."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RedisServerError(f"cannot create the embedded store's directory {self.directory}: {exc}") from None
        lock = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise RedisServerError(
                f"another service process is using the embedded store in {self.directory}; processes that "
                "share state need a Redis of their own (--redis-url / SACO_REDIS_URL)"
            ) from None
        self._lock = lock
        # a Unix socket path is limited to ~100 bytes: it lives in a short private directory, not with the data
        self._socket_dir = Path(tempfile.mkdtemp(prefix="saco-"))
        try:
            self.server = start_redis(
                directory=self.directory,
                unix_socket=self._socket_dir / "redis.sock",
                append_only=True,
                extra_args=("--appendfsync", "everysec"),
                die_with_parent=True,
            )
        except BaseException:
            self.stop()
            raise
        return self.server.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None
