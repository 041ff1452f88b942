"""Recalibration and pacing agree: a new admin lambda (an operator's, or the learning loop's recalibration,
which sets it through this API) is where a paced campaign's pacing goes on from; a `resolve` campaign still
prices each request by its re-solve; an unpaced campaign serves the lambda as set. On every kind of store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_http import ADMIN, campaign_body, users

from service.app import create_app
from service.settings import Settings

PLAN = 1_000
BATCH = 50


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    settings.pacing_interval_s = 60.0  # steps come on traffic only
    settings.pacing_step_share = 0.05
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def decide(client: TestClient, feature_dim: int, cid: str, requests: range) -> list[dict[str, Any]]:
    decisions: list[dict[str, Any]] = []
    for n in requests:
        body = {"requests": users(BATCH, feature_dim, prefix=f"{cid}-{n}-", value=0.1 + 0.002 * n)}
        response = client.post(f"/v1/campaigns/{cid}/decisions", json=body)
        assert response.status_code == 200
        decisions += response.json()["decisions"]
    return decisions


def view(client: TestClient, cid: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/admin/campaigns/{cid}", headers=ADMIN).json())


def recalibrate(client: TestClient, cid: str, lam: float) -> dict[str, Any]:
    response = client.patch(f"/v1/admin/campaigns/{cid}", json={"lambda": lam}, headers=ADMIN)
    assert response.status_code == 200
    return dict(response.json())


def test_a_paced_campaign_goes_on_from_the_recalibrated_lambda(client: TestClient, feature_dim: int) -> None:
    plan = {"expected_decisions": PLAN, "pacing_method": "descent", "lambda": 0.0}
    assert client.put("/v1/admin/campaigns/d", json=campaign_body(50.0, **plan), headers=ADMIN).status_code == 200
    decide(client, feature_dim, "d", range(4))
    before = view(client, "d")
    assert before["lambda_source"] == "pacing" and before["allowance"] is not None
    after = recalibrate(client, "d", 7.5)
    # pacing's lambda is the new one at once; what pacing measured of the traffic stays
    assert (after["lambda"], after["lambda_source"], after["allowance"]) == (7.5, "pacing", before["allowance"])
    assert {d["lambda"] for d in decide(client, feature_dim, "d", range(4, 5))} == {7.5}
    # the next step moves on from 7.5, not from where pacing was before
    decide(client, feature_dim, "d", range(5, 8))
    stepped = view(client, "d")
    assert stepped["lambda_source"] == "pacing"
    assert abs(stepped["lambda"] - 7.5) < abs(stepped["lambda"] - before["lambda"])


def test_a_resolve_campaign_prices_each_request_by_its_re_solve(client: TestClient, feature_dim: int) -> None:
    plan = {"expected_decisions": PLAN, "reservation_mode": "expected", "min_redemption": 0.0}
    assert client.put("/v1/admin/campaigns/r", json=campaign_body(50.0, **plan), headers=ADMIN).status_code == 200
    decide(client, feature_dim, "r", range(4))
    recalibrate(client, "r", 40.0)
    lambdas = {d["lambda"] for d in decide(client, feature_dim, "r", range(4, 6))}
    assert 40.0 not in lambdas  # each request's own lambda, at its share of the budget left


def test_an_unpaced_campaign_serves_the_recalibrated_lambda(client: TestClient, feature_dim: int) -> None:
    assert client.put("/v1/admin/campaigns/u", json=campaign_body(50.0), headers=ADMIN).status_code == 200
    decide(client, feature_dim, "u", range(1))
    after = recalibrate(client, "u", 2.5)
    assert (after["lambda"], after["lambda_source"], after["pacing"]) == (2.5, "admin", False)
    assert {d["lambda"] for d in decide(client, feature_dim, "u", range(1, 2))} == {2.5}
