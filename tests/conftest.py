"""Shared fixtures: real Redis servers (standalone: SACO_TEST_REDIS_URL or a throwaway redis-server; a
throwaway 3-master Cluster; the embedded store's private server) and a model store
holding an artifact produced by the project pipeline (`saco simulate` + `saco train`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# tests/service mirrors the package layout; keep the repository root first on sys.path so that
# `import service` is the real package, not a namespace merged with tests/service.
sys.path.insert(0, str(REPO))

from offline.logs import Logs, validate_table  # noqa: E402
from offline.train import TrainConfig, TrainResult, train  # noqa: E402
from research.simulate import simulate_logs  # noqa: E402
from research.world import WorldConfig  # noqa: E402
from service.state.embedded import EmbeddedRedis  # noqa: E402
from service.state.servers import start_cluster, start_redis  # noqa: E402


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A standalone Redis that tests may write to (under their own key prefix only):
    SACO_TEST_REDIS_URL, else a throwaway redis-server."""
    configured = os.environ.get("SACO_TEST_REDIS_URL")
    if configured:
        if not _redis_answers(configured):
            pytest.fail(f"SACO_TEST_REDIS_URL={configured} does not answer")
        yield configured
        return
    with start_redis() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A throwaway 3-master Redis Cluster (no replicas); the URL names one of its nodes."""
    with start_cluster(masters=3) as cluster:
        yield cluster.url


def delete_prefixed(url: str, prefix: str) -> None:
    """Delete every key under `prefix` (on every master of a Cluster) and nothing else."""
    import redis
    import redis.cluster

    client = redis.Redis.from_url(url)
    if client.info("cluster").get("cluster_enabled"):
        cluster = redis.cluster.RedisCluster.from_url(url)
        nodes = [redis.Redis(host=n.host, port=n.port) for n in cluster.get_primaries()]
        cluster.close()
    else:
        nodes = [client]
    for node in nodes:
        keys = list(node.scan_iter(match=prefix.replace("[", "\\[") + "*", count=1000))
        for key in keys:  # one by one: on a Cluster the keys of one node span many slots
            node.delete(key)
        node.close()
    client.close()


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A unique key prefix; every key under it is deleted after the test (and nothing else)."""
    prefix = f"saco-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    for name in ("redis_url", "redis_cluster_url"):
        if name in request.fixturenames:
            delete_prefixed(request.getfixturevalue(name), prefix)


@pytest.fixture(params=["standalone", "cluster", "embedded"])
def store_kind(request: pytest.FixtureRequest) -> str:
    """The three ways the state store runs: a standalone Redis, a 3-master Cluster, and the embedded
    store's private redis-server (the zero-configuration default)."""
    return str(request.param)


@pytest.fixture
def store_url(store_kind: str, request: pytest.FixtureRequest, redis_prefix: str, tmp_path: Path) -> Iterator[str]:
    """The URL of a Redis of `store_kind` for this test (keys under `redis_prefix`, removed afterwards)."""
    if store_kind == "embedded":
        embedded = EmbeddedRedis(tmp_path / "state")
        try:
            yield embedded.start()
        finally:
            embedded.stop()
        return
    url = request.getfixturevalue("redis_cluster_url" if store_kind == "cluster" else "redis_url")
    try:
        yield url
    finally:
        delete_prefixed(url, redis_prefix)


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


# the smallest logs and model of the pipeline (offline, loop and research tests)
@pytest.fixture(scope="session")
def tiny_logs() -> Logs:
    return validate_table(simulate_logs(WorldConfig(users=300, rounds=5, seed=0)))


@pytest.fixture(scope="session")
def tiny_model(tiny_logs: Logs) -> TrainResult:
    return train(tiny_logs, TrainConfig(epochs=2, d_model=32, context_length=4), progress=False)
