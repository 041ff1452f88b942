"""The service as real processes over real HTTP: the contract's happy path on every kind of store, and Redis
going away (decisions answer 503 within a bounded time, never a coupon without a reservation)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from svc_served import ADMIN, serve

from service.state.servers import free_port, start_redis

COUPONS = [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}, {"action": 3, "cost": 10.0}]


def _dim(store: Path) -> int:
    from model_store import ModelStore

    return ModelStore(store).load().manifest.feature_dim


def test_served_contract_round_trip(
    store_kind: str, model_store_dir: Path, request: pytest.FixtureRequest, redis_prefix: str, tmp_path: Path
) -> None:
    redis_url = None if store_kind == "embedded" else request.getfixturevalue("store_url")
    prefix = redis_prefix
    feats = [0.1] * _dim(model_store_dir)
    with (
        serve(model_store_dir, redis_url, prefix=prefix, log_dir=tmp_path) as (base,),
        httpx.Client() as http,
    ):
        assert http.get(base + "/healthz").status_code == 200
        assert http.put(base + "/v1/admin/campaigns/c1", json={"budget": 100.0, "coupons": COUPONS}).status_code == 401
        resp = http.put(base + "/v1/admin/campaigns/c1", json={"budget": 100.0, "coupons": COUPONS}, headers=ADMIN)
        assert resp.status_code == 200
        reqs = [{"user_id": "a", "features": feats, "request_id": "x1"}, {"user_id": "b", "features": feats}]
        first = http.post(base + "/v1/campaigns/c1/decisions", json={"requests": reqs})
        assert first.status_code == 200 and len(first.json()["decisions"]) == 2
        d0 = first.json()["decisions"][0]
        again = http.post(base + "/v1/campaigns/c1/decisions", json={"requests": reqs[:1]})
        assert again.json()["decisions"][0] == d0
        out = {"outcomes": [{"decision_id": d0["decision_id"], "reward": 3.0, "cost": 0.0}]}
        assert http.post(base + "/v1/campaigns/c1/outcomes", json=out).json()["accepted"] == 1
        assert http.post(base + "/v1/campaigns/c1/outcomes", json=out).json()["duplicates"] == 1
        bad = http.post(base + "/v1/campaigns/c1/decisions", json={"requests": [{"user_id": "a", "features": ["x"]}]})
        assert bad.status_code == 422
        assert http.post(base + "/v1/campaigns/nope/decisions", json={"requests": reqs}).status_code == 404
        camp = http.get(base + "/v1/admin/campaigns/c1", headers=ADMIN).json()
        assert camp["decisions"] == 2 and camp["spent"] + camp["reserved"] <= camp["budget"]
        metrics = http.get(base + "/metrics").text
        assert 'route="/v1/campaigns/{campaign_id}/decisions"' in metrics, metrics[-3000:]
        assert "saco_decisions_total" in metrics and "saco_batch_rows_bucket" in metrics
    log = (tmp_path / "replica-0.log").read_text()
    assert "service ready" in log and "served-admin-token" not in log


def test_redis_going_away_gives_503_quickly_and_no_unreserved_coupon(model_store_dir: Path, tmp_path: Path) -> None:
    redis = start_redis()
    feats = [0.1] * _dim(model_store_dir)
    reqs = {"requests": [{"user_id": f"u{i}", "features": feats} for i in range(8)]}
    try:
        with serve(model_store_dir, redis.url, log_dir=tmp_path) as (base,), httpx.Client(timeout=30) as http:
            http.put(base + "/v1/admin/campaigns/c1", json={"budget": 1000.0, "coupons": COUPONS}, headers=ADMIN)
            assert http.post(base + "/v1/campaigns/c1/decisions", json=reqs).status_code == 200
            redis.stop()
            for _ in range(3):
                started = time.monotonic()
                resp = http.post(base + "/v1/campaigns/c1/decisions", json=reqs)
                elapsed = time.monotonic() - started
                assert resp.status_code == 503 and resp.headers.get("retry-after") == "1"
                assert "decisions" not in resp.json()
                assert elapsed < 3.0
            assert http.get(base + "/readyz").status_code == 503
            assert http.get(base + "/healthz").status_code == 200
            out = {"outcomes": [{"decision_id": "d-x", "reward": 1.0, "cost": 0.0}]}
            assert http.post(base + "/v1/campaigns/c1/outcomes", json=out).status_code == 503
            assert http.get(base + "/v1/admin/campaigns/c1", headers=ADMIN).status_code == 503
    finally:
        redis.stop()


def test_redis_unreachable_at_start_is_not_ready(model_store_dir: Path, tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    feats = [0.1] * _dim(model_store_dir)
    with (
        serve(model_store_dir, url, ready_status=503, log_dir=tmp_path) as (base,),
        httpx.Client(timeout=30) as http,
    ):
        started = time.monotonic()
        resp = http.post(base + "/v1/campaigns/c1/decisions", json={"requests": [{"user_id": "a", "features": feats}]})
        assert resp.status_code == 503 and time.monotonic() - started < 3.0
