"""The service's `strict` ledger as rollouts simulate it (offline/rollout.py `first_fit`, `StrictReservation`)."""

import numpy as np
import pytest

from contract.money import rounded_cents as to_cents
from contract.ranking import first_fit, preferences
from offline.rollout import StrictReservation, rollout
from research.baselines import MyopicOracle
from research.world import SyntheticWorld, WorldConfig

PRICES = to_cents(np.array([0.0, 2.0, 5.0, 10.0]))


def reference_grant(scores: np.ndarray, offered: list[int], prices: dict[int, int], available: int) -> list[int]:
    """The service's rule written out as the service runs it: engine.preferences, then reserve.lua's loop."""
    prefs, priority = preferences(scores, offered)
    actions = [0] * len(scores)
    for row in priority.tolist():
        for candidate in prefs[row]:
            if candidate == 0:
                break
            if prices[candidate] <= available:
                actions[row] = candidate
                available -= prices[candidate]
                break
    return actions


@pytest.mark.parametrize("seed", range(6))
def test_first_fit_grants_what_the_service_grants(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(64, 4)).round(1)  # ties, so the stable orders matter
    offered = [1, 3] if seed % 2 else [1, 2, 3]
    prices = np.where(np.isin(np.arange(4), [0, *offered]), PRICES, -1)
    available = int(rng.integers(0, 40_000))
    actions, refused = first_fit(scores, prices, available)
    expected = reference_grant(scores, offered, {a: int(PRICES[a]) for a in offered}, available)
    assert actions.tolist() == expected
    assert int(prices[actions].sum()) <= available
    best = np.where(prices >= 0, scores, -np.inf).argmax(axis=1)
    assert refused.tolist() == [b != 0 and a != b for a, b in zip(actions, best, strict=True)]


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
