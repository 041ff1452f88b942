"""Two service processes on one Redis: a version announced on the models channel reaches both over real
HTTP while decisions keep flowing, and none of them fails."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import redis
from svc_served import ADMIN, serve

from model_store import ModelStore

COUPONS = [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}]


def test_every_replica_reloads_an_announced_version_with_no_failed_request(
    model_store_dir: Path, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    store = ModelStore(model_store_dir)
    current = store.load()
    features = [0.1] * current.manifest.feature_dim
    publisher = redis.Redis.from_url(redis_url)
    channel = f"{redis_prefix}models"
    statuses: list[int] = []
    versions: dict[str, list[str]] = {}
    stop = threading.Event()

    def traffic(base: str) -> None:
        with httpx.Client(timeout=30) as http:
            n = 0
            while not stop.is_set():
                body = {"requests": [{"user_id": f"{base}-{n}-{i}", "features": features} for i in range(4)]}
                resp = http.post(base + "/v1/campaigns/c/decisions", json=body)
                statuses.append(resp.status_code)
                if resp.status_code == 200:
                    versions.setdefault(base, []).append(resp.json()["decisions"][0]["model_version"])
                n += 1

    with serve(model_store_dir, redis_url, prefix=redis_prefix, count=2, log_dir=tmp_path) as bases:
        httpx.put(bases[0] + "/v1/admin/campaigns/c", json={"budget": 100000.0, "coupons": COUPONS}, headers=ADMIN)
        deadline = time.monotonic() + 30
        while dict(publisher.pubsub_numsub(channel)).get(channel.encode(), 0) < 2:
            assert time.monotonic() < deadline, "the replicas never subscribed to the models channel"
            time.sleep(0.05)
        manifest = current.manifest.to_json()
        for key in ("version", "created_at", "model_sha256"):
            manifest.pop(key)
        new = store.publish(current.model_path, manifest).version
        threads = [threading.Thread(target=traffic, args=(base,)) for base in bases]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            publisher.publish(channel, new)
            deadline = time.monotonic() + 30
            while {httpx.get(base + "/readyz").json()["model_version"] for base in bases} != {new}:
                assert time.monotonic() < deadline, "a replica did not reload the announced version"
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    publisher.close()
    assert statuses and set(statuses) == {200}
    for base in bases:
        assert versions[base][0] == current.version and versions[base][-1] == new
