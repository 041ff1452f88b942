"""The service's `strict` ledger as rollouts simulate it (contract/ranking.py `first_fit`, offline/rollout.py
`StrictReservation`); reserve.lua is held against `first_fit` in tests/service/state/test_contract.py."""

import numpy as np

from contract.money import rounded_cents as to_cents
from contract.ranking import first_fit
from offline.rollout import StrictReservation, rollout
from research.baselines import MyopicOracle
from research.world import SyntheticWorld, WorldConfig

PRICES = to_cents(np.array([0.0, 2.0, 5.0, 10.0]))


def test_first_fit_by_hand() -> None:
    # row 0 gains 3 (prefers 10.00), row 1 gains 4 (prefers 5.00, then 2.00), row 2 ranks no coupon above 2.00
    scores = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 3.0, 4.0, 1.0], [1.0, 0.5, -1.0, 0.9]])
    actions, refused = first_fit(scores, PRICES.copy(), 600)
    # row 1 goes first and takes 5.00; with 1.00 left, none of row 0's coupons (10.00, 5.00, 2.00) fits
    assert actions.tolist() == [0, 2, 0]
    assert refused.tolist() == [True, False, False]
    actions, _ = first_fit(scores, PRICES.copy(), 700)
    assert actions.tolist() == [1, 2, 0]  # with 2.00 left, row 0's last coupon fits
    actions, refused = first_fit(scores, PRICES.copy(), 10_000)
    assert actions.tolist() == [3, 2, 0] and not refused.any()


def test_strict_ledger_never_overspends_and_does_not_bind_when_money_is_plenty() -> None:
    world = SyntheticWorld(WorldConfig(users=600, rounds=5, seed=3))
    free = rollout(world, MyopicOracle(), 0.0, seed=4)
    budget = 0.3 * free.sampled_cost
    for lam in (0.0, 0.5, 2.0):
        ledger = StrictReservation(budget, world.config.coupon_values, request_size=64, seed=1)
        held = rollout(world, MyopicOracle(), lam, seed=4, reservation=ledger)
        assert held.sampled_cost <= budget
    at_zero = rollout(world, MyopicOracle(), 0.0, seed=4, reservation=ledger)
    assert at_zero.refused > 0 and at_zero.sampled_cost >= 0.9 * budget
    plenty = StrictReservation(1e9, world.config.coupon_values, seed=1)
    unbound = rollout(world, MyopicOracle(), 0.5, seed=4, reservation=plenty)
    assert unbound.refused == 0
    assert unbound.cost == rollout(world, MyopicOracle(), 0.5, seed=4).cost
