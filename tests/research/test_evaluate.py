"""`saco evaluate`'s calibration of every policy to every budget level (research/evaluate.py)."""

import math

import pytest

from research.evaluate import BUDGET_LEVELS, LEVEL_NAMES, calibrate_comparison, calibrate_levels


def spend_curve(floor: float):
    """Spend 1,000 at lambda 0 falling toward `floor`; revenue grows with spend."""

    def simulate(lam: float) -> tuple[float, float]:
        cost = floor + (1_000.0 - floor) * math.exp(-lam)
        return 5.0 * cost, cost

    return simulate


def test_levels_out_of_one_policys_reach_are_skipped_for_all_with_a_warning():
    warnings: list[str] = []
    # reference spend 1,000: levels 0.10 .. 0.80 x 1,000; "floored" never spends under 250
    sims = {"good": spend_curve(0.0), "floored": spend_curve(250.0)}
    rows, skipped = calibrate_comparison(sims, 1_000.0, warnings.append, max_passes=60)
    reachable = [name for name, frac in zip(LEVEL_NAMES, BUDGET_LEVELS, strict=True) if frac * 1_000.0 > 250.0]
    assert [r.level for r in rows if r.policy == "good"] == reachable
    assert [r.level for r in rows if r.policy == "floored"] == reachable
    assert all(r.result.cost <= r.budget for r in rows)
    assert len(skipped) == len(warnings) == len(LEVEL_NAMES) - len(reachable)
    first = warnings[0]
    assert first.startswith("warning: budget level Low-1 (0.10 x the reference spend) skipped: policy floored")
    assert "against a budget of 100.00" in first and "raise the budget" in first


def test_no_level_reachable_fails_with_the_advice():
    with pytest.raises(RuntimeError, match=r"no budget level can be compared.*policy floored cannot be brought"):
        calibrate_comparison({"floored": spend_curve(900.0)}, 1_000.0, lambda _msg: None)


def test_calibrate_levels_names_the_policy():
    with pytest.raises(RuntimeError, match="budget level Low-1: policy floored cannot be brought under the budget"):
        calibrate_levels("floored", spend_curve(250.0), 1_000.0)
