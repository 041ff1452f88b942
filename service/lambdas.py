"""Which lambda prices a campaign's decisions: `resolve_lambda`, one precedence."""

from __future__ import annotations

import numpy as np

from contract.money import from_cents
from contract.ranking import bundle_scores, finite_rows
from model_store import Manifest
from service.scoring import ScoreTerms
from service.state import CampaignConfig

PLAN_LAMBDA_STEPS = 24  # bisection steps: lambda to within lam_max / 2^24


def plan_lambda(terms: ScoreTerms, campaign: CampaignConfig, target: float, lam_max: float) -> float:
    """The smallest lambda in [0, lam_max] at which the request's expected spend fits `target` cents: each
    user takes their best offered action (a catalog campaign's: bundle) or none at that lambda, and spends
    its expected cost corrected by the campaign's realised / predicted ratio of that action (of each coupon of
    a bundle). Bundles rank by the scores `choose` ranks them by (contract/ranking.py `bundle_scores`: a
    model's own scores of bundles of several coupons when it has them); a bundle spends the sum of its
    coupons' expected costs. Bisection: spend falls as lambda rises. Users whose terms are not finite are left
    out (they get no coupon), as is a user whose scores at a lambda are not."""
    terms = terms.take(terms.finite)
    k = terms.revenue.shape[1]
    ratios = np.ones(k)
    if campaign.paced is not None:
        for action, ratio in campaign.paced.ratios.items():
            if 0 < action < k:
                ratios[action] = ratio
    spend = terms.expected * ratios
    rows = np.arange(len(spend))
    catalog = campaign.settings.catalog
    if catalog is None:
        offered = np.zeros(k, np.bool_)
        offered[0] = True
        offered[[a for a in campaign.coupons if 0 < a < k]] = True

        def columns(scores: np.ndarray, several: np.ndarray | None) -> np.ndarray:
            return np.where(offered, scores, -np.inf)

    else:  # a catalog's bundles (contract/ranking.py): a bundle spends its coupons' expected costs
        bundles = [b.coupons for b in catalog.bundles]
        spend = np.concatenate([np.zeros((len(spend), 1)), spend @ catalog.membership(k)], axis=1)

        def columns(scores: np.ndarray, several: np.ndarray | None) -> np.ndarray:
            return bundle_scores(scores, bundles, several)

    def spent(lam: float) -> float:
        scores, several = terms.scores(lam), terms.bundle_scores(lam)
        chosen = columns(scores, several).argmax(axis=1)
        chosen[~finite_rows(scores, several)] = 0
        return float(spend[rows, chosen].sum())

    if spent(0.0) <= target:
        return 0.0
    low, high = 0.0, lam_max
    if spent(high) > target:
        return high
    for _ in range(PLAN_LAMBDA_STEPS):
        middle = (low + high) / 2
        low, high = (low, middle) if spent(middle) <= target else (middle, high)
    return high


def resolve_lambda(
    campaign: CampaignConfig,
    manifest: Manifest,
    terms: ScoreTerms | None = None,
    *,
    pacing_lambda_max: float = 0.0,
    paced: bool = True,
) -> tuple[float, str]:
    """The lambda that prices a campaign's decisions and where it comes from (`lambda_source`). The first
    that applies wins (docs/api.md, "Which lambda prices a decision"):

    1. `resolve`: pacing on with `pacing_method` "resolve", and this request's score terms given (`terms`,
       a model with `score_terms`) and an allowance known: the lambda at which the request's expected spend
       is its share of the budget left (`plan_lambda`, at most `pacing_lambda_max` lambda steps);
    2. `pacing`: pacing on and a pacing step has run: the lambda it left (dual descent, or the last
       re-solve's starting point);
    3. `admin`: the campaign's `lambda` (set by an operator, or by the learning loop's recalibration);
    4. `calibration`: the model's active calibration table, for the campaign's budget per `expected_users`;
    5. `model-default`: the active calibration's lambda (`default_lambda` of the served manifest);
    6. `none`: 0.

    `paced` False leaves out 1 and 2: the lambda a campaign starts from, where pacing begins."""
    settings = campaign.settings
    if paced and settings.pacing_on:
        if terms is not None and settings.pacing_method == "resolve":
            lam = _resolved(campaign, terms, manifest, pacing_lambda_max)
            if lam is not None:
                return lam, "resolve"
        if campaign.paced is not None:
            return campaign.paced.lam, "pacing"
    if settings.admin_lambda is not None:
        return settings.admin_lambda, "admin"
    if settings.expected_users and manifest.lambda_table:
        lam = manifest.lambda_for_budget_per_user(from_cents(settings.budget) / settings.expected_users)
        if lam is not None:
            return float(lam), "calibration"
    if manifest.default_lambda is not None:
        return float(manifest.default_lambda), "model-default"
    return 0.0, "none"


def lambda_scale(manifest: Manifest) -> float:
    """The size of a lambda step: the model's calibrated lambda (pacing's steps are fractions of it)."""
    return float(manifest.default_lambda) if manifest.default_lambda else 1.0


def _resolved(campaign: CampaignConfig, terms: ScoreTerms, manifest: Manifest, lambda_max: float) -> float | None:
    """The lambda at which this request's expected spend is its share of the budget left (what each decision
    may spend, times the request's users); None while no allowance is known or no user could be scored."""
    settings = campaign.settings
    allowance = None if campaign.paced is None else campaign.paced.allowance
    if allowance is None and campaign.paced is None and settings.expected_decisions:
        allowance = settings.budget / settings.expected_decisions  # before the first pacing step
    if allowance is None:
        return None
    planned = int(terms.finite.sum())  # users the model could not score get no coupon: not planned for
    if not planned:
        return None
    return plan_lambda(terms, campaign, allowance * planned, lambda_max * lambda_scale(manifest))
