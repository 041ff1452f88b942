import itertools

import numpy as np

from offline.rollout import rollout
from research.baselines import MyopicOracle, RandomAtSpend
from research.simulate import simulate_logs
from research.world import SyntheticWorld, WorldConfig


def test_expected_response_matches_realised_average():
    world = SyntheticWorld(WorldConfig(users=20_000, rounds=1, seed=4))
    ep = world.start()
    er, ec = world.expected_response(ep)
    actions = np.full(20_000, 3)
    resp = world.step(ep, actions)
    assert abs(resp.reward.mean() - er[:, 3].mean()) < 0.03 * er[:, 3].mean()
    assert abs(resp.cost.mean() - ec[:, 3].mean()) < 0.03 * ec[:, 3].mean()


def test_each_carry_over_effect_has_its_sign():
    base = WorldConfig(users=5000, rounds=2, seed=1, habit=0.0, fatigue=0.0, reference=0.0)

    def second_round_purchase(cfg, first_action, second_action):
        world = SyntheticWorld(cfg)
        ep = world.start()
        world.step(ep, np.full(cfg.users, first_action))
        return world.purchase_probability(ep)[:, second_action].mean()

    # fatigue: a coupon after a coupon lifts less than a coupon after none
    cfg = WorldConfig(**{**base.__dict__, "fatigue": 0.8})
    assert second_round_purchase(cfg, 3, 3) < second_round_purchase(base, 3, 3)
    # reference: no coupon after the big coupon sells less
    cfg = WorldConfig(**{**base.__dict__, "reference": 0.8})
    assert second_round_purchase(cfg, 3, 0) < second_round_purchase(cfg, 0, 0)
    # habit: a coupon (more purchases) raises the next no-coupon purchase rate
    cfg = WorldConfig(**{**base.__dict__, "habit": 0.8})
    assert second_round_purchase(cfg, 3, 0) > second_round_purchase(cfg, 0, 0)


def test_myopic_world_has_no_carry_over():
    cfg = WorldConfig(users=3000, rounds=3, seed=2).myopic()
    world = SyntheticWorld(cfg)
    a, b = world.start(), world.start()
    world.step(a, np.zeros(3000, dtype=int))
    world.step(b, np.full(3000, 3))
    np.testing.assert_allclose(world.purchase_probability(a), world.purchase_probability(b))


def test_oracle_spend_falls_with_lambda_and_beats_random_at_its_spend():
    world = SyntheticWorld(WorldConfig(users=2000, rounds=4, seed=3))
    costs = [rollout(world, MyopicOracle(), lam, seed=5).cost for lam in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(x >= y for x, y in itertools.pairwise(costs))
    oracle = rollout(world, MyopicOracle(), 1.0, seed=5)
    # random with about the same spend
    lam = min(
        np.linspace(0, 5, 60), key=lambda lam: abs(rollout(world, RandomAtSpend(4), lam, seed=5).cost - oracle.cost)
    )
    rand = rollout(world, RandomAtSpend(4), lam, seed=5)
    assert rand.cost <= oracle.cost * 1.1 and oracle.revenue > rand.revenue


def test_simulated_logs_follow_the_contract():
    table = simulate_logs(WorldConfig(users=50, rounds=3, seed=0))
    assert table.num_rows == 150
    assert {"user_id", "t", "action", "cost", "reward", "f0", "f7"} <= set(table.column_names)
    cost = np.asarray(table.column("cost"))
    action = np.asarray(table.column("action"))
    assert (cost[action == 0] == 0).all() and (cost >= 0).all()
