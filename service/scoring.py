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

from contract.catalog import BUNDLE_ACTIONS, ActionRows, Catalog
from contract.inputs import History, ModelInputs, history_inputs
from contract.money import from_cents
from contract.ranking import bundle_ranking, finite_rows, ranking
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
    several: np.ndarray | None = None,
) -> tuple[list[int], ReserveBatch]:
    """The order in which users reserve (largest gain of their best coupon over none first) and the batch
    to reserve, its users in that order: the campaign's coupons by descending score down to "no coupon",
    the users' features (float32 rows), who is held out, who explores (with probability the exploration
    rate: a uniform draw with which the reservation picks among the coupons that fit instead), and the
    model's expected cost of each coupon for each user (cents) when it has one. A user whose scores are not
    all finite gets no coupon (not explored either): counted in `metrics` and logged. A catalog campaign
    ranks its bundles (contract/ranking.py `bundle_ranking`): the lists name them by position; `several`, a
    model's own scores of the catalog's bundles of several coupons (None: the additive rule)."""
    catalog = campaign.settings.catalog
    if catalog is None:
        lists, index, priority = ranking(scores, list(campaign.coupons))
        several = None
    else:
        lists, index, priority = bundle_ranking(scores, [b.coupons for b in catalog.bundles], several)
    order: list[int] = priority.tolist()
    requests = body.requests
    user_ids = [requests[i].user_id for i in order]
    rate, holdout_rate = campaign.settings.exploration_rate, campaign.settings.holdout_rate
    finite = finite_rows(scores, several)
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
    coupon at its face cost. A model scoring by features also scores the catalog's bundles of several
    coupons itself (`bundles`: their coupons, in the catalog's order; their terms `bundle_revenue` and
    `bundle_cost`); a bundle's expected cost stays the sum of its coupons'."""

    revenue: np.ndarray  # [B, K], currency units
    cost: np.ndarray  # [B, K], the cost term of the score (future weight included)
    expected: np.ndarray  # [B, K] int64: each coupon's expected cost now, cents, within [0, the coupon's cost]
    bundle_revenue: np.ndarray | None = None  # [B, m]: the bundles of several coupons, as `revenue`
    bundle_cost: np.ndarray | None = None  # [B, m]: as `cost`
    bundles: tuple[tuple[int, ...], ...] = ()  # the m bundles' coupons

    @staticmethod
    def split(
        outputs: np.ndarray,
        campaign: CampaignConfig,
        cost_ratios: list[float],
        decision_index: np.ndarray,
        bundles: tuple[tuple[int, ...], ...] | None = None,
    ) -> ScoreTerms:
        """`cost_ratios` (the manifest's, by decision index; the last for later decisions) correct the
        expected costs of each row's `decision_index`-th decision. `bundles` (a model scoring by features):
        the coupons of the bundles of several coupons whose terms are the last len(bundles) columns of each
        third of `outputs` ([B, 3 (K + m)]); None: `outputs` is [B, 3K]."""
        m = 0 if bundles is None else len(bundles)
        t = outputs.shape[1] // 3
        k = t - m
        finite = np.isfinite(outputs).all(axis=1)
        if m:
            per_coupon = np.concatenate([outputs[:, :k], outputs[:, t : t + k], outputs[:, 2 * t : 2 * t + k]], axis=1)
        else:
            per_coupon = outputs
        faces = np.zeros(k, np.float64)
        for action, cents in campaign.coupons.items():
            if 0 < action < k:
                faces[action] = cents
        with np.errstate(over="ignore", invalid="ignore"):
            predicted = per_coupon[:, 2 * k :].astype(np.float64) * 100
            if cost_ratios:
                ratios = np.asarray(cost_ratios, np.float64)
                predicted *= ratios[np.minimum(decision_index, len(ratios) - 1)][:, None]
        # what cannot be priced costs its face value: never a sign or size the ledger cannot settle
        predicted[~finite] = faces
        predicted = np.where(np.isnan(predicted), faces, predicted)
        expected = np.rint(np.clip(predicted, 0, faces)).astype(np.int64)
        revenue = per_coupon[:, :k].copy()
        revenue[~finite] = np.nan
        if not m:
            return ScoreTerms(revenue, per_coupon[:, k : 2 * k], expected)
        assert bundles is not None
        bundle_revenue = outputs[:, k:t].copy()
        bundle_revenue[~finite] = np.nan
        cost = per_coupon[:, k : 2 * k]
        return ScoreTerms(revenue, cost, expected, bundle_revenue, outputs[:, t + k : 2 * t], tuple(bundles))

    @property
    def finite(self) -> np.ndarray:
        """[B] bool: the users whose terms are all finite (the others get no coupon)."""
        finite = np.isfinite(self.revenue).all(axis=1) & np.isfinite(self.cost).all(axis=1)
        if self.bundle_revenue is not None and self.bundle_cost is not None:
            finite &= np.isfinite(self.bundle_revenue).all(axis=1) & np.isfinite(self.bundle_cost).all(axis=1)
        return np.asarray(finite)

    def scores(self, lam: float) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # a row that overflows is not finite: no coupon
            return self.revenue - np.float32(lam) * self.cost

    def bundle_scores(self, lam: float) -> np.ndarray | None:
        """[B, m]: the model's scores of the bundles of several coupons (None: a model that scores coupons
        alone; their bundles score by the additive rule, contract/ranking.py)."""
        if self.bundle_revenue is None or self.bundle_cost is None:
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            return self.bundle_revenue - np.float32(lam) * self.bundle_cost

    def take(self, rows: np.ndarray) -> ScoreTerms:
        """These users' terms (`rows`: a boolean mask or indices)."""
        return ScoreTerms(
            self.revenue[rows],
            self.cost[rows],
            self.expected[rows],
            None if self.bundle_revenue is None else self.bundle_revenue[rows],
            None if self.bundle_cost is None else self.bundle_cost[rows],
            self.bundles,
        )

    def floored(self, campaign: CampaignConfig, min_redemption: float) -> ScoreTerms:
        """Costs no lower than each coupon's floor: `min_redemption` of its cost, at least a cent, both the
        expected cost now (what is reserved and planned) and the score's cost term (so that lambda prices
        what is reserved); a bundle's cost term no lower than the sum of its coupons' floors. A model that
        prices a coupon near zero can be wrong by any factor; from a floor, the realised / predicted ratio
        that corrects reservations and pacing (reserve.lua, pace.lua) can grow; from zero it cannot."""
        floors = np.zeros(self.expected.shape[1], np.int64)
        for action, cents in campaign.coupons.items():
            if 0 < action < len(floors):
                floors[action] = min(cents, max(1, math.ceil(cents * min_redemption)))
        cost = np.where(floors > 0, np.maximum(self.cost, floors.astype(np.float32) / 100), self.cost)
        bundle_cost = self.bundle_cost
        if bundle_cost is not None and self.bundles:
            sums = np.array([sum(int(floors[a]) for a in b if 0 < a < len(floors)) for b in self.bundles], np.int64)
            bundle_cost = np.maximum(bundle_cost, sums.astype(np.float32) / 100).astype(bundle_cost.dtype)
        return ScoreTerms(
            self.revenue,
            cost.astype(self.cost.dtype),
            np.maximum(self.expected, floors),
            self.bundle_revenue,
            bundle_cost,
            self.bundles,
        )


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


