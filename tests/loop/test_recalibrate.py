"""Recalibration through a real service's admin API: a campaign with a horizon gets the lambda whose
simulated spend over its remaining decisions meets its remaining budget; one without is left alone."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from svc_served import ADMIN, ADMIN_TOKEN, serve

from loop.retrain import recalibrate_campaigns
from model_store import ModelStore
from offline.logs import validate_table
from research.simulate import simulate_logs
from research.world import WorldConfig

COUPONS = [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}, {"action": 3, "cost": 10.0}]


def test_campaigns_get_the_lambda_of_their_remaining_budget(
    redis_url: str, redis_prefix: str, model_store_dir: Path
) -> None:
    env_logs = validate_table(simulate_logs(WorldConfig(users=300, rounds=4, seed=1)))
    artifact = ModelStore(model_store_dir).load()
    with serve(model_store_dir, redis_url, prefix=redis_prefix) as (base,):

        def put(campaign: str, body: dict[str, object]) -> None:
            body = {"coupons": COUPONS, "lambda": 0.0, **body}
            httpx.put(f"{base}/v1/admin/campaigns/{campaign}", json=body, headers=ADMIN).raise_for_status()

        put("loose", {"budget": 1e6, "expected_decisions": 400})
        put("open", {"budget": 50.0})
        done = recalibrate_campaigns(base, ADMIN_TOKEN, ["loose", "open", "gone"], artifact, env_logs)
        loose, open_, gone = done
        assert loose.action == "patched" and loose.lam == 0.0 and loose.remaining_decisions == 400  # no binding
        assert open_.action == "skipped" and "no horizon" in open_.reason
        assert gone.action == "skipped" and gone.reason == "unknown to the service"
        assert loose.predicted_spend is not None and loose.predicted_spend > 0

        budget = round(0.9 * loose.predicted_spend, 2)  # the same traffic with less money: lambda must rise
        put("tight", {"budget": budget, "expected_decisions": 400})
        (tight,) = recalibrate_campaigns(base, ADMIN_TOKEN, ["tight"], artifact, env_logs)
        assert tight.action == "patched" and tight.lam is not None and tight.lam > 0, tight
        assert tight.predicted_spend is not None and tight.predicted_spend <= budget
        view = httpx.get(f"{base}/v1/admin/campaigns/tight", headers=ADMIN).json()
        assert view["lambda"] == pytest.approx(tight.lam)
