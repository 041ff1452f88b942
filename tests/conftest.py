"""Shared fixtures: a real Redis (SACO_TEST_REDIS_URL, else a throwaway redis-server) and a model store
holding an artifact produced by the project pipeline (`saco simulate` + `saco train`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# tests/service mirrors the package layout; keep the repository root first on sys.path so that
# `import service` is the real package, not a namespace merged with tests/service.
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis that tests may write to (under their own key prefix only)."""
    configured = os.environ.get("SACO_TEST_REDIS_URL")
    if configured:
        if not _redis_answers(configured):
            pytest.fail(f"SACO_TEST_REDIS_URL={configured} does not answer")
        yield configured
        return
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            if _redis_answers(url):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the throwaway redis-server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A unique key prefix; every key under it is deleted after the test (and nothing else)."""
    import redis

    prefix = f"saco-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix.replace("[", "\\[") + "*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with one version trained by the project pipeline on a small simulated world."""
    root = tmp_path_factory.mktemp("pipeline")
    logs, store = root / "logs.parquet", root / "store"
    saco = str(Path(sys.executable).with_name("saco"))
    _run([saco, "simulate", "--users", "300", "--rounds", "4", "--seed", "1", "--out", str(logs)])
    _run([saco, "train", "--logs", str(logs), "--store", str(store), "--epochs", "1", "--seed", "0"])
    return store


@pytest.fixture
def model_store_dir(trained_store: Path, tmp_path: Path) -> Path:
    """A private copy of the trained store (tests may publish more versions into it)."""
    copy = tmp_path / "store"
    shutil.copytree(trained_store, copy)
    return copy
