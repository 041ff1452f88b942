"""The decision path's array work: model inputs from contexts, score terms, ranking, the batch to reserve
and the rendered answer. Pure functions of their arguments."""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from contract.inputs import History, ModelInputs, history_inputs
from contract.money import from_cents
from contract.ranking import bundle_ranking, ranking
from model_store import Manifest
from service.metrics import ServiceMetrics
from service.schemas import DecisionsRequest
from service.state import CampaignConfig, CampaignSettings, ReserveBatch, ReserveResult, UserContext
from service.state.context import gather

log = logging.getLogger("saco.service.scoring")


def in_holdout(campaign_id: str, user_id: str, holdout_rate: float) -> bool:
    """Whether the user is in the campaign's holdout group: a hash of (campaign, user), uniform in [0, 1),
    below the rate. The same answer on every replica and every call while the rate stays."""
    if holdout_rate <= 0:
        return False
    digest = hashlib.blake2b(f"{campaign_id}\n{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < holdout_rate


def choose(
    scores: np.ndarray,
    expected: np.ndarray | None,
    campaign: CampaignConfig,
    body: DecisionsRequest,
    rows: np.ndarray,
    rng: random.Random,
    metrics: ServiceMetrics | None = None,
) -> tuple[list[int], ReserveBatch]:
    """The order in which users reserve (largest gain of their best coupon over none first) and the batch
    to reserve, its users in that order: the campaign's coupons by descending score down to "no coupon",
    the users' features (float32 rows), who is held out, who explores (with probability the exploration
    rate: a uniform draw with which the reservation picks among the coupons that fit instead), and the
    model's expected cost of each coupon for each user (cents) when it has one. A user whose scores are not
    all finite gets no coupon (not explored either): counted in `metrics` and logged. A catalog campaign
    ranks its bundles (contract/ranking.py `bundle_ranking`): the lists name them by position."""
    catalog = campaign.settings.catalog
    if catalog is None:
        lists, index, priority = ranking(scores, list(campaign.coupons))
    else:
        lists, index, priority = bundle_ranking(scores, [b.coupons for b in catalog.bundles])
    order: list[int] = priority.tolist()
    requests = body.requests
    user_ids = [requests[i].user_id for i in order]
    rate, holdout_rate = campaign.settings.exploration_rate, campaign.settings.holdout_rate
    finite = np.isfinite(scores).all(axis=1)
    holdout = (
        [p for p, user_id in enumerate(user_ids) if in_holdout(campaign.campaign_id, user_id, holdout_rate)]
        if holdout_rate > 0
        else []
    )
    explore: list[tuple[int, float]] = []
    if rate > 0:
        held_out = set(holdout)
        finite_in_order = finite[priority].tolist()
        for position in range(len(order)):
            if rng.random() < rate:
                draw = rng.random()
                if finite_in_order[position] and position not in held_out:
                    explore.append((position, draw))
    batch = ReserveBatch(
        user_ids=user_ids,
        request_ids=[requests[i].request_id for i in order],
        orderings=lists,
        ordering=[index[i] for i in order],
        features=np.ascontiguousarray(rows[priority], "<f4").tobytes(),
        holdout=holdout,
        explore=explore,
        expected_costs=None if expected is None else expected[priority].tolist(),
        bundles=None if catalog is None else [b.key for b in catalog.bundles],
    )
    if not finite.all():
        unscored = [requests[i].user_id for i in np.flatnonzero(~finite)]
        if metrics is not None:
            metrics.nonfinite_scores.labels(campaign=campaign.campaign_id).inc(len(unscored))
        log.warning(
            "the model's output is not finite for some users: they get no coupon",
            extra={"campaign": campaign.campaign_id, "users": len(unscored), "user_ids": unscored[:10]},
        )
    return order, batch


@dataclass(frozen=True)
class ScoreTerms:
    """A model's per-user score terms (`score_terms` of the exported module): score = revenue - lambda * cost.
    A user whose output row is not all finite has a NaN revenue row (hence NaN scores: no coupon) and every
    coupon at its face cost."""

    revenue: np.ndarray  # [B, K], currency units
    cost: np.ndarray  # [B, K], the cost term of the score (future weight included)
    expected: np.ndarray  # [B, K] int64: each coupon's expected cost now, cents, within [0, the coupon's cost]

    @staticmethod
    def split(
        outputs: np.ndarray, campaign: CampaignConfig, cost_ratios: list[float], decision_index: np.ndarray
    ) -> ScoreTerms:
        """`cost_ratios` (the manifest's, by decision index; the last for later decisions) correct the
        expected costs of each row's `decision_index`-th decision."""
        k = outputs.shape[1] // 3
        faces = np.zeros(k, np.float64)
        for action, cents in campaign.coupons.items():
            if 0 < action < k:
                faces[action] = cents
        finite = np.isfinite(outputs).all(axis=1)
        with np.errstate(over="ignore", invalid="ignore"):
            predicted = outputs[:, 2 * k :].astype(np.float64) * 100
            if cost_ratios:
                ratios = np.asarray(cost_ratios, np.float64)
                predicted *= ratios[np.minimum(decision_index, len(ratios) - 1)][:, None]
        # what cannot be priced costs its face value: never a sign or size the ledger cannot settle
        predicted[~finite] = faces
        predicted = np.where(np.isnan(predicted), faces, predicted)
        expected = np.rint(np.clip(predicted, 0, faces)).astype(np.int64)
        revenue = outputs[:, :k].copy()
        revenue[~finite] = np.nan
        return ScoreTerms(revenue, outputs[:, k : 2 * k], expected)

    @property
    def finite(self) -> np.ndarray:
        """[B] bool: the users whose terms are all finite (the others get no coupon)."""
        return np.asarray(np.isfinite(self.revenue).all(axis=1) & np.isfinite(self.cost).all(axis=1))

    def scores(self, lam: float) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # a row that overflows is not finite: no coupon
            return self.revenue - np.float32(lam) * self.cost

    def floored(self, campaign: CampaignConfig, min_redemption: float) -> ScoreTerms:
        """Costs no lower than each coupon's floor: `min_redemption` of its cost, at least a cent, both the
        expected cost now (what is reserved and planned) and the score's cost term (so that lambda prices
        what is reserved). A model that prices a coupon near zero can be wrong by any factor; from a floor,
        the realised / predicted ratio that corrects reservations and pacing (reserve.lua, pace.lua) can
        grow; from zero it cannot."""
        floors = np.zeros(self.expected.shape[1], np.int64)
        for action, cents in campaign.coupons.items():
            if 0 < action < len(floors):
                floors[action] = min(cents, max(1, math.ceil(cents * min_redemption)))
        cost = np.where(floors > 0, np.maximum(self.cost, floors.astype(np.float32) / 100), self.cost)
        return ScoreTerms(self.revenue, cost.astype(self.cost.dtype), np.maximum(self.expected, floors))


def render(order: list[int], result: ReserveResult) -> bytes:
    """The response body: one decision per request, in the order of the requests (`result` is in `order`);
    a catalog request's decisions list their coupons."""
    decisions: list[dict[str, Any]] = [{}] * len(order)
    costs = [from_cents(cost) for cost in result.costs]
    for row, user_id, decision_id, action, cost, version, lam in zip(
        order, result.user_ids, result.decision_ids, result.actions, costs, result.versions, result.lams, strict=True
    ):
        decisions[row] = {
            "user_id": user_id,
            "decision_id": decision_id,
            "action": action,
            "cost": cost,
            "model_version": version,
            "lambda": lam,
        }
    if result.components is not None:
        for row, coupons in zip(order, result.components, strict=True):
            decisions[row]["coupons"] = [{"action": a, "cost": from_cents(c)} for a, c in coupons]
    return orjson.dumps({"decisions": decisions})


def build_inputs(
    manifest: Manifest, features: np.ndarray, contexts: list[UserContext | None], lam: float
) -> ModelInputs:
    """Each user's last context_length-1 steps, then the current decision (right-aligned, the longest
    context setting the length), through the history rule."""
    rows, dim = features.shape
    past = gather(contexts, dim, manifest.context_length - 1)
    kept = int(past.counts.max(initial=0))
    window = past.steps[:, past.steps.shape[1] - kept :]  # [B, kept], zero records where padded
    unknown = np.zeros((rows, 1), np.int64)  # the decision's action and outcome are not known yet

    def then(steps: np.ndarray, now: np.ndarray) -> np.ndarray:
        return np.concatenate([steps, now], axis=1)

    history = History(
        states=then(window["features"], features[:, None]),
        actions=then(window["action"], unknown),
        reward=then(window["reward"], unknown),
        cost=then(window["cost"], unknown),
        timesteps=then(window["t"], past.t[:, None]),
        mask=np.arange(kept + 1) >= (kept - past.counts)[:, None],
        reward_before_last=past.reward,
        cost_before_last=past.cost,
    )
    lams = np.full(rows, lam, np.float32)
    return history_inputs(history, lams, manifest.initial_rtg, manifest.initial_ctg, manifest.max_timestep)


def min_redemption(default: float, settings: CampaignSettings) -> float:
    """The campaign's expected-cost floor as a share of each coupon's cost (SACO_MIN_REDEMPTION unless set)."""
    return default if settings.min_redemption is None else settings.min_redemption
