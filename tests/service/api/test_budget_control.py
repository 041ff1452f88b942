"""Budget-control settings of a campaign over HTTP: horizon, traffic plan, pacing, reservation mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_http import ADMIN, campaign_body, republish, users


def put(client: TestClient, cid: str = "p1", **extra: Any) -> Any:
    return client.put(f"/v1/admin/campaigns/{cid}", json=campaign_body(1000.0, **extra), headers=ADMIN)


def test_a_campaign_without_the_new_fields_behaves_as_before(client: TestClient) -> None:
    view = put(client).json()
    assert view["reservation_mode"] == "strict" and view["overspend_risk"] == 0.01
    assert (view["starts_at"], view["ends_at"], view["expected_decisions"]) == (None, None, None)
    assert view["pacing"] is False and view["plan"] is None and view["pacing_error"] is None


def test_expected_mode_is_stored_and_shown(client: TestClient) -> None:
    view = put(client, reservation_mode="expected", overspend_risk=0.02).json()
    assert (view["reservation_mode"], view["overspend_risk"]) == ("expected", 0.02)
    view = client.patch("/v1/admin/campaigns/p1", json={"reservation_mode": None}, headers=ADMIN).json()
    assert view["reservation_mode"] == "strict" and view["overspend_risk"] == 0.02


def test_horizon_and_traffic_plan_are_stored_and_shown(client: TestClient) -> None:
    view = put(client, starts_at="2026-01-01T00:00:00Z", ends_at="2026-01-31T00:00:00+00:00").json()
    assert view["starts_at"].startswith("2026-01-01T00:00:00") and view["ends_at"].startswith("2026-01-31")
    assert view["pacing"] is True  # on by default once there is a plan
    view = client.patch("/v1/admin/campaigns/p1", json={"pacing": False, "expected_decisions": 500}, headers=ADMIN)
    assert view.status_code == 200, view.text
    assert view.json()["pacing"] is False and view.json()["expected_decisions"] == 500
    view = client.patch("/v1/admin/campaigns/p1", json={"ends_at": None, "pacing": None}, headers=ADMIN).json()
    assert view["ends_at"] is None and view["pacing"] is True  # the traffic plan remains
    view = put(client, ends_at="2999-01-01T00:00:00Z").json()  # a horizon without a start begins now
    assert view["starts_at"] is not None and view["expected_decisions"] is None  # PUT resets what it omits


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"starts_at": "2026-02-01T00:00:00Z", "ends_at": "2026-01-01T00:00:00Z"}, []),
        ({"ends_at": "2026-01-01T00:00:00"}, ["body", "ends_at"]),  # no time zone
        ({"expected_decisions": 0}, ["body", "expected_decisions"]),
        ({"overspend_risk": 0.9}, ["body", "overspend_risk"]),
        ({"reservation_mode": "loose"}, ["body", "reservation_mode"]),
        ({"pacing": "yes"}, ["body", "pacing"]),
    ],
)
def test_bad_settings_are_refused_naming_the_field(client: TestClient, extra: dict[str, Any], field: list[Any]) -> None:
    resp = put(client, **extra)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"][: len(field)] == field


def test_a_patch_cannot_end_the_horizon_before_it_starts(client: TestClient) -> None:
    put(client, starts_at="2026-01-10T00:00:00Z", ends_at="2026-02-01T00:00:00Z")
    resp = client.patch("/v1/admin/campaigns/p1", json={"ends_at": "2026-01-05T00:00:00Z"}, headers=ADMIN)
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "ends_at"]


def test_pacing_raises_lambda_of_a_campaign_spending_ahead_of_its_plan(client: TestClient, feature_dim: int) -> None:
    """A campaign (dual descent alone) whose traffic plan is far behind what its decisions reserved: each
    pacing step raises its lambda, decisions are then made with the paced lambda, and the view shows plan
    and error."""
    client.app.state.settings.pacing_interval_s = 0.001  # type: ignore[attr-defined]  # a step per call
    put(client, cid="fast", expected_decisions=100_000, pacing_method="descent", **{"lambda": 0.0})
    background = client.app.state.runtime.background  # type: ignore[attr-defined]
    lambdas = []
    for n in range(3):
        body = {"requests": users(50, feature_dim, prefix=f"r{n}-")}
        assert client.post("/v1/campaigns/fast/decisions", json=body).status_code == 200
        client.portal.call(background.pace, "fast")  # type: ignore[attr-defined]
        view = client.get("/v1/admin/campaigns/fast", headers=ADMIN).json()
        lambdas.append(view["lambda"])
    # from the campaign's lambda, upward while the spend runs ahead of the plan (then it holds, or eases
    # back by what spend falls behind the plan's own increments)
    assert lambdas[0] == 0.0 and lambdas[1] > 0.0 and lambdas[2] > 0.0
    assert view["lambda_source"] == "pacing" and view["pacing_error"] > 0 and view["pacing_spend"] > view["plan"]
    decided = client.post("/v1/campaigns/fast/decisions", json={"requests": users(1, feature_dim, prefix="w")})
    assert decided.json()["decisions"][0]["lambda"] == view["lambda"]
    metrics = client.get("/metrics").text
    assert 'saco_campaign_lambda{campaign="fast"}' in metrics and "saco_pacing_error" in metrics


def test_expected_mode_reserves_the_models_expected_cost_of_each_coupon(client: TestClient, feature_dim: int) -> None:
    """The model's value heads predict each coupon's cost for each user: an expected campaign reserves that
    (at most the coupon's cost), a strict one the coupon's cost; decisions show the coupon's cost in both."""
    body = {"requests": users(60, feature_dim, prefix="e")}
    reserved = {}
    for mode in ("strict", "expected"):
        put(client, cid=mode, reservation_mode=mode, **{"lambda": 0.0})
        decisions = client.post(f"/v1/campaigns/{mode}/decisions", json=body).json()["decisions"]
        faces = sum(d["cost"] for d in decisions)
        view = client.get(f"/v1/admin/campaigns/{mode}", headers=ADMIN).json()
        reserved[mode] = (view["reserved"], faces)
    assert reserved["strict"][0] == pytest.approx(reserved["strict"][1])
    assert reserved["expected"][1] == reserved["strict"][1] > 0  # the same coupons at lambda 0
    assert 0 < reserved["expected"][0] < reserved["expected"][1]


def test_expected_reservations_follow_the_manifest_s_cost_ratios(
    client: TestClient, model_store_dir: Path, feature_dim: int
) -> None:
    """A model whose calibration found its expected costs half the environment's (cost_ratios 2 for a user's
    first decision) reserves twice its expected costs for first decisions, never more than the coupon's
    cost; later decisions use the last ratio (1: the model's own)."""
    body = {"requests": users(60, feature_dim, prefix="r")}

    def first_and_second(cid: str) -> tuple[float, float, float]:
        put(client, cid=cid, reservation_mode="expected", **{"lambda": 0.0})
        views = []
        for _ in range(2):  # the same users twice: their first, then their second decision
            decisions = client.post(f"/v1/campaigns/{cid}/decisions", json=body).json()["decisions"]
            views.append(client.get(f"/v1/admin/campaigns/{cid}", headers=ADMIN).json()["reserved"])
        return views[0], views[1] - views[0], sum(d["cost"] for d in decisions)

    plain_first, plain_second, faces = first_and_second("plain")
    republish(model_store_dir, cost_ratios=[2.0, 1.0])
    assert client.post("/v1/admin/models/reload", headers=ADMIN).json()["changed"]
    first, second, _ = first_and_second("corrected")
    assert 0 < plain_first < faces / 2  # room to double below the coupons' costs
    assert first == pytest.approx(2 * plain_first, abs=0.01 * 60)  # cents rounded per coupon
    assert second == pytest.approx(plain_second, abs=0.01)


def test_resolve_pacing_spends_each_request_its_share_of_the_budget(client: TestClient, feature_dim: int) -> None:
    """From lambda 0, a `resolve` campaign's first request already spends (in the model's expected costs) no
    more than its share of the budget: budget / expected_decisions per user; dual descent alone (the same
    campaign with `descent`) spends what lambda 0 spends until a pacing step has seen it. The share, a cent
    per decision, is below the default floor of most coupons (2% of their cost): no floor but the cent here."""
    body = {"requests": users(50, feature_dim, prefix="s")}
    views = {}
    for method in ("resolve", "descent"):
        put(
            client,
            cid=method,
            reservation_mode="expected",
            expected_decisions=100_000,
            pacing_method=method,
            min_redemption=0.0,
            **{"lambda": 0.0},
        )
        decisions = client.post(f"/v1/campaigns/{method}/decisions", json=body).json()["decisions"]
        views[method] = (client.get(f"/v1/admin/campaigns/{method}", headers=ADMIN).json(), decisions[0]["lambda"])
    share = 1000.0 / 100_000 * 50  # 0.50
    (resolve, resolve_lambda), (descent, descent_lambda) = views["resolve"], views["descent"]
    assert resolve["pacing_method"] == "resolve" and resolve_lambda > 0.0 and descent_lambda == 0.0
    assert resolve["reserved"] <= share < descent["reserved"]
