"""A model scoring coupons and bundles by their features, served: the load checks its action table's names
and runs `catalog_terms`; the batcher gives each campaign's jobs their own table; the score terms of bundles
of several coupons come from the model, floored, and pacing plans with them; a user's context actions become
the model's actions (rows of the action table, or the dominant coupon for a model by index)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from svc_feature_models import NUM_ACTIONS, publish, random_inputs

from contract.catalog import BUNDLE_ACTIONS, ActionRows, Catalog
from contract.inputs import ModelInputs
from service.batcher import MicroBatcher
from service.lambdas import plan_lambda
from service.metrics import ServiceMetrics
from service.policy import LoadedPolicy, PolicyRejected, load_policy
from service.scoring import ActionRowsCache, ScoreTerms, model_actions
from service.state import CampaignConfig, CampaignSettings

CATALOG = Catalog.parse(
    [
        {"action": 1, "value": 2.0},
        {"action": 2, "kind": "percent", "value": 10.0, "cap": 5.0},
        {"action": 3, "value": 3.0, "min_spend": 25.0, "class": "threshold"},
    ],
    max_per_bundle=2,
)  # bundles 1, 2, 3, 1+2, 1+3, 2+3 (actions 1, 2, 3, BUNDLE_ACTIONS + 4, + 5, + 6)


def campaign(catalog: Catalog | None = CATALOG) -> CampaignConfig:
    coupons = {1: 200, 2: 500, 3: 300} if catalog is None else catalog.costs
    return CampaignConfig("c", CampaignSettings(budget=10**8, coupons=coupons, catalog=catalog))


@pytest.fixture
def feature_policy(tmp_path: Path) -> LoadedPolicy:
    publish(tmp_path / "store", by_features=True)
    return load_policy(str(tmp_path / "store"), "cpu")


def test_a_feature_model_loads_and_scores_any_catalogs_table(feature_policy: LoadedPolicy) -> None:
    assert feature_policy.by_features
    rows = CATALOG.action_rows(NUM_ACTIONS)
    inputs = random_inputs(4, 3, rows.rows(np.array([0, 1, 2, 3, BUNDLE_ACTIONS + 4, BUNDLE_ACTIONS + 6])), seed=0)
    out = feature_policy.scores(inputs, rows.table)
    assert out.shape == (4, 3 * (NUM_ACTIONS + 3)) and np.isfinite(out).all()
    # its own table (the training catalog's) through score_terms: [B, 3K]
    assert feature_policy.scores(random_inputs(4, 3, NUM_ACTIONS, seed=1)).shape == (4, 3 * NUM_ACTIONS)


def test_a_model_reading_other_action_features_is_refused(tmp_path: Path) -> None:
    publish(tmp_path / "store", by_features=True, action_features=["step", "coupons", "amount_off"])
    with pytest.raises(PolicyRejected, match=r"action_features \['step', 'coupons', 'amount_off'\] are not"):
        load_policy(str(tmp_path / "store"), "cpu")


def test_a_manifest_naming_features_of_a_model_by_index_is_refused(tmp_path: Path) -> None:
    from contract.catalog import ACTION_FEATURES

    publish(tmp_path / "store", by_features=False, action_features=list(ACTION_FEATURES))
    with pytest.raises(PolicyRejected, match="test forward of catalog_terms on a 7-row action table failed"):
        load_policy(str(tmp_path / "store"), "cpu")


class CountingPolicy(LoadedPolicy):
    """The real policy, keeping each forward's rows and action table."""

    forwards: list[tuple[int, np.ndarray | None]]

    def scores(self, inputs: ModelInputs, table: np.ndarray | None = None) -> np.ndarray:
        self.forwards.append((inputs.rows, table))
        return super().scores(inputs, table)