def model_actions(actions: np.ndarray, catalog: Catalog | None, rows: ActionRows | None) -> np.ndarray:
    """The model's action of each action a user's context holds (a decision's action as answered: no coupon 0,
    a coupon its action, a bundle of several coupons BUNDLE_ACTIONS + its position in the campaign's catalog).
    A model scoring by features (`rows`, the campaign's ActionRows): its row of the action table. A model by
    index: the action itself, a bundle of several coupons its dominant coupon (contract/catalog.py
    `dominant`, by the campaign's catalog `catalog`), a bundle no longer in the catalog 0 (no coupon)."""
    if rows is not None:
        return rows.rows(actions)
    bundled = actions > BUNDLE_ACTIONS
    if not bundled.any():
        return actions
    out = actions.copy()
    for action in np.unique(actions[bundled]).tolist():
        out[actions == action] = _dominant_of(catalog, action)
    return out


def _dominant_of(catalog: Catalog | None, action: int) -> int:
    """The dominant coupon of the catalog's bundle answered as `action` (0: no such bundle)."""
    position = action - BUNDLE_ACTIONS
    if catalog is None or not 1 <= position <= len(catalog.bundles):
        return 0
    bundle = catalog.bundles[position - 1]
    return catalog.dominant(bundle) if bundle.action == action else 0


class ActionRowsCache:
    """Each campaign's ActionRows for a model scoring by features, kept per catalog (a campaign's catalog is
    the same object while its stored text is unchanged, service/state/store.py) and per coupon costs for a
    campaign without one: computed again only when the catalog or the model's number of actions changes."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._by_catalog: dict[int, tuple[Catalog, int, ActionRows]] = {}  # id(catalog): kept alive by the entry
        self._by_costs: dict[tuple[int, tuple[tuple[int, int], ...]], ActionRows] = {}

    def of(self, campaign: CampaignConfig, num_actions: int) -> ActionRows:
        catalog = campaign.settings.catalog
        if catalog is not None:
            entry = self._by_catalog.get(id(catalog))
            if entry is not None and entry[0] is catalog and entry[1] == num_actions:
                return entry[2]
            rows = catalog.action_rows(num_actions)
            _bounded(self._by_catalog, self.size)
            self._by_catalog[id(catalog)] = (catalog, num_actions, rows)
            return rows
        key = (num_actions, tuple(sorted(campaign.coupons.items())))
        found = self._by_costs.get(key)
        if found is None:
            found = Catalog.of_costs(campaign.coupons).action_rows(num_actions)
            _bounded(self._by_costs, self.size)
            self._by_costs[key] = found
        return found


def _bounded(cache: dict[Any, Any], size: int) -> None:
    """Room for one more entry: the oldest goes first."""
    while len(cache) >= size:
        del cache[next(iter(cache))]


def build_inputs(
    manifest: Manifest,
    features: np.ndarray,
    contexts: list[UserContext | None],
    lam: float,
    catalog: Catalog | None = None,
    action_rows: ActionRows | None = None,
) -> ModelInputs:
    """Each user's last context_length-1 steps, then the current decision (right-aligned, the longest
    context setting the length), through the history rule. The steps' actions are the model's
    (`model_actions`: `catalog` the campaign's, `action_rows` its ActionRows for a model scoring by
    features)."""
    rows, dim = features.shape
    past = gather(contexts, dim, manifest.context_length - 1)
    kept = int(past.counts.max(initial=0))
    window = past.steps[:, past.steps.shape[1] - kept :]  # [B, kept], zero records where padded
    unknown = np.zeros((rows, 1), np.int64)  # the decision's action and outcome are not known yet

    def then(steps: np.ndarray, now: np.ndarray) -> np.ndarray:
        return np.concatenate([steps, now], axis=1)

    history = History(
        states=then(window["features"], features[:, None]),
        actions=then(model_actions(window["action"].astype(np.int64), catalog, action_rows), unknown),
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
