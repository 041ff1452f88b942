"""`resolve_lambda`: the one precedence of docs/api.md ("Which lambda prices a decision"), rule by rule: each
rule wins over every rule below it, and gives way to every rule above it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from contract.catalog import Catalog
from model_store import LambdaPoint, Manifest
from service.lambdas import resolve_lambda
from service.scoring import ScoreTerms
from service.state import CampaignConfig, CampaignSettings
from service.state.types import PacedState

MANIFEST = Manifest(
    version="v1",
    created_at="2026-01-01T00:00:00Z",
    model_sha256="0" * 64,
    feature_dim=2,
    num_actions=2,
    context_length=2,
    max_timestep=8,
    objective="value",
    initial_rtg=1.0,
    initial_ctg=1.0,
    score_terms=True,
    default_lambda=0.5,
    lambda_table=[LambdaPoint(0.25, 3.0, 9.0), LambdaPoint(1.0, 1.0, 5.0)],
)
# one user: coupon 1 earns 10 and costs 10 in the score, expected cost 500 cents; none earns 0
TERMS = ScoreTerms(np.array([[0.0, 10.0]]), np.array([[0.0, 10.0]]), np.array([[0, 500]], np.int64))


def campaign(paced: PacedState | None = None, **settings: object) -> CampaignConfig:
    base = CampaignSettings(budget=100_000, coupons={1: 1000})
    return CampaignConfig("c", replace(base, **settings), paced)  # type: ignore[arg-type]


PLAN = {"expected_decisions": 1000}  # a plan: pacing on, `resolve` by default
PACED = PacedState(lam=2.0, allowance=100.0, ratios={})  # 1 euro per decision: too little for coupon 1


def resolve(config: CampaignConfig, terms: ScoreTerms | None = None, manifest: Manifest = MANIFEST) -> tuple:
    return resolve_lambda(config, manifest, terms, pacing_lambda_max=50.0)


def test_each_rule_in_its_place() -> None:
    lam, source = resolve(campaign(PACED, admin_lambda=0.1, **PLAN), TERMS)
    assert source == "resolve" and lam == pytest.approx(1.0, abs=1e-5)  # coupon 1 (5 euros expected) priced out
    assert resolve(campaign(PACED, admin_lambda=0.1, **PLAN)) == (2.0, "pacing")  # no terms: no re-solve
    assert resolve(campaign(PACED, admin_lambda=0.1, pacing_method="descent", **PLAN), TERMS) == (2.0, "pacing")
    assert resolve(campaign(PACED, admin_lambda=0.1, pacing=False, **PLAN), TERMS) == (0.1, "admin")
    assert resolve(campaign(None, admin_lambda=0.1, expected_users=100), TERMS) == (0.1, "admin")
    # 1,000 euros over 100 users: 10 per user fits the table's 0.25 (3 per user)
    assert resolve(campaign(None, expected_users=100), TERMS) == (0.25, "calibration")
    assert resolve(campaign(None, expected_users=1000)) == (1.0, "calibration")  # 1 per user: 1.0 fits
    assert resolve(campaign(None), TERMS) == (0.5, "model-default")
    bare = replace(MANIFEST, default_lambda=None, lambda_table=[])
    assert resolve(campaign(None, expected_users=100), TERMS, bare) == (0.0, "none")


def test_resolve_gives_way_without_an_allowance_or_a_scored_user() -> None:
    # before the first pacing step the allowance is the budget over the expected decisions
    assert resolve(campaign(None, admin_lambda=0.1, expected_decisions=100), TERMS) == (0.0, "resolve")  # 10 each
    lam, source = resolve(campaign(None, admin_lambda=0.1, **PLAN), TERMS)  # 1 each: coupon 1 priced out
    assert source == "resolve" and lam == pytest.approx(1.0, abs=1e-5)
    unscored = ScoreTerms(np.array([[np.nan, np.nan]]), TERMS.cost, TERMS.expected)
    assert resolve(campaign(PACED, **PLAN), unscored) == (2.0, "pacing")
    no_allowance = PacedState(lam=2.0, allowance=None, ratios={})
    assert resolve(campaign(no_allowance, **PLAN), TERMS) == (2.0, "pacing")


@pytest.mark.parametrize("paced", [PACED, None])
def test_pacing_starts_from_the_rules_below_it(paced: PacedState | None) -> None:
    config = campaign(paced, expected_users=100, **PLAN)
    assert resolve_lambda(config, MANIFEST, TERMS, paced=False) == (0.25, "calibration")


def test_resolve_plans_a_catalogs_bundles_by_their_coupons_expected_costs() -> None:
    """A bundle spends the sum of its coupons' expected costs: the bundle of 1 and 2 (5 + 3 euros expected)
    is priced out of a 6-euro allowance where each coupon alone would not be."""
    terms = ScoreTerms(
        np.array([[0.0, 10.0, 10.0]]), np.array([[0.0, 10.0, 10.0]]), np.array([[0, 500, 300]], np.int64)
    )
    manifest = replace(MANIFEST, num_actions=3)
    plain = Catalog.of_costs({1: 1000, 2: 1000})
    bundled = Catalog.build(plain.coupons, [[1], [2], [1, 2]])
    paced = PacedState(lam=2.0, allowance=600.0, ratios={})
    base = campaign(paced, coupons={1: 1000, 2: 1000}, **PLAN)
    alone, source = resolve_lambda(base, manifest, terms, pacing_lambda_max=50.0)
    both, _ = resolve_lambda(
        replace(base, settings=replace(base.settings, catalog=bundled)), manifest, terms, pacing_lambda_max=50.0
    )
    assert source == "resolve" and alone == 0.0  # 5 euros, the best coupon alone, fits 6
    assert both == pytest.approx(1.0, abs=1e-5)  # above 1, each coupon loses and the bundle of both with them
