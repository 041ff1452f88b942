from typing import Any

import numpy as np
import pytest

from contract.catalog import Catalog
from offline.rollout import rollout
from research.baselines import MyopicOracle
from research.evaluate import oracle_at_spend
from research.world import SyntheticWorld, WorldConfig

# action 1: 5 off; action 2: 10% off at most 2.50; action 3: 4 off on a basket of 30 or more
COUPONS: list[dict[str, Any]] = [
    {"action": 1, "value": 5.0},
    {"action": 2, "kind": "percent", "value": 10.0, "cap": 2.5},
    {"action": 3, "value": 4.0, "min_spend": 30.0, "class": "threshold"},
]
CATALOG = Catalog.parse(COUPONS, bundles=[[1], [2], [3], [1, 2], [1, 3]])
ONE, PERCENT, THRESHOLD, ONE_PERCENT, ONE_THRESHOLD = 1, 2, 3, 4, 5  # world actions: positions in the bundles


def bundle_world(synergy: float = 0.0, users: int = 4000, rounds: int = 2, seed: int = 3) -> SyntheticWorld:
    return SyntheticWorld(WorldConfig(users=users, rounds=rounds, seed=seed, catalog=CATALOG, bundle_synergy=synergy))


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def test_actions_are_no_coupon_then_the_catalogs_bundles():
    world = bundle_world()
    assert world.num_actions == 1 + len(CATALOG.bundles) == 6
    assert [b.coupons for b in CATALOG.bundles][ONE_PERCENT - 1] == (1, 2)
    np.testing.assert_array_equal(world.values, [0.0, 5.0, 2.5, 4.0, 7.5, 9.0])  # what each reserves at worst


def test_percent_coupon_costs_its_share_of_the_basket_up_to_its_cap():
    world = bundle_world()
    ep = world.start()
    basket = ep.users.basket
    p = world.purchase_probability(ep)
    _, cost = world.expected_response(ep)
    discount = np.minimum(np.round(0.10 * basket, 2), 2.5)
    assert (basket < 25).any() and (basket > 25).any()  # both sides of the cap occur
    np.testing.assert_allclose(cost[:, PERCENT], p[:, PERCENT] * discount, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cost[:, ONE], p[:, ONE] * 5.0)
    # a larger discount lifts more: capped users get the same lift, the rest less
    gain = logit(p[:, PERCENT]) - logit(p[:, 0])
    sens = gain / np.sqrt(discount)
    np.testing.assert_allclose(sens, (logit(p[:, ONE]) - logit(p[:, 0])) / np.sqrt(5.0), rtol=1e-6)


def test_a_coupon_whose_min_spend_exceeds_the_basket_gives_no_lift_and_costs_nothing():
    world = bundle_world(rounds=2)
    ep = world.start()
    small = ep.users.basket < 30
    assert small.any() and (~small).any()
    world.step(ep, np.full(len(small), ONE))  # a coupon: the reference memory is now positive
    p = world.purchase_probability(ep)
    _, cost = world.expected_response(ep)
    np.testing.assert_array_equal(p[small, THRESHOLD], p[small, 0])
    np.testing.assert_array_equal(cost[small, THRESHOLD], 0.0)
    np.testing.assert_array_equal(cost[small, ONE_THRESHOLD], cost[small, ONE])  # only the 5 off applies
    assert (p[~small, THRESHOLD] > p[~small, 0]).all()
    np.testing.assert_allclose(cost[~small, THRESHOLD], 4.0 * p[~small, THRESHOLD])


def test_a_bought_bundle_costs_the_sum_of_its_coupons_discounts():
    world = bundle_world(users=20_000, rounds=1)
    ep = world.start()
    reward, cost = world.expected_response(ep)
    response = world.step(ep, np.full(20_000, ONE_PERCENT))
    discount = 5.0 + np.minimum(np.round(0.10 * ep.users.basket, 2), 2.5)
    bought = response.reward > 0
    np.testing.assert_allclose(response.cost[bought], discount[bought])
    assert (response.cost[~bought] == 0).all()
    # the exact expectation is what the draws average to
    assert abs(response.reward.mean() - reward[:, ONE_PERCENT].mean()) < 0.03 * reward[:, ONE_PERCENT].mean()
    assert abs(response.cost.mean() - cost[:, ONE_PERCENT].mean()) < 0.03 * cost[:, ONE_PERCENT].mean()


