"""What `saco serve` runs (the one way the service starts): the checks that would stop a start, then the app
under uvicorn (one worker; scale with processes sharing one Redis)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from pydantic import ValidationError
from redis.asyncio.connection import parse_url

from service.app import create_app
from service.jsonlog import redact
from service.policy import LoadedPolicy, PolicyRejected, load_policy
from service.settings import Settings

# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let freed blocks up to `mmap_threshold` bytes stay in the process (glibc only; False elsewhere).

    By default glibc maps each block above ~128 KB-32 MB afresh and unmaps it when freed, so a forward's
    [users x steps, width] buffers come back from the kernel zero-filled: at 1,024 users the inference thread
    took ~5,000 page faults a second (~100 per forward). With these thresholds they are reused."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def pin_process(cpus: set[int], pid: int | None = None) -> None:
    """Every thread of process `pid` (this one by default) on `cpus` (Linux): the threads already running
    (here: those BLAS and OpenMP started at import) one by one; threads started later (the inference
    thread) inherit it from the thread that starts them."""
    try:
        for thread in os.listdir(f"/proc/{pid or 'self'}/task"):
            os.sched_setaffinity(int(thread), cpus)
    except OSError as exc:
        raise ValueError(
            f"SACO_CPUS: cannot run on CPUs {sorted(cpus)} ({exc.strerror}); this process may use "
            f"{sorted(os.sched_getaffinity(0))}"
        ) from None


class StartupError(RuntimeError):
    """The service cannot start; the message is one line that says why (`saco serve` prints it, exit 2)."""


def load_settings(overrides: dict[str, Any]) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}".removesuffix(".") for e in exc.errors()
        )
        raise StartupError(f"invalid settings (SACO_* environment): {redact(problems)}") from None


def check_redis_url(url: str) -> None:
    """StartupError unless `url` is a Redis URL redis-py can use (an unreachable Redis is no error: the
    service starts and /readyz says it is not ready until Redis answers)."""
    try:
        parse_url(url)
        database = urlsplit(url).path.lstrip("/")
        if url.startswith(("redis://", "rediss://")) and database and not database.isdecimal():
            raise ValueError(f"the database {database!r} is not a number")
    except ValueError as exc:
        raise StartupError(f"invalid Redis URL {redact(url)!r}: {exc}") from None


def check_port(host: str, port: int) -> None:
    """StartupError when nothing can listen on host:port (in use, not an address of this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            sock.bind(address)
        except OSError as exc:
            reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None


def load_current_policy(settings: Settings) -> LoadedPolicy:
    """The store's current version, verified. A current version that fails verification stops the start:
    the service never picks another version by itself (an operator promotes or rolls back)."""
    try:
        return load_policy(settings.store, settings.device)
    except PolicyRejected as exc:
        raise StartupError(
            f"the current model cannot serve, not starting: {exc} "
            "(`saco models rollback` or `saco models promote VERSION` picks one that verifies)"
        ) from None


def run(store: str, host: str = "127.0.0.1", port: int = 8000, redis_url: str | None = None) -> None:
    """Serve the current model of `store`; `redis_url` None falls back to SACO_REDIS_URL, else embedded.
    What would stop the start is checked first and raised as one StartupError: settings, Redis URL,
    port, the current model."""
    overrides: dict[str, Any] = {"store": store}
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    settings = load_settings(overrides)
    if settings.redis_url is not None:
        check_redis_url(settings.redis_url)
    check_port(host, port)
    keep_freed_memory()
    cpus = settings.cpu_set()
    if cpus is not None:
        pin_process(cpus)
    policy = load_current_policy(settings)
    app = create_app(settings)
    app.state.policy = policy  # loaded and verified above: the app's start-up serves it
    serve_app(app, host, port, settings.log_level)


def serve_app(app: Any, host: str, port: int, log_level: str) -> None:
    """`app` under uvicorn as `saco serve` runs it (benchmarks/bench_service.py's HTTP floor runs the same)."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        workers=1,
        access_log=False,
        log_config=None,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=10,
    )