def test_jobs_of_campaigns_with_different_catalogs_in_one_round_get_their_own_tables(
    feature_policy: LoadedPolicy,
) -> None:
    policy = CountingPolicy(feature_policy.artifact, feature_policy.module, feature_policy.device)
    object.__setattr__(policy, "forwards", [])
    cache = ActionRowsCache()
    first, second = campaign(), campaign(None)  # a catalog of bundles; three coupons alone
    tables = [cache.of(first, NUM_ACTIONS), cache.of(second, NUM_ACTIONS), cache.of(first, NUM_ACTIONS)]
    assert tables[0] is tables[2] and tables[0] is cache.of(campaign(), NUM_ACTIONS)  # the same catalog object
    assert len(tables[0].table) == NUM_ACTIONS + 3 and len(tables[1].table) == NUM_ACTIONS
    jobs = [
        random_inputs(rows, length, np.arange(len(t.table)), seed)
        for seed, (rows, length, t) in enumerate([(2, 3, tables[0]), (3, 2, tables[1]), (4, 4, tables[2])])
    ]
    separate = [policy.scores(inputs, t.table) for inputs, t in zip(jobs, tables, strict=True)]
    policy.forwards.clear()

    async def main() -> list[np.ndarray]:
        batcher = MicroBatcher(max_rows=64, max_wait_s=0.5, queue_size=16, threads=1, metrics=ServiceMetrics())
        await batcher.start()
        try:
            tickets = [batcher.expect().__enter__() for _ in jobs]  # one round: the thread waits for all three
            return list(
                await asyncio.gather(
                    *(
                        batcher.scores(policy, inputs, ticket, t.table)
                        for inputs, ticket, t in zip(jobs, tickets, tables, strict=True)
                    )
                )
            )
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    for got, want in zip(results, separate, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # one forward per table: the two jobs of the first catalog together
    assert sorted((rows, len(table)) for rows, table in policy.forwards if table is not None) == [
        (3, NUM_ACTIONS),
        (6, NUM_ACTIONS + 3),
    ]


def test_action_rows_are_kept_per_catalog_until_it_changes() -> None:
    cache = ActionRowsCache(size=2)
    rows = cache.of(campaign(), NUM_ACTIONS)
    assert cache.of(campaign(), NUM_ACTIONS) is rows
    changed = Catalog.build(CATALOG.coupons, max_per_bundle=1)
    assert len(cache.of(campaign(changed), NUM_ACTIONS).table) == NUM_ACTIONS
    assert cache.of(campaign(), NUM_ACTIONS + 1).num_actions == NUM_ACTIONS + 1
    plain = cache.of(campaign(None), NUM_ACTIONS)
    assert cache.of(campaign(None), NUM_ACTIONS) is plain
    np.testing.assert_array_equal(plain.table, Catalog.of_costs({1: 200, 2: 500, 3: 300}).action_rows(6).table)


def test_context_actions_become_the_models_actions() -> None:
    held = np.array([[0, 1, 3, BUNDLE_ACTIONS + 4, BUNDLE_ACTIONS + 6, BUNDLE_ACTIONS + 9]])
    rows: ActionRows = CATALOG.action_rows(NUM_ACTIONS)
    # by features: each decision's row (a bundle of several coupons its own; one no longer listed, no coupon)
    assert model_actions(held, CATALOG, rows).tolist() == [[0, 1, 3, NUM_ACTIONS, NUM_ACTIONS + 2, 0]]
    # by index: the dominant coupon (the dearest: 1+2 -> 2 (5.00), 2+3 -> 2), a bundle no longer listed 0
    assert model_actions(held, CATALOG, None).tolist() == [[0, 1, 3, 2, 2, 0]]
    assert model_actions(held, None, None).tolist() == [[0, 1, 3, 0, 0, 0]]
    plain = np.array([[0, 2, 1]])
    assert model_actions(plain, None, None) is plain  # nothing to map: as stored


def bundle_outputs(rows: int, revenue: list[float], cost: list[float], now: list[float]) -> np.ndarray:
    """`catalog_terms` of CATALOG's table, the same for every user: K coupon columns, then 1+2, 1+3, 2+3."""
    return np.tile(np.array(revenue + cost + now, np.float32), (rows, 1))


def test_bundles_of_several_coupons_take_the_models_terms_floored() -> None:
    revenue = [1.0, 2.0, 3.0, 1.5, 0.0, 0.0, 9.0, 0.5, 8.0]  # 1+2 scores 9 alone, far from the additive 4
    cost = [0.0, 0.5, 1.0, 0.2, 0.0, 0.0, 0.1, 4.0, 0.0]
    now = [0.0, 1.0, 2.0, 0.5, 0.0, 0.0, 3.0, 3.0, 3.0]
    outputs = bundle_outputs(2, revenue, cost, now)
    outputs[1, 7] = np.nan  # a user the model cannot score (a bundle's term): no coupon
    config = campaign()
    bundles = tuple(b.coupons for b in CATALOG.action_rows(NUM_ACTIONS).several)
    terms = ScoreTerms.split(outputs, config, [], np.zeros(2, np.int64), bundles)
    assert terms.revenue.shape == (2, NUM_ACTIONS) and terms.bundle_revenue is not None
    np.testing.assert_array_equal(terms.revenue[0], revenue[:NUM_ACTIONS])
    np.testing.assert_array_equal(terms.bundle_revenue[0], revenue[NUM_ACTIONS:])
    np.testing.assert_array_equal(terms.expected[0], [0, 100, 200, 50, 0, 0])  # coupons' own, cents
    assert terms.finite.tolist() == [True, False]
    floored = terms.floored(config, 0.5)  # floors: 1 -> 1.00, 2 -> 2.50, 3 -> 1.50
    assert floored.bundle_cost is not None
    np.testing.assert_allclose(floored.bundle_cost[0], [3.5, 4.0, 4.0])  # 1+2 and 2+3 at their floors' sum
    np.testing.assert_allclose(floored.cost[0, :4], [0.0, 1.0, 2.5, 1.5])
    several = floored.bundle_scores(0.5)
    assert several is not None
    np.testing.assert_allclose(several[0], [9.0 - 1.75, 0.5 - 2.0, 8.0 - 2.0])


def test_pacing_plans_with_the_models_bundle_scores() -> None:
    revenue = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 5.0, 0.0, 0.0]  # the model likes 1+2 far more than its coupons
    cost = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 2.0]
    now = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    config = campaign()
    bundles = tuple(b.coupons for b in CATALOG.action_rows(NUM_ACTIONS).several)
    terms = ScoreTerms.split(bundle_outputs(4, revenue, cost, now), config, [], np.zeros(4, np.int64), bundles)
    # each user takes 1+2 (spending its coupons' expected costs, 2.00) until lambda reaches 5; the additive
    # rule would have them take no bundle of several from lambda 1 on
    assert plan_lambda(terms, config, target=800, lam_max=100.0) == 0.0
    planned = plan_lambda(terms, config, target=799, lam_max=100.0)
    assert abs(planned - 5.0) < 1e-3
    additive = ScoreTerms(terms.revenue, terms.cost, terms.expected)
    assert plan_lambda(additive, config, target=399, lam_max=100.0) == pytest.approx(1.0, abs=1e-3)