@pytest.mark.parametrize("synergy", [0.0, 0.5, -0.5, -1.0])
def test_a_bundles_lift_is_its_coupons_lifts_combined_by_the_synergy(synergy):
    world = bundle_world(synergy=synergy)
    p = world.purchase_probability(world.start())  # round 0: no reference memory
    gain = logit(p) - logit(p[:, :1])
    a, b = gain[:, ONE], gain[:, PERCENT]
    expected = a + b + synergy * np.minimum(a, b)
    np.testing.assert_allclose(gain[:, ONE_PERCENT], expected, rtol=1e-6, atol=1e-9)


def test_synergy_orders_the_bundles_purchase_probability():
    worlds = {s: bundle_world(synergy=s) for s in (-0.5, 0, 0.5)}
    probability = {s: world.purchase_probability(world.start()) for s, world in worlds.items()}
    active = probability[0][:, ONE] > probability[0][:, 0]  # users with some coupon sensitivity
    assert active.mean() > 0.5
    for low, high in ((-0.5, 0), (0, 0.5)):
        assert (probability[low][active, ONE_PERCENT] < probability[high][active, ONE_PERCENT]).all()
        np.testing.assert_array_equal(probability[low][:, :4], probability[high][:, :4])  # singles unchanged


def test_bad_bundle_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="bundle_synergy"):
        bundle_world(synergy=-1.5)
    with pytest.raises(ValueError, match="full_lift_discount"):
        SyntheticWorld(WorldConfig(catalog=CATALOG, full_lift_discount=0.0))


def test_without_a_catalog_the_world_follows_its_documented_response():
    """The plain world's round-0 purchase probability is the module docstring's formula with lift(a) =
    1.2 sqrt(value / max value), from the users' traits alone."""
    cfg = WorldConfig(users=3000, rounds=2, seed=7)
    world = SyntheticWorld(cfg)
    ep = world.start()
    u, x = ep.users, ep.state.x
    base = u.base + x @ world.state_weights
    sens = u.sensitivity * np.exp(x @ world.sens_weights * 0.5)
    values = np.array(cfg.coupon_values)
    formula = 1 / (1 + np.exp(-(base[:, None] + sens[:, None] * 1.2 * np.sqrt(values / values.max()))))
    np.testing.assert_allclose(world.purchase_probability(ep), formula, rtol=1e-12)
    _, cost = world.expected_response(ep)
    np.testing.assert_allclose(cost, world.purchase_probability(ep) * values)


def test_a_catalog_of_the_plain_coupons_alone_is_the_plain_world_exactly():
    plain = WorldConfig(users=3000, rounds=4, seed=5)
    catalog = Catalog.of_costs({a: round(v * 100) for a, v in enumerate(plain.coupon_values) if a > 0})
    worlds = [SyntheticWorld(plain), SyntheticWorld(WorldConfig(users=3000, rounds=4, seed=5, catalog=catalog))]
    episodes = [w.start() for w in worlds]
    for t in range(plain.rounds):
        first, second = (w.expected_response(ep) for w, ep in zip(worlds, episodes, strict=True))
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1], second[1])
        actions = (np.arange(3000) + t) % plain.num_actions
        steps = [w.step(ep, actions) for w, ep in zip(worlds, episodes, strict=True)]
        np.testing.assert_array_equal(steps[0].cost, steps[1].cost)
        np.testing.assert_array_equal(steps[0].reward, steps[1].reward)


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.6])
def test_the_bundle_oracle_never_spends_more_than_its_target(fraction):
    world = bundle_world(synergy=0.5, users=1500, rounds=4)
    everything = rollout(world, MyopicOracle(), 0.0, seed=11)
    budget = fraction * everything.cost
    found = oracle_at_spend(world, budget, seed=11)
    assert 0.995 * budget <= found.cost <= budget
    again = rollout(world, MyopicOracle(), found.lam, seed=11)
    assert again.cost == found.cost and again.revenue == found.revenue
    assert again.action_counts[ONE_PERCENT:].sum() > 0  # the oracle does grant bundles


def test_at_full_saturation_the_oracle_grants_no_bundle_and_earns_what_singles_earn():
    """At bundle_synergy -1 a bundle lifts as its best coupon and costs more: never worth granting."""
    singles = Catalog.parse(COUPONS)
    cfg = WorldConfig(users=1500, rounds=4, seed=2, catalog=CATALOG, bundle_synergy=-1.0)
    with_bundles = rollout(SyntheticWorld(cfg), MyopicOracle(), 0.3, seed=4)
    alone = rollout(SyntheticWorld(WorldConfig(**{**cfg.__dict__, "catalog": singles})), MyopicOracle(), 0.3, seed=4)
    assert with_bundles.action_counts[ONE_PERCENT:].sum() == 0
    assert with_bundles.revenue == alone.revenue and with_bundles.cost == alone.cost
