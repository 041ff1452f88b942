"""`saco serve`: run the app under uvicorn (one worker; scale with processes sharing one Redis)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

import uvicorn

from service.app import create_app
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


def run(store: str, host: str = "127.0.0.1", port: int = 8000, redis_url: str | None = None) -> None:
    """Serve the current model of `store`; `redis_url` None falls back to SACO_REDIS_URL, else embedded."""
    overrides: dict[str, Any] = {"store": store}
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    settings = Settings(**overrides)
    keep_freed_memory()
    cpus = settings.cpu_set()
    if cpus is not None:
        pin_process(cpus)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=host,
        port=port,
        workers=1,
        access_log=False,
        log_config=None,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="run the SACO decision service")
    parser.add_argument("--store", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--redis-url", default=None)
    ns = parser.parse_args()
    run(ns.store, ns.host, ns.port, ns.redis_url)
