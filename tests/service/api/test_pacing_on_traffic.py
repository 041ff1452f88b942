"""Pacing on traffic as well as time: a campaign whose whole plan arrives inside one pacing interval (60 s,
never reached here) is still paced, a step after each share of the plan's decisions or of the budget
(SACO_PACING_STEP_SHARE, 0.02); on every kind of store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_http import ADMIN, campaign_body, users

from service.app import create_app
from service.settings import Settings

PLAN = 2_000  # the campaign's expected_decisions, all sent within seconds
BATCH = 50
SHARE = 0.02


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    settings.pacing_interval_s = 60.0  # the timer never steps within the test
    settings.pacing_step_share = SHARE
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def decide(client: TestClient, feature_dim: int, cid: str, requests: range) -> dict[str, Any]:
    """BATCH new users a request; the campaign view after the last."""
    for n in requests:
        body = {"requests": users(BATCH, feature_dim, prefix=f"{cid}-{n}-", value=0.1 + 0.002 * n)}
        assert client.post(f"/v1/campaigns/{cid}/decisions", json=body).status_code == 200
    return dict(client.get(f"/v1/admin/campaigns/{cid}", headers=ADMIN).json())


def test_a_plan_that_arrives_inside_one_interval_is_paced_on_its_traffic(client: TestClient, feature_dim: int) -> None:
    """`resolve` spreads what the budget has left over the decisions the plan still expects, as of the last
    step. The budget is tripled halfway through the plan: steps on traffic spread the new money over the
    rest of the plan, and spend meets the plan at 90% of it (with the timer alone the first budget's rate
    would hold: 0.62 of the plan). A `descent` campaign at lambda 0 spending ahead of its plan has its
    lambda raised within the first fifth of the plan."""
    plan = {"expected_decisions": PLAN, "reservation_mode": "expected", "overspend_risk": 0.5, "min_redemption": 0.0}
    assert client.put("/v1/admin/campaigns/c", json=campaign_body(100.0, **plan), headers=ADMIN).status_code == 200
    half = decide(client, feature_dim, "c", range(PLAN // BATCH // 2))
    # the last step saw the traffic up to one share (and one request) ago
    assert half["plan"] >= (0.5 - SHARE - BATCH / PLAN) * 100.0
    assert half["allowance"] == pytest.approx(100.0 / PLAN, rel=0.2)
    client.patch("/v1/admin/campaigns/c", json={"budget": 300.0}, headers=ADMIN)
    end = decide(client, feature_dim, "c", range(PLAN // BATCH // 2, PLAN * 9 // 10 // BATCH))
    committed = end["spent"] + end["reserved"]
    assert end["allowance"] > 3 * half["allowance"]  # (300 - 50) / 1,000 decisions left, at the step after
    assert 0.8 * 0.9 * 300.0 <= committed <= 300.0

    body = campaign_body(200.0, pacing_method="descent", **plan, **{"lambda": 0.0})
    assert client.put("/v1/admin/campaigns/d", json=body, headers=ADMIN).status_code == 200
    view = decide(client, feature_dim, "d", range(PLAN // BATCH // 5))
    assert view["lambda_source"] == "pacing" and view["lambda"] > 0.0 and view["pacing_error"] > 0
