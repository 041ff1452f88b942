"""Hostile input over HTTP: oversized and malformed bodies, wrong content types, the admin routes without a
token, amounts and lambdas past their bounds, a request_id reused by another user, a budget lowered below
what is spent and reserved, what /metrics, /openapi.json and /docs expose (a standalone Redis)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_http import ADMIN, ADMIN_TOKEN, campaign_body, users

from model_store import ModelStore
from model_store.versions import write_checksums
from service.app import create_app
from service.settings import Settings

MAX_BODY = 64 * 1024
ADMIN_ROUTES = [
    ("PUT", "/v1/admin/campaigns/c1"),
    ("PATCH", "/v1/admin/campaigns/c1"),
    ("GET", "/v1/admin/campaigns/c1"),
    ("POST", "/v1/admin/models/reload"),
]
JSON = {"Content-Type": "application/json"}


def make_client(model_store_dir: Path, redis_url: str, redis_prefix: str, **overrides: Any) -> TestClient:
    settings = Settings(
        store=str(model_store_dir),
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        admin_token=ADMIN_TOKEN,
        device="cpu",
        max_body_bytes=MAX_BODY,
        **overrides,
    )
    return TestClient(create_app(settings))


@pytest.fixture
def client(model_store_dir: Path, redis_url: str, redis_prefix: str) -> Iterator[TestClient]:
    with make_client(model_store_dir, redis_url, redis_prefix) as test_client:
        yield test_client


@pytest.fixture
def campaign(client: TestClient) -> str:
    resp = client.put("/v1/admin/campaigns/c1", json=campaign_body(100.0, **{"lambda": 0.0}), headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return "c1"


def chunks(total: int, size: int = 16 * 1024) -> Iterator[bytes]:
    """A body streamed without a Content-Length (chunked)."""
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


# ---- body size -----------------------------------------------------------------------------------
def test_oversized_body_is_refused_before_it_is_read(client: TestClient, campaign: str) -> None:
    big = b'{"requests": [' + b" " * (2 * MAX_BODY) + b"]}"
    resp = client.post(f"/v1/campaigns/{campaign}/decisions", content=big, headers=JSON)
    assert resp.status_code == 413 and "SACO_MAX_BODY_BYTES" in resp.json()["detail"]
    # streamed, without a Content-Length: counted as it arrives
    resp = client.post(f"/v1/campaigns/{campaign}/outcomes", content=chunks(2 * MAX_BODY), headers=JSON)
    assert resp.status_code == 413
    # just under the limit: parsed (and refused for what it is, not for its size)
    resp = client.post(f"/v1/campaigns/{campaign}/decisions", content=b" " * (MAX_BODY - 10) + b"{}", headers=JSON)
    assert resp.status_code == 422


def test_batch_limit_is_checked_before_validation(client: TestClient, campaign: str, feature_dim: int) -> None:
    """Many tiny (invalid) items: refused for their number, not validated one by one."""
    body = json.dumps({"requests": [0] * 5000})
    resp = client.post(f"/v1/campaigns/{campaign}/decisions", content=body, headers=JSON)
    assert resp.status_code == 422
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body", "requests"] and "at most 1024 requests per call, got 5000" in error["msg"]
    ok = client.post(f"/v1/campaigns/{campaign}/decisions", json={"requests": users(3, feature_dim)})
    assert ok.status_code == 200


def test_a_422_does_not_echo_a_large_input(client: TestClient, campaign: str) -> None:
    long_text = "x" * 50_000
    for body in (
        {"requests": long_text},
        {"requests": [{"user_id": long_text, "features": [0.0]}]},
        {long_text: 1},
        {"requests": [{"user_id": "u", "features": ["a"] * 2000}]},
    ):
        resp = client.post(f"/v1/campaigns/{campaign}/decisions", json=body)
        assert resp.status_code == 422, resp.text
        assert len(resp.content) < 8_000, len(resp.content)
        assert resp.json()["detail"][0]["loc"][0] == "body"


# ---- content type --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_bodies_must_be_json(client: TestClient, campaign: str, feature_dim: int, content_type: str | None) -> None:
    body = json.dumps({"requests": users(1, feature_dim)}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in (f"/v1/campaigns/{campaign}/decisions", f"/v1/campaigns/{campaign}/outcomes"):
        resp = client.post(path, content=body, headers=headers)
        assert resp.status_code == 415, (path, resp.text)
        assert "application/json" in resp.json()["detail"]
    resp = client.put("/v1/admin/campaigns/c2", content=json.dumps(campaign_body()), headers={**ADMIN, **headers})
    assert resp.status_code == 415
    ok = client.post(
        f"/v1/campaigns/{campaign}/decisions", content=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 200


# ---- admin routes without a token ----------------------------------------------------------------
@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_admin_routes_authenticate_before_reading_the_body(
    client: TestClient, method: str, path: str, token: str | None
) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    for body, content_type in (
        (b"{not json", "application/json"),
        (b'{"budget": "lots"}', "application/json"),
        (b"budget=1", "text/plain"),
    ):
        resp = client.request(method, path, content=body, headers={**headers, "Content-Type": content_type})
        assert resp.status_code == 401, (method, path, body, resp.text)
        assert resp.headers["www-authenticate"] == "Bearer"
    # a large streamed body: answered 401 at once, without reading it
    started = time.perf_counter()
    resp = client.request(method, path, content=chunks(50 * MAX_BODY), headers={**headers, **JSON})
    assert resp.status_code == 401 and time.perf_counter() - started < 2.0
    # larger than the limit with a Content-Length: 413 before anything is read, token or not
    resp = client.request(method, path, content=b" " * (2 * MAX_BODY), headers={**headers, **JSON})
    assert resp.status_code in (401, 413)


def test_admin_disabled_without_a_token_setting(model_store_dir: Path, redis_url: str, redis_prefix: str) -> None:
    settings = Settings(store=str(model_store_dir), redis_url=redis_url, redis_prefix=redis_prefix, device="cpu")
    with TestClient(create_app(settings)) as client:
        for method, path in ADMIN_ROUTES:
            resp = client.request(method, path, content=b"{not json", headers={**ADMIN, **JSON})
            assert resp.status_code == 404, (method, path, resp.text)


# ---- bounds --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "field"),
    [
        (campaign_body(1e300), ["body", "budget"]),
        (campaign_body(92233720368547758.07), ["body", "budget"]),
        ({"budget": 10.0, "coupons": [{"action": 1, "cost": 1e13}]}, ["body", "coupons", 0, "cost"]),
        (campaign_body(10.0, **{"lambda": 1e308}), ["body", "lambda"]),
        (campaign_body(10.0, **{"lambda": 1e7}), ["body", "lambda"]),
    ],
)
def test_amounts_and_lambdas_are_bounded(client: TestClient, body: dict[str, Any], field: list[Any]) -> None:
    resp = client.put("/v1/admin/campaigns/big", json=body, headers=ADMIN)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == field
    assert client.get("/v1/admin/campaigns/big", headers=ADMIN).status_code == 404  # nothing half-written


def test_largest_amount_stays_exact(client: TestClient) -> None:
    resp = client.put("/v1/admin/campaigns/big", json=campaign_body(999_999_999_999.99), headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert resp.json()["budget"] == 999_999_999_999.99
    assert client.get("/v1/admin/campaigns/big", headers=ADMIN).json()["remaining"] == 999_999_999_999.99


def test_outcome_amounts_are_bounded(client: TestClient, campaign: str) -> None:
    for outcome, field in (
        ({"decision_id": "d-1", "reward": 1e300, "cost": 0.0}, "reward"),
        ({"decision_id": "d-1", "reward": 1.0, "cost": 1e13}, "cost"),
    ):
        resp = client.post(f"/v1/campaigns/{campaign}/outcomes", json={"outcomes": [outcome]})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "outcomes", 0, field]


# ---- request ids ---------------------------------------------------------------------------------
def test_request_id_of_another_user_is_a_conflict(client: TestClient, feature_dim: int) -> None:
    client.put("/v1/admin/campaigns/c1", json=campaign_body(1000.0, **{"lambda": 0.0}), headers=ADMIN)
    url = "/v1/campaigns/c1/decisions"
    first = client.post(
        url, json={"requests": [{"user_id": "alice", "features": [0.1] * feature_dim, "request_id": "r1"}]}
    )
    assert first.status_code == 200
    before = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()
    # bob reuses alice's request id (with a fresh one beside it): the whole batch is refused
    resp = client.post(
        url,
        json={
            "requests": [
                {"user_id": "carol", "features": [0.1] * feature_dim, "request_id": "r2"},
                {"user_id": "bob", "features": [0.1] * feature_dim, "request_id": "r1"},
            ]
        },
    )
    assert resp.status_code == 409, resp.text
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body", "requests", 1, "request_id"] and "another user" in error["msg"]
    after = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()
    assert (after["decisions"], after["reserved"]) == (before["decisions"], before["reserved"])
    # nothing was written for carol's request id either: it is still free for her
    carol = client.post(
        url, json={"requests": [{"user_id": "carol", "features": [0.1] * feature_dim, "request_id": "r2"}]}
    )
    assert carol.status_code == 200 and carol.json()["decisions"][0]["user_id"] == "carol"
    # the same id twice in one batch for two users
    twice = client.post(
        url,
        json={
            "requests": [
                {"user_id": "dan", "features": [0.1] * feature_dim, "request_id": "r3"},
                {"user_id": "erin", "features": [0.1] * feature_dim, "request_id": "r3"},
            ]
        },
    )
    assert twice.status_code == 409
    # alice repeating her own id still gets her first decision back
    again = client.post(
        url, json={"requests": [{"user_id": "alice", "features": [0.1] * feature_dim, "request_id": "r1"}]}
    )
    assert again.json()["decisions"][0]["decision_id"] == first.json()["decisions"][0]["decision_id"]


# ---- a budget lowered below spent + reserved ----------------------------------------------------
def test_lowered_budget_reports_the_excess(client: TestClient, feature_dim: int) -> None:
    coupons = [{"action": a, "cost": 10.0} for a in (1, 2, 3)]
    client.put("/v1/admin/campaigns/c1", json={"budget": 100.0, "coupons": coupons, "lambda": 0.0}, headers=ADMIN)
    decisions = client.post("/v1/campaigns/c1/decisions", json={"requests": users(20, feature_dim)}).json()
    issued = [d for d in decisions["decisions"] if d["action"]]
    assert issued, "the model issued no coupon at lambda 0"
    view = client.patch("/v1/admin/campaigns/c1", json={"budget": 1.0}, headers=ADMIN).json()
    held = view["spent"] + view["reserved"]
    assert view["excess"] == pytest.approx(held - 1.0) and view["remaining"] == 0
    outcome = {"decision_id": issued[0]["decision_id"], "reward": 1.0, "cost": 10.0}
    assert client.post("/v1/campaigns/c1/outcomes", json={"outcomes": [outcome]}).json()["accepted"] == 1
    view = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()
    assert view["spent"] == 10.0 and view["spent"] > view["budget"]
    assert view["excess"] == pytest.approx(view["spent"] + view["reserved"] - view["budget"])
    # no new coupon while the excess lasts
    more = client.post("/v1/campaigns/c1/decisions", json={"requests": users(5, feature_dim, prefix="v")}).json()
    assert all(d["action"] == 0 for d in more["decisions"])
    view = client.patch("/v1/admin/campaigns/c1", json={"budget": 1000.0}, headers=ADMIN).json()
    assert view["excess"] == 0


# ---- what the service exposes --------------------------------------------------------------------
def test_openapi_declares_the_error_answers(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    decisions = paths["/v1/campaigns/{campaign_id}/decisions"]["post"]["responses"]
    assert {"404", "409", "413", "415", "422", "503"} <= set(decisions)
    outcomes = paths["/v1/campaigns/{campaign_id}/outcomes"]["post"]["responses"]
    assert {"404", "413", "415", "422", "503"} <= set(outcomes)
    for path, methods in paths.items():
        if path.startswith("/v1/admin"):
            for operation in methods.values():
                assert {"401", "404"} <= set(operation["responses"]), path
    assert {"409"} <= set(paths["/v1/admin/models/reload"]["post"]["responses"])
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_docs_need_no_other_host(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    html = page.text
    assert "//" not in html.replace("https://swagger.io", "").split("<body>")[0].replace("http-equiv", "")
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        assert asset in html
        served = client.get(asset)
        assert served.status_code == 200 and len(served.content) > 10_000
    assert "cdn" not in html.lower() and "http://" not in html and "https://" not in html
    assert client.get("/redoc").status_code == 404


@pytest.mark.parametrize("exposure", ["full", "aggregate", "admin"])
def test_metrics_exposure(
    model_store_dir: Path, redis_url: str, redis_prefix: str, feature_dim: int, exposure: str
) -> None:
    with make_client(model_store_dir, redis_url, redis_prefix, metrics_exposure=exposure) as client:
        client.put("/v1/admin/campaigns/secret-campaign", json=campaign_body(50.0, **{"lambda": 0.0}), headers=ADMIN)
        client.post("/v1/campaigns/secret-campaign/decisions", json={"requests": users(4, feature_dim)})
        client.get("/v1/admin/campaigns/secret-campaign", headers=ADMIN)
        open_answer = client.get("/metrics")
        if exposure == "admin":
            assert open_answer.status_code == 401
            text = client.get("/metrics", headers=ADMIN).text
            assert "secret-campaign" in text
        elif exposure == "aggregate":
            assert open_answer.status_code == 200
            text = open_answer.text
            assert "secret-campaign" not in text and "saco_budget_remaining" not in text
            assert "saco_decisions_total" in text and "saco_model_info" in text
        else:
            assert 'saco_budget_remaining{campaign="secret-campaign"}' in open_answer.text


def test_metrics_exposure_admin_needs_a_token(model_store_dir: Path) -> None:
    with pytest.raises(ValueError, match="SACO_ADMIN_TOKEN"):
        Settings(store=str(model_store_dir), metrics_exposure="admin")


def test_reload_refuses_a_nan_lambda_even_with_matching_checksums(
    client: TestClient, campaign: str, model_store_dir: Path, feature_dim: int
) -> None:
    """A manifest edited to a NaN default_lambda, its SHA256SUMS rewritten to match: refused by the
    manifest's own checks; decisions keep a finite lambda from the incumbent."""
    store = ModelStore(model_store_dir)
    incumbent = store.load()
    manifest = {
        k: v for k, v in incumbent.manifest.to_json().items() if k not in ("version", "created_at", "model_sha256")
    }
    candidate = store.publish(incumbent.model_path, manifest)
    path = candidate.path / "manifest.json"
    data = json.loads(path.read_text())
    data["default_lambda"] = float("nan")
    path.write_text(json.dumps(data))
    write_checksums(candidate.path)
    resp = client.post("/v1/admin/models/reload", headers=ADMIN)
    assert resp.status_code == 409 and "default_lambda must be a finite number" in resp.json()["detail"]
    client.patch(f"/v1/admin/campaigns/{campaign}", json={"lambda": None}, headers=ADMIN)
    decided = client.post(f"/v1/campaigns/{campaign}/decisions", json={"requests": users(2, feature_dim)}).json()
    assert all(d["model_version"] == incumbent.version and d["lambda"] is not None for d in decided["decisions"])
