"""Two service processes on one Redis: a version announced on the models channel reaches both over real
HTTP while decisions keep flowing, and none of them fails."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow.compute as pc
import pyarrow.parquet as pq
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


def test_saco_calibrate_reaches_every_replica_serving_the_version(
    model_store_dir: Path, trained_store: Path, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """`saco calibrate --redis-url` records a calibration of the serving version and announces it: both
    replicas serve its lambda, the version unchanged, its files as published."""
    logs = trained_store.parent / "logs.parquet"  # what the store's model was trained on
    # above the spend floor of the store's one-epoch model (it gives coupons however high lambda prices them)
    budget = round(0.9 * pc.sum(pq.read_table(logs)["cost"]).as_py(), 2)
    version = ModelStore(model_store_dir).current_version()
    version_dir = model_store_dir / "versions" / str(version)
    published = {path.name: path.read_bytes() for path in version_dir.iterdir()}
    publisher = redis.Redis.from_url(redis_url)
    channel = f"{redis_prefix}models"
    with serve(model_store_dir, redis_url, prefix=redis_prefix, count=2, log_dir=tmp_path) as bases:
        httpx.put(bases[0] + "/v1/admin/campaigns/c", json={"budget": 100000.0, "coupons": COUPONS}, headers=ADMIN)
        deadline = time.monotonic() + 30
        while dict(publisher.pubsub_numsub(channel)).get(channel.encode(), 0) < 2:
            assert time.monotonic() < deadline, "the replicas never subscribed to the models channel"
            time.sleep(0.05)
        args = ["--store", str(model_store_dir), "--logs", str(logs), "--budget", str(budget)]
        done = subprocess.run(
            [sys.executable, "-m", "saco", "calibrate", *args, "--redis-url", redis_url, "--prefix", redis_prefix],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["version"] == version and result["announced_to"] == 2
        deadline = time.monotonic() + 30
        while {httpx.get(base + "/readyz").json()["calibration"] for base in bases} != {result["calibration"]}:
            assert time.monotonic() < deadline, "a replica did not load the announced calibration"
            time.sleep(0.1)
        for base in bases:
            view = httpx.get(base + "/v1/admin/campaigns/c", headers=ADMIN).json()
            assert view["lambda"] == result["lambda"] and view["calibration"] == result["calibration"]
            assert httpx.get(base + "/readyz").json()["model_version"] == version
    publisher.close()
    assert {path.name: path.read_bytes() for path in version_dir.iterdir()} == published
