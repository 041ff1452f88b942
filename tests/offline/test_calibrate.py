import numpy as np
import pytest

from offline.calibrate import search_monotone, search_slsqp


def staircase(lam: float) -> tuple[float, float]:
    """A realistic spend curve: decreasing, piecewise constant (many discrete decisions)."""
    cost = float(np.floor(10_000 * np.exp(-lam)) / 1.0)
    return 3 * cost**0.8, cost


@pytest.mark.parametrize("budget", [500.0, 2_000.0, 7_500.0])
def test_monotone_search_hits_the_band_never_above(budget: float):
    result = search_monotone(staircase, budget)
    assert result.converged
    assert 0.98 * budget <= result.cost <= budget
    assert result.passes <= 25
    assert len(result.history) == result.passes


def test_non_binding_budget_returns_lambda_zero():
    result = search_monotone(staircase, 50_000.0)
    assert result.lam == 0.0 and result.cost == 10_000 and not result.converged


def test_unreachable_budget_raises():
    with pytest.raises(RuntimeError, match="under the budget"):
        search_monotone(lambda lam: (1.0, 100.0), 10.0, lam_max=100.0)


def test_slsqp_never_reports_above_budget():
    result = search_slsqp(staircase, 2_000.0, max_iterations=15)
    assert result.cost <= 2_000.0
    assert result.passes >= 1


def test_bad_budget():
    with pytest.raises(ValueError):
        search_monotone(staircase, float("nan"))
