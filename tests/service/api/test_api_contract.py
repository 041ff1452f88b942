"""CONTRACT.md §3 over HTTP (ASGI with the app's lifespan), against both state stores."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_http import ADMIN, COUPONS, campaign_body, users

from service.schemas import CAMPAIGN_ID_PATTERN
from service.state.context import decode_context


def put_campaign(
    client: TestClient, cid: str = "c1", budget: float = 100.0, lam: float | None = None, **extra: Any
) -> dict[str, Any]:
    if lam is not None:
        extra["lambda"] = lam
    resp = client.put(f"/v1/admin/campaigns/{cid}", json=campaign_body(budget, **extra), headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return resp.json()


def decide(client: TestClient, requests: list[dict[str, Any]], cid: str = "c1") -> Any:
    return client.post(f"/v1/campaigns/{cid}/decisions", json={"requests": requests})


def field_of(resp: Any) -> list[Any]:
    """The location of the first validation error (the field the 422 names)."""
    return list(resp.json()["detail"][0]["loc"])


# ---- operations ----------------------------------------------------------------------------------
def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["model_version"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
    assert "saco_model_info" in metrics.text
    gc.collect()  # a full collection is timed into the pause histogram
    count = next(
        float(line.split()[-1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith('saco_gc_pause_seconds_count{generation="2"}')
    )
    assert count >= 1


def test_openapi_documents_the_decisions_body(client: TestClient) -> None:
    """The decisions route is a plain route that parses its body itself (one pass of pydantic's JSON
    parser); its operation is still published as FastAPI writes one, every reference resolving."""
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/campaigns/{campaign_id}/decisions"]["post"]
    (parameter,) = operation["parameters"]
    assert parameter["in"] == "path" and parameter["name"] == "campaign_id" and parameter["required"]
    assert parameter["schema"]["pattern"] == CAMPAIGN_ID_PATTERN
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok == "#/components/schemas/DecisionsResponse"
    assert spec["components"]["schemas"]["DecisionsResponse"]["properties"]["decisions"]["items"] == {
        "$ref": "#/components/schemas/Decision"
    }
    assert set(spec["components"]["schemas"]["Decision"]["properties"]) >= {"decision_id", "action", "lambda"}
    invalid = operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    assert invalid.split("/")[-1] in spec["components"]["schemas"]
    body = operation["requestBody"]
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/DecisionsRequest"}
    schemas = spec["components"]["schemas"]
    items = schemas["DecisionsRequest"]["properties"]["requests"]["items"]
    assert items == {"$ref": "#/components/schemas/DecisionRequestItem"}
    assert set(schemas["DecisionRequestItem"]["properties"]) == {"user_id", "features", "request_id"}


# ---- decisions -----------------------------------------------------------------------------------
def test_decisions_answer_in_request_order_with_reservations(client: TestClient, feature_dim: int) -> None:
    put_campaign(client, budget=1000.0, lam=0.3)
    reqs = users(5, feature_dim)
    resp = decide(client, reqs)
    assert resp.status_code == 200, resp.text
    decisions = resp.json()["decisions"]
    assert [d["user_id"] for d in decisions] == [r["user_id"] for r in reqs]
    costs = {c["action"]: c["cost"] for c in COUPONS} | {0: 0.0}
    for d in decisions:
        assert set(d) == {"user_id", "decision_id", "action", "cost", "model_version", "lambda"}
        assert d["cost"] == costs[d["action"]] and d["lambda"] == 0.3
    assert len({d["decision_id"] for d in decisions}) == 5
    camp = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()
    assert camp["reserved"] == pytest.approx(sum(d["cost"] for d in decisions))
    assert camp["decisions"] == 5 and camp["model_version"] == decisions[0]["model_version"]
    assert camp["remaining"] == pytest.approx(1000.0 - camp["reserved"])


def test_budget_is_never_exceeded_and_exhaustion_gives_no_coupon(client: TestClient, feature_dim: int) -> None:
    put_campaign(client, budget=7.0, lam=0.0)
    issued = 0.0
    for i in range(10):
        for d in decide(client, users(8, feature_dim, prefix=f"b{i}-", value=0.3 * i)).json()["decisions"]:
            issued += d["cost"]
            assert (d["action"] == 0) == (d["cost"] == 0.0)
    camp = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()
    assert issued <= 7.0 and camp["reserved"] == pytest.approx(issued)
    assert camp["spent"] + camp["reserved"] <= camp["budget"]


def test_coupons_the_campaign_does_not_offer_are_never_chosen(client: TestClient, feature_dim: int) -> None:
    resp = client.put(
        "/v1/admin/campaigns/c1",
        headers=ADMIN,
        json={"budget": 1e6, "coupons": [{"action": 2, "cost": 5.0}], "lambda": 0.0},
    )
    assert resp.status_code == 200
    for d in decide(client, users(64, feature_dim, value=-1.0)).json()["decisions"]:
        assert d["action"] in (0, 2)


def test_repeated_request_id_returns_the_first_decision(client: TestClient, feature_dim: int) -> None:
    put_campaign(client, budget=1000.0)
    reqs = users(3, feature_dim, request_id=None)
    for i, r in enumerate(reqs):
        r["request_id"] = f"rq-{i}"
    first = decide(client, reqs).json()["decisions"]
    reserved = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()["reserved"]
    again = decide(client, [reqs[2], reqs[0]]).json()["decisions"]
    assert again == [first[2], first[0]]
    camp = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()
    assert camp["reserved"] == reserved and camp["decisions"] == 3


def test_context_is_kept_between_calls(client: TestClient, feature_dim: int) -> None:
    put_campaign(client, budget=1000.0)
    for _ in range(3):
        assert decide(client, users(1, feature_dim)).status_code == 200
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    client.portal.call(runtime.decisions.drain)  # type: ignore[union-attr]
    _, (raw,) = client.portal.call(runtime.store.load_for_decision, "c1", ["u0"])  # type: ignore[union-attr]
    ctx = decode_context(raw)
    assert ctx is not None and ctx.t == 3 and len(ctx.steps) == 3


def test_unknown_campaign_is_404(client: TestClient, feature_dim: int) -> None:
    resp = decide(client, users(1, feature_dim), cid="nope")
    assert resp.status_code == 404 and "nope" in resp.json()["detail"]
    resp = client.post("/v1/campaigns/nope/outcomes", json={"outcomes": [{"decision_id": "d", "reward": 1, "cost": 0}]})
    assert resp.status_code == 404


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"requests": []}, ["body", "requests"]),
        ({}, ["body", "requests"]),
        ({"requests": [{"user_id": "", "features": "DIM"}]}, ["body", "requests", 0, "user_id"]),
        ({"requests": [{"user_id": "x" * 129, "features": "DIM"}]}, ["body", "requests", 0, "user_id"]),
        ({"requests": [{"user_id": 7, "features": "DIM"}]}, ["body", "requests", 0, "user_id"]),
        ({"requests": [{"user_id": "a", "features": "SHORT"}]}, ["body", "requests", 0, "features"]),
        ({"requests": [{"user_id": "a", "features": "LONG"}]}, ["body", "requests", 0, "features"]),
        ({"requests": [{"user_id": "a", "features": "STRINGS"}]}, ["body", "requests", 0, "features", 0]),
        ({"requests": [{"user_id": "a", "features": "NAN"}]}, ["body", "requests", 0, "features", 1]),
        ({"requests": [{"user_id": "a", "features": "INF"}]}, ["body", "requests", 0, "features", 1]),
        ({"requests": [{"user_id": "a", "features": "HUGE"}]}, ["body", "requests", 0, "features"]),
        (
            {"requests": [{"user_id": "a", "features": "DIM", "request_id": ""}]},
            ["body", "requests", 0, "request_id"],
        ),
        ({"requests": [{"user_id": "a", "features": "DIM", "extra": 1}]}, ["body", "requests", 0, "extra"]),
        ({"requests": "OVERSIZED"}, ["body", "requests"]),
    ],
)
def test_bad_decision_input_is_422_naming_the_field(
    client: TestClient, feature_dim: int, body: dict[str, Any], loc: list[Any]
) -> None:
    put_campaign(client)
    good = [0.1] * feature_dim
    fill = {
        "DIM": good,
        "SHORT": good[:-1],
        "LONG": [*good, 0.1],
        "STRINGS": ["x"] * feature_dim,
        "NAN": [0.1, float("nan"), *good[2:]],
        "INF": [0.1, float("inf"), *good[2:]],
        "HUGE": [1e300] * feature_dim,
    }
    if body.get("requests") == "OVERSIZED":
        body = {"requests": users(client.app.state.settings.max_batch + 1, feature_dim)}  # type: ignore[attr-defined]
    for r in body.get("requests", []):
        if isinstance(r.get("features"), str):
            r["features"] = fill[r["features"]]
    # NaN / Infinity are not JSON, but Python's json (and some clients) write them: send them raw
    import json

    resp = client.post(
        "/v1/campaigns/c1/decisions", content=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 422, resp.text
    assert field_of(resp)[: len(loc)] == loc


def test_malformed_json_and_bad_campaign_id_are_422(client: TestClient) -> None:
    resp = client.post("/v1/campaigns/c1/decisions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 422
    resp = client.post("/v1/campaigns/bad%7Bid%7D/decisions", json={"requests": []})
    assert resp.status_code == 422 and field_of(resp) == ["path", "campaign_id"]


# ---- outcomes ------------------------------------------------------------------------------------
def test_outcomes_settle_count_duplicates_and_unknown(client: TestClient, feature_dim: int) -> None:
    put_campaign(client, budget=1000.0, lam=0.0)
    decisions = decide(client, users(4, feature_dim)).json()["decisions"]
    coupon = next((d for d in decisions if d["action"] > 0), None)
    outcomes = [{"decision_id": d["decision_id"], "reward": 3.5, "cost": 0.0} for d in decisions]
    if coupon is not None:
        outcomes[decisions.index(coupon)]["cost"] = coupon["cost"]
    resp = client.post("/v1/campaigns/c1/outcomes", json={"outcomes": outcomes})
    assert resp.json() == {"accepted": 4, "duplicates": 0, "unknown": 0}
    camp = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()
    assert camp["reserved"] == 0.0 and camp["spent"] == (coupon["cost"] if coupon else 0.0)
    resp = client.post(
        "/v1/campaigns/c1/outcomes",
        json={"outcomes": [outcomes[0], {"decision_id": "d-unknown", "reward": 1.0, "cost": 0.0}]},
    )
    assert resp.json() == {"accepted": 0, "duplicates": 1, "unknown": 1}
    # the outcome reached the user's context: reward and cost in its step (cents) and in the user's sums
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    client.portal.call(runtime.decisions.drain)  # type: ignore[union-attr]
    _, (raw,) = client.portal.call(runtime.store.load_for_decision, "c1", ["u0"])  # type: ignore[union-attr]
    ctx = decode_context(raw)
    assert ctx is not None and ctx.steps["reward"][-1] == 350 and ctx.reward == 350


def test_outcome_cost_above_reservation_is_422_and_changes_nothing(client: TestClient, feature_dim: int) -> None:
    put_campaign(client, budget=1000.0)
    d = decide(client, users(1, feature_dim)).json()["decisions"][0]
    too_much = round(d["cost"] + 0.01, 2)
    resp = client.post(
        "/v1/campaigns/c1/outcomes",
        json={"outcomes": [{"decision_id": d["decision_id"], "reward": 1.0, "cost": too_much}]},
    )
    assert resp.status_code == 422 and field_of(resp) == ["body", "outcomes", 0, "cost"]
    camp = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()
    assert camp["spent"] == 0.0 and camp["reserved"] == d["cost"]


@pytest.mark.parametrize(
    ("outcome", "loc"),
    [
        ({"decision_id": "d", "reward": 1.0, "cost": -1.0}, ["body", "outcomes", 0, "cost"]),
        ({"decision_id": "d", "reward": 1.0, "cost": 0.001}, ["body", "outcomes", 0, "cost"]),
        ({"decision_id": "d", "reward": "x", "cost": 0.0}, ["body", "outcomes", 0, "reward"]),
        ({"decision_id": "", "reward": 1.0, "cost": 0.0}, ["body", "outcomes", 0, "decision_id"]),
        ({"reward": 1.0, "cost": 0.0}, ["body", "outcomes", 0, "decision_id"]),
    ],
)
def test_bad_outcome_is_422(client: TestClient, outcome: dict[str, Any], loc: list[Any]) -> None:
    put_campaign(client)
    resp = client.post("/v1/campaigns/c1/outcomes", json={"outcomes": [outcome]})
    assert resp.status_code == 422 and field_of(resp) == loc
    resp = client.post("/v1/campaigns/c1/outcomes", json={"outcomes": []})
    assert resp.status_code == 422


# ---- admin ---------------------------------------------------------------------------------------
def test_admin_needs_the_bearer_token(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
        assert client.put("/v1/admin/campaigns/c1", json=campaign_body(), headers=headers).status_code == 401
        assert client.get("/v1/admin/campaigns/c1", headers=headers).status_code == 401
        assert client.patch("/v1/admin/campaigns/c1", json={}, headers=headers).status_code == 401
        assert client.post("/v1/admin/models/reload", headers=headers).status_code == 401
    # auth comes before body validation: a bad body without a token is still 401
    assert client.put("/v1/admin/campaigns/c1", json={"budget": "x"}).status_code == 401


def test_campaign_put_patch_get(client: TestClient) -> None:
    created = put_campaign(client, budget=10_000.0, lam=0.3)
    assert {
        k: created[k] for k in ("campaign_id", "budget", "spent", "reserved", "remaining", "lambda", "decisions")
    } == {
        "campaign_id": "c1",
        "budget": 10_000.0,
        "spent": 0.0,
        "reserved": 0.0,
        "remaining": 10_000.0,
        "lambda": 0.3,
        "decisions": 0,
    }
    resp = client.patch("/v1/admin/campaigns/c1", json={"budget": 50.25}, headers=ADMIN)
    assert resp.status_code == 200 and resp.json()["budget"] == 50.25 and resp.json()["lambda"] == 0.3
    resp = client.patch("/v1/admin/campaigns/c1", json={"coupons": [{"action": 1, "cost": 0.5}]}, headers=ADMIN)
    assert resp.json()["coupons"] == [{"action": 1, "cost": 0.5}]
    resp = client.patch("/v1/admin/campaigns/c1", json={"lambda": None}, headers=ADMIN)
    assert resp.json()["lambda_source"] != "admin"
    got = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()
    assert got["budget"] == 50.25 and set(got) >= {
        "campaign_id",
        "budget",
        "spent",
        "reserved",
        "remaining",
        "lambda",
        "model_version",
        "decisions",
    }
    assert client.get("/v1/admin/campaigns/none", headers=ADMIN).status_code == 404
    assert client.patch("/v1/admin/campaigns/none", json={"budget": 1.0}, headers=ADMIN).status_code == 404


def test_lambda_defaults_come_from_the_model(client: TestClient) -> None:
    manifest = client.app.state.runtime.policies.current.manifest  # type: ignore[attr-defined]
    got = put_campaign(client)
    expected = manifest.default_lambda if manifest.default_lambda is not None else 0.0
    assert got["lambda"] == pytest.approx(expected)
    if manifest.lambda_table:
        got = put_campaign(client, expected_users=100)
        assert got["lambda"] == pytest.approx(manifest.lambda_for_budget_per_user(1.0))
        assert got["lambda_source"] == "calibration"
    assert put_campaign(client, expected_users=40)["expected_users"] == 40


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"budget": -1.0, "coupons": COUPONS}, ["body", "budget"]),
        ({"budget": 1.005, "coupons": COUPONS}, ["body", "budget"]),
        ({"budget": "NaN", "coupons": COUPONS}, ["body", "budget"]),
        ({"budget": 1.0, "coupons": [{"action": 0, "cost": 1.0}]}, ["body", "coupons", 0, "action"]),
        ({"budget": 1.0, "coupons": [{"action": 99, "cost": 1.0}]}, ["body", "coupons", 0, "action"]),
        (
            {"budget": 1.0, "coupons": [{"action": 1, "cost": 1.0}, {"action": 1, "cost": 2.0}]},
            ["body", "coupons", 1, "action"],
        ),
        ({"budget": 1.0, "coupons": [{"action": 1, "cost": 0.0}]}, ["body", "coupons", 0, "cost"]),
        ({"budget": 1.0, "coupons": [{"action": 1, "cost": 1.999}]}, ["body", "coupons", 0, "cost"]),
        ({"budget": 1.0, "coupons": COUPONS, "lambda": -0.1}, ["body", "lambda"]),
        ({"coupons": COUPONS}, ["body", "budget"]),
    ],
)
def test_bad_campaign_is_422(client: TestClient, body: dict[str, Any], loc: list[Any]) -> None:
    resp = client.put("/v1/admin/campaigns/c1", json=body, headers=ADMIN)
    assert resp.status_code == 422, resp.text
    assert field_of(resp) == loc


def test_replacing_a_campaign_keeps_live_reservations(client: TestClient, feature_dim: int) -> None:
    put_campaign(client, budget=30.0, lam=0.0)
    decisions = decide(client, users(8, feature_dim)).json()["decisions"]
    reserved = sum(d["cost"] for d in decisions)
    got = put_campaign(client, budget=1.0)  # below the ledger: remaining 0, no new coupons
    assert got["reserved"] == pytest.approx(reserved) and got["remaining"] == 0.0
    for d in decide(client, users(8, feature_dim, prefix="v")).json()["decisions"]:
        assert d["action"] == 0
    camp = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()
    assert camp["reserved"] == pytest.approx(reserved)


def test_admin_off_without_a_token(settings: Any) -> None:
    from service.app import create_app

    with TestClient(create_app(settings.model_copy(update={"admin_token": None}))) as off:
        assert off.put("/v1/admin/campaigns/c1", json=campaign_body(), headers=ADMIN).status_code == 404
        assert off.get("/healthz").status_code == 200
