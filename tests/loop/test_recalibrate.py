"""Recalibration through a real service's admin API: a campaign with a horizon gets the lambda whose
simulated spend over its remaining decisions meets its remaining budget; one without is left alone."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from svc_served import ADMIN, ADMIN_TOKEN, serve

from contract.catalog import Catalog
from loop.actions import TrainingTable
from loop.retrain import recalibrate_campaigns
from model_store import ModelStore
from offline.export import export_and_publish
from offline.logs import validate_table
from offline.train import TrainConfig, train
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


BUNDLE_COUPONS = [
    {"action": 1, "value": 2.0},
    {"action": 2, "kind": "percent", "value": 10.0, "cap": 5.0},
    {"action": 3, "value": 3.0, "min_spend": 25.0},
]


def test_a_model_by_features_is_offered_the_campaigns_bundles(
    redis_url: str, redis_prefix: str, model_store_dir: Path, tmp_path: Path
) -> None:
    """A model scoring by features, its environment learned on bundle logs whose actions are the training table's
    rows: a campaign whose catalog allows the bundle 1+3 is simulated granting it, one of the coupons alone not."""
    catalog = Catalog.parse(BUNDLE_COUPONS, bundles=[[1], [2], [3], [1, 3]])
    table = TrainingTable(catalog.action_descriptors(), 4, ((1, 3),), catalog.coupons, {})
    env_logs = validate_table(simulate_logs(WorldConfig(users=300, rounds=4, seed=2, catalog=catalog)))
    assert env_logs.num_actions == 5  # the world's action 4 is the bundle 1+3: row K + 0
    result = train(env_logs, TrainConfig(epochs=1, d_model=16, num_actions=4), progress=False, action_table=table.table)
    artifact = export_and_publish(result, env_logs, ModelStore(tmp_path / "store"))
    with serve(model_store_dir, redis_url, prefix=redis_prefix) as (base,):
        for campaign, bundles in (("bundles", [[1], [2], [3], [1, 3]]), ("alone", None)):
            body = {"coupons": BUNDLE_COUPONS, "bundles": bundles, "budget": 1e6, "expected_decisions": 600}
            httpx.put(f"{base}/v1/admin/campaigns/{campaign}", json=body, headers=ADMIN).raise_for_status()
        with pytest.raises(ValueError, match="by features: recalibrating it needs the training table"):
            recalibrate_campaigns(base, ADMIN_TOKEN, ["bundles"], artifact, env_logs)
        both = recalibrate_campaigns(base, ADMIN_TOKEN, ["bundles", "alone"], artifact, env_logs, table=table)
    with_bundle, alone = both
    assert with_bundle.action == alone.action == "patched" and with_bundle.lam == alone.lam == 0.0
    # the same users and model: granting the bundle (worst case 5.00) spends otherwise than coupons alone
    assert with_bundle.predicted_spend != alone.predicted_spend
