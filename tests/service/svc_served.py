"""Real service processes (`saco serve`, through `service.replicas`) for the served-process tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.replicas import replicas

ADMIN_TOKEN = "served-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


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
    """`count` service processes with the tests' admin token, on the CPU; yields their base URLs."""
    env = {"SACO_ADMIN_TOKEN": ADMIN_TOKEN, "SACO_REDIS_PREFIX": prefix, "SACO_DEVICE": "cpu", **(extra_env or {})}
    with replicas(
        store, count, redis_url=redis_url or None, env=env, log_dir=log_dir, ready_status=ready_status, timeout_s=60
    ) as bases:
        yield bases
