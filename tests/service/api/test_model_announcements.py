"""Hot reload by announcement: a version published on the store's `<prefix>models` channel is verified and
served with no failed request; a refused one leaves the incumbent serving. On each kind of store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import redis.cluster
from fastapi.testclient import TestClient
from svc_http import ADMIN, campaign_body, republish, users

from model_store import ModelStore
from service.state.store import StateStore


def subscribed(store: StateStore) -> None:
    """Wait until the service listens on the models channel (on the node its URL names)."""
    node = redis.Redis.from_url(store.url)
    try:
        wait_for(
            lambda: dict(node.pubsub_numsub(store.keys.models_channel)).get(store.keys.models_channel.encode(), 0) >= 1
        )
    finally:
        node.close()


def announce(store: StateStore, version: str) -> None:
    """PUBLISH as a publisher does (on a Cluster, through a Cluster client: any node passes it on)."""
    publisher: Any = (redis.cluster.RedisCluster if store.cluster else redis.Redis).from_url(store.url)
    try:
        publisher.publish(store.keys.models_channel, version)
    finally:
        publisher.close()


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_announced_version_is_served_with_no_failed_request(
    client: TestClient, model_store_dir: Path, feature_dim: int
) -> None:
    store: StateStore = client.app.state.runtime.store  # type: ignore[attr-defined]
    incumbent = client.get("/readyz").json()["model_version"]
    client.put("/v1/admin/campaigns/c", json=campaign_body(1_000_000.0), headers=ADMIN)
    subscribed(store)  # so that the announcement, not the check made on subscribing, brings the new version
    new = republish(model_store_dir)
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def traffic(worker: int) -> None:
        n = 0
        while not stop.is_set():
            resp = client.post("/v1/campaigns/c/decisions", json={"requests": users(8, feature_dim, f"w{worker}-{n}-")})
            versions = {d["model_version"] for d in resp.json()["decisions"]} if resp.status_code == 200 else {None}
            results.extend((resp.status_code, v) for v in versions)
            n += 1

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(results) >= 10)
        announce(store, new)
        wait_for(lambda: client.get("/readyz").json()["model_version"] == new)
        seen = len(results)
        wait_for(lambda: len(results) >= seen + 10)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert {status for status, _ in results} == {200}
    assert results[0][1] == incumbent and results[-1][1] == new
    metrics = client.get("/metrics").text
    assert 'saco_model_announcements_total{result="loaded"} 1.0' in metrics
    assert f'saco_model_info{{calibration="",version="{new}"}} 1.0' in metrics and incumbent not in metrics


def test_an_announced_calibration_of_the_serving_version_is_served(client: TestClient, model_store_dir: Path) -> None:
    """The announcement names the version already serving; the replica loads what changed: its calibration."""
    store: StateStore = client.app.state.runtime.store  # type: ignore[attr-defined]
    version = client.get("/readyz").json()["model_version"]
    client.put("/v1/admin/campaigns/c", json=campaign_body(), headers=ADMIN)
    subscribed(store)
    calibration = ModelStore(model_store_dir).calibrate(version, command="test", lam=0.25).calibration
    assert calibration is not None
    announce(store, version)
    wait_for(lambda: client.get("/readyz").json()["calibration"] == calibration.id)
    view = client.get("/v1/admin/campaigns/c", headers=ADMIN).json()
    assert view["lambda"] == 0.25 and view["calibration"] == calibration.id and view["model_version"] is None
    announce(store, version)  # nothing changed since: not loaded again
    wait_for(lambda: 'saco_model_announcements_total{result="unchanged"} 1.0' in client.get("/metrics").text)
    assert 'saco_model_announcements_total{result="loaded"} 1.0' in client.get("/metrics").text


def test_a_refused_announcement_leaves_the_incumbent_serving(
    client: TestClient, model_store_dir: Path, feature_dim: int
) -> None:
    store: StateStore = client.app.state.runtime.store  # type: ignore[attr-defined]
    incumbent = client.get("/readyz").json()["model_version"]
    corrupt = republish(model_store_dir, make_current=False)
    model = model_store_dir / "versions" / corrupt / "model.pt"
    model.write_bytes(model.read_bytes() + b"tampered")
    subscribed(store)
    announce(store, corrupt)
    announce(store, "../not-a-version")

    def refused() -> bool:
        return 'saco_model_announcements_total{result="refused"} 2.0' in client.get("/metrics").text

    wait_for(refused)
    assert client.get("/readyz").json()["model_version"] == incumbent
    client.put("/v1/admin/campaigns/c", json=campaign_body(), headers=ADMIN)
    decided = client.post("/v1/campaigns/c/decisions", json={"requests": users(1, feature_dim)})
    assert decided.status_code == 200 and decided.json()["decisions"][0]["model_version"] == incumbent
