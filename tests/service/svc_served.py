"""Real service processes (`python -m service.server`) for the served-process tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.state.servers import free_port

ADMIN_TOKEN = "served-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REPO = Path(__file__).resolve().parents[2]


def wait_ready(base: str, timeout_s: float = 60.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} not ready (status {status}) within {timeout_s}s")


@contextmanager
def serve(
    store: Path,
    redis_url: str | None,
    *,
    prefix: str = "saco:",
    count: int = 1,
    ready_status: int = 200,
    log_dir: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[list[str]]:
    """`count` service processes on free ports; yields their base URLs; SIGTERM on exit."""
    env = dict(
        os.environ,
        SACO_ADMIN_TOKEN=ADMIN_TOKEN,
        SACO_REDIS_PREFIX=prefix,
        SACO_DEVICE="cpu",
        **(extra_env or {}),
    )
    env.pop("SACO_REDIS_URL", None)
    procs: list[subprocess.Popen[bytes]] = []
    bases: list[str] = []
    try:
        for i in range(count):
            port = free_port()
            cmd = [sys.executable, "-m", "service.server", "--store", str(store), "--port", str(port)]
            if redis_url:
                cmd += ["--redis-url", redis_url]
            log = open(log_dir / f"service-{i}.log", "wb") if log_dir else subprocess.DEVNULL  # noqa: SIM115
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log))
            bases.append(f"http://127.0.0.1:{port}")
        for base in bases:
            wait_ready(base, status=ready_status)
        yield bases
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
