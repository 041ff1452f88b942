"""The decision and settlement logic behind the routes (the routes only translate HTTP)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from model_store import Manifest
from service.batcher import MicroBatcher
from service.metrics import ServiceMetrics
from service.money import from_cents, to_cents
from service.policy import PolicyHolder, PolicyInputs
from service.schemas import CampaignPatch, CampaignPut, DecisionsRequest, OutcomesRequest, OutcomesResponse
from service.settings import Settings
from service.state import (
    CampaignConfig,
    CampaignNotFound,
    CampaignSettings,
    CampaignState,
    CampaignUpdate,
    Groups,
    NewStep,
    Outcome,
    RequestIdConflict,
    ReservedDecision,
    ReserveItem,
    ReserveResult,
    StateStoreError,
    UserContext,
)
from service.state.context import gather
from service.state.store import StateStore

log = logging.getLogger("saco.service.engine")
PLAN_LAMBDA_STEPS = 24  # bisection steps: lambda to within lam_max / 2^24


class InvalidInput(ValueError):
    """Input that pydantic could not check alone (it depends on the model or the campaign): a 422."""

    def __init__(self, loc: tuple[str | int, ...], msg: str, value: Any = None) -> None:
        super().__init__(msg)
        self.errors = [{"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": value}]


def now_ms() -> int:
    return int(time.time() * 1000)


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
) -> tuple[list[int], list[ReserveItem]]:
    """The order in which users reserve (largest gain of their best coupon over none first) and, per user
    in that order, the campaign's coupons by descending score down to "no coupon", the user's features
    (float32 rows), whether the user is held out, with probability the exploration rate a uniform draw with
    which the reservation picks among the coupons that fit instead, and the model's expected cost of each
    coupon for that user (cents) when it has one. A user whose scores are not all finite gets no coupon
    (not explored either): counted in `metrics` and logged."""
    prefs, priority = preferences(scores, list(campaign.coupons))
    order: list[int] = priority.tolist()
    requests = body.requests
    rate, holdout_rate = campaign.settings.exploration_rate, campaign.settings.holdout_rate
    costs: list[list[int]] | list[None] = [None] * len(requests) if expected is None else expected.tolist()
    finite = np.isfinite(scores).all(axis=1)
    items = []
    for i in order:
        user_id = requests[i].user_id
        draw = rng.random() if rate > 0 and rng.random() < rate else None
        held_out = in_holdout(campaign.campaign_id, user_id, holdout_rate)
        if not finite[i]:
            draw = None
        item = ReserveItem(user_id, requests[i].request_id, prefs[i], rows[i].tobytes(), held_out, draw, costs[i])
        items.append(item)
    if not finite.all():
        unscored = [requests[i].user_id for i in np.flatnonzero(~finite)]
        if metrics is not None:
            metrics.nonfinite_scores.labels(campaign=campaign.campaign_id).inc(len(unscored))
        log.warning(
            "the model's output is not finite for some users: they get no coupon",
            extra={"campaign": campaign.campaign_id, "users": len(unscored), "user_ids": unscored[:10]},
        )
    return order, items


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


def plan_lambda(terms: ScoreTerms, campaign: CampaignConfig, target: float, lam_max: float) -> float:
    """The smallest lambda in [0, lam_max] at which the request's expected spend fits `target` cents: each
    user takes their best offered action (or none) at that lambda, and spends its expected cost corrected by
    the campaign's realised / predicted ratio of that action. Bisection: spend falls as lambda rises. Users
    whose terms are not finite are left out (they get no coupon), as is a user whose scores at a lambda are
    not."""
    usable = terms.finite
    terms = ScoreTerms(terms.revenue[usable], terms.cost[usable], terms.expected[usable])
    k = terms.revenue.shape[1]
    offered = np.zeros(k, np.bool_)
    offered[0] = True
    offered[[a for a in campaign.coupons if 0 < a < k]] = True
    ratios = np.ones(k)
    if campaign.paced is not None:
        for action, ratio in campaign.paced.ratios.items():
            if 0 < action < k:
                ratios[action] = ratio
    spend = terms.expected * ratios
    rows = np.arange(len(spend))

    def spent(lam: float) -> float:
        scores = terms.scores(lam)
        chosen = np.where(offered, scores, -np.inf).argmax(axis=1)
        chosen[~np.isfinite(scores).all(axis=1)] = 0
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


def render(order: list[int], decided: list[ReservedDecision]) -> bytes:
    """The response body: one decision per request, in the order of the requests."""
    decisions: list[dict[str, Any]] = [{}] * len(order)
    for row, decision in zip(order, decided, strict=True):
        decisions[row] = {
            "user_id": decision.user_id,
            "decision_id": decision.decision_id,
            "action": decision.action,
            "cost": from_cents(decision.cost),
            "model_version": decision.model_version,
            "lambda": decision.lam,
        }
    return orjson.dumps({"decisions": decisions})


def campaign_lambda(campaign: CampaignConfig, manifest: Manifest) -> tuple[float, str]:
    """The campaign's lambda and where it came from: pacing (while it runs), else the lambda it starts
    from: admin-set, calibration table, model default, none."""
    if campaign.paced is not None and campaign.settings.pacing_on:
        return campaign.paced.lam, "pacing"
    return base_lambda(campaign.settings, manifest)


def base_lambda(settings: CampaignSettings, manifest: Manifest) -> tuple[float, str]:
    """The lambda a campaign has without pacing: admin-set, calibration table, model default, none."""
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


def group_view(group: Groups) -> dict[str, Any]:
    per_outcome = group.reward_per_outcome
    return {
        "decisions": group.decisions,
        "settled": group.settled,
        "reward": from_cents(group.reward),
        "cost": from_cents(group.cost),
        "reward_per_decision": None if per_outcome is None else per_outcome / 100,
    }


def incremental_revenue(campaign: CampaignState) -> float | None:
    """Mean reward of a treated user's settled decision minus a holdout user's (currency units)."""
    treated, holdout = campaign.treated.reward_per_outcome, campaign.holdout.reward_per_outcome
    return None if treated is None or holdout is None else (treated - holdout) / 100


def epoch_ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def build_inputs(
    manifest: Manifest, features: np.ndarray, contexts: list[UserContext | None], lam: float
) -> PolicyInputs:
    """Right-aligned model inputs: each user's last context_length-1 steps, then the current decision."""
    rows, dim = features.shape
    past = gather(contexts, dim, manifest.context_length - 1, manifest.initial_rtg, manifest.initial_ctg)
    kept = int(past.counts.max(initial=0))  # the longest context sets the length; shorter ones are padded
    length = kept + 1
    window = past.steps[:, past.steps.shape[1] - kept :]  # [B, kept], zero records where padded
    states = np.empty((rows, length, dim), np.float32)
    actions = np.empty((rows, length), np.int64)
    rtg = np.empty((rows, length), np.float32)
    ctg = np.empty((rows, length), np.float32)
    timesteps = np.empty((rows, length), np.int64)
    mask = np.empty((rows, length), np.bool_)
    states[:, :kept], states[:, kept] = window["features"], features
    actions[:, :kept], actions[:, kept] = window["action"], 0
    rtg[:, :kept], rtg[:, kept] = window["rtg"], past.rtg
    ctg[:, :kept], ctg[:, kept] = window["ctg"], past.ctg
    timesteps[:, :kept], timesteps[:, kept] = window["t"], past.t
    mask[:, :kept], mask[:, kept] = np.arange(kept) >= (kept - past.counts)[:, None], True
    np.minimum(timesteps, manifest.max_timestep - 1, out=timesteps)  # never negative: only the top is bounded
    return PolicyInputs(states, actions, rtg, ctg, timesteps, np.full(rows, lam, np.float32), mask)


def preferences(scores: np.ndarray, offered: list[int]) -> tuple[list[list[int]], np.ndarray]:
    """Per row: offered actions by descending score, cut after action 0 (nothing below "no coupon" is
    preferable to it); and the priority order of rows (largest gain of the best coupon over none first).
    A row with any non-finite score prefers action 0 alone and comes last."""
    allowed = np.zeros(scores.shape[1], np.bool_)
    allowed[0] = True
    allowed[[a for a in offered if 0 < a < scores.shape[1]]] = True
    masked = np.where(allowed, scores, -np.inf)
    unscored = ~np.isfinite(scores).all(axis=1)
    masked[unscored] = -np.inf
    masked[unscored, 0] = 0.0
    ranked = np.argsort(-masked, axis=1, kind="stable").tolist()
    prefs = []
    for row in ranked:
        cut = row.index(0) + 1
        prefs.append(row[:cut])
    gain = masked.max(axis=1) - masked[:, 0]
    gain[unscored] = -np.inf
    return prefs, np.argsort(-gain, kind="stable")


class DecisionEngine:
    def __init__(
        self,
        settings: Settings,
        policies: PolicyHolder,
        store: StateStore,
        batcher: MicroBatcher,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.policies = policies
        self.store = store
        self.batcher = batcher
        self.metrics = metrics
        self.rng = random.Random(settings.exploration_seed)  # the exploration draws
        # context writes still in flight, each with its campaign and users: the next read of one of those
        # users waits for it
        self._writes: dict[asyncio.Task[None], tuple[str, frozenset[str]]] = {}

    # ---- decisions -------------------------------------------------------------------------------
    async def decide(self, campaign_id: str, body: DecisionsRequest) -> bytes:
        """The hot path: validate, read, score, choose, reserve, record, render (JSON bytes)."""
        policy = self.policies.current
        features = self._validate(body, policy.manifest)
        user_ids = [r.user_id for r in body.requests]
        with self.batcher.expect() as ticket:
            campaign, contexts = await self._read(campaign_id, user_ids)
            lam, _ = campaign_lambda(campaign, policy.manifest)
            inputs = build_inputs(policy.manifest, features, contexts, lam)
            outputs = await self.batcher.scores(policy, inputs, ticket)
        scores, expected = outputs, None
        if policy.manifest.score_terms:
            terms = ScoreTerms.split(outputs, campaign, policy.manifest.cost_ratios, inputs.timesteps[:, -1])
            terms = terms.floored(campaign, self._min_redemption(campaign.settings))
            lam = self._request_lambda(campaign, terms, lam, policy.manifest)
            scores, expected = terms.scores(lam), terms.expected
        rows = features.astype("<f4", copy=False)
        order, items = choose(scores, expected, campaign, body, rows, self.rng, self.metrics)
        try:
            reserved = await self.store.reserve(
                campaign_id,
                items,
                model_version=policy.version,
                lam=lam,
                reservation_expiry_ms=self.settings.reservation_expiry_s * 1000,
                decision_ttl_ms=self.settings.decision_ttl_s * 1000,
                prior_coupons=self.settings.prior_coupons,
                exploration_rate=campaign.settings.exploration_rate,
                plan_lead=self.settings.plan_lead,
            )
        except RequestIdConflict as exc:  # the store counts items in priority order; the caller, in its own
            raise RequestIdConflict(exc.request_id, order[exc.item]) from None
        self._record(campaign_id, order, items, reserved, contexts, policy.manifest)
        return render(order, reserved.decisions)

    def _min_redemption(self, settings: CampaignSettings) -> float:
        return self.settings.min_redemption if settings.min_redemption is None else settings.min_redemption

    def _request_lambda(self, campaign: CampaignConfig, terms: ScoreTerms, lam: float, manifest: Manifest) -> float:
        """With `resolve` pacing, the lambda at which this request's expected spend is its share of the
        budget left (what each decision may spend, times the request's users); else the campaign's lambda."""
        settings = campaign.settings
        if not settings.pacing_on or settings.pacing_method != "resolve":
            return lam
        allowance = None if campaign.paced is None else campaign.paced.allowance
        if allowance is None and campaign.paced is None and settings.expected_decisions:
            allowance = settings.budget / settings.expected_decisions  # before the first pacing step
        if allowance is None:
            return lam
        planned = int(terms.finite.sum())  # users the model could not score get no coupon: not planned for
        if not planned:
            return lam
        lam_max = self.settings.pacing_lambda_max * lambda_scale(manifest)
        return plan_lambda(terms, campaign, allowance * planned, lam_max)

    def _validate(self, body: DecisionsRequest, manifest: Manifest) -> np.ndarray:
        """The batch size and every feature row against the model: the [users, feature_dim] float32 array."""
        requests = body.requests
        if len(requests) > self.settings.max_batch:
            raise InvalidInput(
                ("requests",), f"at most {self.settings.max_batch} requests per call, got {len(requests)}"
            )
        dim = manifest.feature_dim
        for i, item in enumerate(requests):
            if len(item.features) != dim:
                raise InvalidInput(
                    ("requests", i, "features"),
                    f"must have {dim} values (the model's feature_dim), got {len(item.features)}",
                )
        values = np.array([item.features for item in requests], np.float64)
        bound = self.settings.max_abs_feature
        outside = np.abs(values) > bound
        if outside.any():
            row, column = (int(i) for i in np.argwhere(outside)[0])
            raise InvalidInput(
                ("requests", row, "features"),
                f"user {requests[row].user_id!r}: features[{column}] = {values[row, column]:g} is outside "
                f"-{bound:g}..{bound:g} (SACO_MAX_ABS_FEATURE)",
                float(values[row, column]),
            )
        self.metrics.decision_batch_users.observe(len(requests))
        return values.astype(np.float32)

    async def _read(self, campaign_id: str, user_ids: list[str]) -> tuple[CampaignConfig, list[UserContext | None]]:
        """The campaign and each user's context, once this process's own writes to them have landed."""
        await self.contexts_written(campaign_id, user_ids)
        campaign, contexts = await self.store.load_for_decision(campaign_id, user_ids)
        if campaign is None:
            raise CampaignNotFound(campaign_id)
        return campaign, contexts

    def _record(
        self,
        campaign_id: str,
        order: list[int],
        items: list[ReserveItem],
        reserved: ReserveResult,
        contexts: list[UserContext | None],
        manifest: Manifest,
    ) -> None:
        """Each new decision becomes a step of its user's context (written behind the answer: the
        reservations are what must be durable before it), and the metrics."""
        new_steps = [
            NewStep(decided.user_id, decided.decision_id, decided.action, item.features, contexts[row])
            for row, item, decided in zip(order, items, reserved.decisions, strict=True)
            if decided.new
        ]
        held_out = explored = 0
        for item, decided in zip(items, reserved.decisions, strict=True):
            if decided.new:
                held_out += item.holdout
                explored += item.explore_draw is not None and not item.holdout
        if held_out:
            self.metrics.holdout_decisions.labels(campaign=campaign_id).inc(held_out)
        if explored:
            self.metrics.explored_decisions.labels(campaign=campaign_id).inc(explored)
        if new_steps:
            self._write_behind(campaign_id, new_steps, manifest)
        for action, count in Counter(step.action for step in new_steps).items():
            self.metrics.decisions.labels(action=str(action)).inc(count)
        downgraded = sum(decided.downgraded for decided in reserved.decisions)
        if downgraded:
            self.metrics.reservations_refused.labels(campaign=campaign_id).inc(downgraded)
        if len(new_steps) < len(order):
            self.metrics.idempotent_replays.inc(len(order) - len(new_steps))
        self.metrics.budget_remaining.labels(campaign=campaign_id).set(from_cents(max(0, reserved.remaining)))

    def _write_behind(self, campaign_id: str, steps: list[NewStep], manifest: Manifest) -> None:
        async def write() -> None:
            try:
                await self.store.append_steps(
                    campaign_id,
                    steps,
                    capacity=manifest.context_length - 1,
                    ttl_ms=self.settings.context_ttl_s * 1000,
                    initial_rtg=manifest.initial_rtg,
                    initial_ctg=manifest.initial_ctg,
                )
            except Exception:  # nobody awaits this task: every failure is logged and counted here
                # the reservations are made and answered: the users' next steps lack this one
                self.metrics.context_write_failures.inc()
                log.warning("context write failed after a successful reservation", exc_info=True)

        task = asyncio.get_running_loop().create_task(write())
        self._writes[task] = campaign_id, frozenset([step.user_id for step in steps])
        task.add_done_callback(self._writes.pop)

    async def contexts_written(self, campaign_id: str, user_ids: list[str]) -> None:
        """Wait for the context writes in flight for these users."""
        if self._writes:
            pending = [
                task
                for task, (campaign, users) in self._writes.items()
                if campaign == campaign_id and not users.isdisjoint(user_ids)
            ]
            if pending:
                await asyncio.wait(pending)

    async def drain(self) -> None:
        """Wait for every context write in flight (shutdown; tests that read the store directly)."""
        while self._writes:
            await asyncio.wait(list(self._writes))

    # ---- outcomes --------------------------------------------------------------------------------
    async def record_outcomes(self, campaign_id: str, body: OutcomesRequest) -> OutcomesResponse:
        outcomes = [Outcome(o.decision_id, o.reward, to_cents(o.cost)) for o in body.outcomes]
        result = await self.store.settle(campaign_id, outcomes)
        if result.context_updates:
            await self.contexts_written(campaign_id, [user_id for user_id, *_ in result.context_updates])
        try:
            await self.store.apply_outcomes_to_contexts(
                campaign_id, result.context_updates, ttl_ms=self.settings.context_ttl_s * 1000
            )
        except StateStoreError:
            log.warning("context update failed after settling outcomes", exc_info=True)
        for name, count in (
            ("accepted", result.accepted),
            ("duplicate", result.duplicates),
            ("unknown", result.unknown),
        ):
            if count:
                self.metrics.outcomes.labels(result=name).inc(count)
        self.metrics.budget_remaining.labels(campaign=campaign_id).set(from_cents(max(0, result.remaining)))
        return OutcomesResponse(accepted=result.accepted, duplicates=result.duplicates, unknown=result.unknown)

    # ---- campaigns -------------------------------------------------------------------------------
    def _coupons(self, coupons: list[Any]) -> dict[int, int]:
        num_actions = self.policies.current.manifest.num_actions
        table: dict[int, int] = {}
        for i, coupon in enumerate(coupons):
            if coupon.action >= num_actions:
                raise InvalidInput(
                    ("coupons", i, "action"),
                    f"must be within 1..{num_actions - 1} (the model's actions)",
                    coupon.action,
                )
            if coupon.action in table:
                raise InvalidInput(("coupons", i, "action"), f"action {coupon.action} is listed twice", coupon.action)
            table[coupon.action] = to_cents(coupon.cost)
        return table

    def _update(self, body: CampaignPut | CampaignPatch, replace: bool, stored: CampaignState | None) -> CampaignUpdate:
        given = body.model_fields_set
        for name in ("budget", "coupons"):
            if name in given and getattr(body, name) is None:
                raise InvalidInput((name,), "must be given (it has no default)", None)
        starts_ms, ends_ms = epoch_ms(body.starts_at), epoch_ms(body.ends_at)
        kept = None if replace or stored is None else stored.settings  # what a PATCH leaves as it is
        starts = starts_ms if starts_ms is not None or kept is None or "starts_at" in given else kept.starts_ms
        ends = ends_ms if ends_ms is not None or kept is None or "ends_at" in given else kept.ends_ms
        if ends is not None and starts is None:
            starts = starts_ms = now_ms()  # a horizon without a start begins now
        if starts is not None and ends is not None and ends <= starts:
            raise InvalidInput(
                ("ends_at",),
                "must be after starts_at (which is now when the campaign gives none)",
                iso(ends),
            )
        aliases = {"lambda_": "admin_lambda", "starts_at": "starts_ms", "ends_at": "ends_ms"}
        cleared = frozenset(aliases.get(name, name) for name in given if getattr(body, name) is None)
        if starts_ms is not None:
            cleared -= {"starts_ms"}
        return CampaignUpdate(
            replace=replace,
            budget=None if body.budget is None else to_cents(body.budget),
            coupons=None if body.coupons is None else self._coupons(body.coupons),
            admin_lambda=body.lambda_,
            expected_users=body.expected_users,
            reservation_mode=body.reservation_mode,
            overspend_risk=body.overspend_risk,
            starts_ms=starts_ms,
            ends_ms=ends_ms,
            expected_decisions=body.expected_decisions,
            pacing=body.pacing,
            pacing_method=body.pacing_method,
            exploration_rate=body.exploration_rate,
            holdout_rate=body.holdout_rate,
            min_redemption=body.min_redemption,
            cleared=cleared - {"budget", "coupons"},
        )

    async def put_campaign(self, campaign_id: str, body: CampaignPut) -> dict[str, Any]:
        update = self._update(body, replace=True, stored=None)
        return self.view(await self.store.upsert_campaign(campaign_id, update))

    async def patch_campaign(self, campaign_id: str, body: CampaignPatch) -> dict[str, Any]:
        stored = await self.store.get_campaign(campaign_id)
        if stored is None:
            raise CampaignNotFound(campaign_id)
        update = self._update(body, replace=False, stored=stored)
        return self.view(await self.store.upsert_campaign(campaign_id, update))

    async def get_campaign(self, campaign_id: str) -> dict[str, Any]:
        released = await self.store.sweep_expired(campaign_id)
        if released:
            self.metrics.reservations_expired.labels(campaign=campaign_id).inc(released)
        campaign = await self.store.get_campaign(campaign_id)
        if campaign is None:
            raise CampaignNotFound(campaign_id)
        return self.view(campaign)

    def view(self, campaign: CampaignState) -> dict[str, Any]:
        lam, source = campaign_lambda(campaign.config, self.policies.current.manifest)
        settings, pacing = campaign.settings, campaign.pacing
        self.metrics.budget_remaining.labels(campaign=campaign.campaign_id).set(from_cents(campaign.remaining))
        paced = settings.pacing_on and pacing.at_ms is not None
        incremental = incremental_revenue(campaign)
        self.metrics.log_entries.labels(campaign=campaign.campaign_id).set(campaign.log_entries)
        if incremental is not None:
            self.metrics.incremental_revenue.labels(campaign=campaign.campaign_id).set(incremental)
        return {
            "campaign_id": campaign.campaign_id,
            "budget": from_cents(campaign.budget),
            "spent": from_cents(campaign.spent),
            "reserved": from_cents(campaign.reserved),
            "remaining": from_cents(campaign.remaining),
            "lambda": lam,
            "model_version": campaign.model_version,
            "decisions": campaign.decisions,
            "coupons": [{"action": a, "cost": from_cents(c)} for a, c in sorted(campaign.coupons.items())],
            "lambda_source": source,
            "expected_users": settings.expected_users,
            "overrun": from_cents(campaign.overrun),
            "excess": from_cents(campaign.excess),
            "reservation_mode": settings.reservation_mode,
            "overspend_risk": settings.overspend_risk,
            "starts_at": iso(settings.starts_ms),
            "ends_at": iso(settings.ends_ms),
            "expected_decisions": settings.expected_decisions,
            "pacing": settings.pacing_on,
            "pacing_method": settings.pacing_method,
            "allowance": None
            if not paced or pacing.state is None or pacing.state.allowance is None
            else from_cents(round(pacing.state.allowance)),
            "plan": from_cents(pacing.plan) if paced else None,
            "pacing_spend": from_cents(pacing.actual) if paced else None,
            "pacing_error": (pacing.actual - pacing.plan) / campaign.budget if paced and campaign.budget else None,
            "exploration_rate": settings.exploration_rate,
            "holdout_rate": settings.holdout_rate,
            "min_redemption": self._min_redemption(settings),
            "outstanding": from_cents(campaign.outstanding),
            "explored": campaign.explored,
            "holdout": group_view(campaign.holdout),
            "treated": group_view(campaign.treated),
            "incremental_revenue_per_decision": incremental,
            "log_entries": campaign.log_entries,
            "log_lost": campaign.log_lost,
        }

    async def pace(self, campaign_id: str) -> None:
        """One pacing step of a campaign whose settings ask for it (the store runs at most one per interval
        across replicas); the campaign's lambda, plan, spend and pacing error go to the metrics."""
        campaign = await self.store.get_campaign(campaign_id)
        if campaign is None or not campaign.settings.pacing_on:
            return
        manifest, settings = self.policies.current.manifest, self.settings
        scale = lambda_scale(manifest)
        stepped = await self.store.pace(
            campaign_id,
            interval_ms=int(settings.pacing_interval_s * 1000),
            start_lambda=base_lambda(campaign.settings, manifest)[0],
            step=settings.pacing_step * scale,
            max_step=settings.pacing_max_step * scale,
            lambda_max=settings.pacing_lambda_max * scale,
            prior=max(campaign.coupons.values(), default=0) * settings.prior_coupons,
            prior_coupons=settings.prior_coupons,
        )
        if stepped is None:
            return
        lam, plan, actual, _ = stepped
        self.metrics.campaign_lambda.labels(campaign=campaign_id).set(lam)
        self.metrics.plan_spend.labels(campaign=campaign_id).set(from_cents(plan))
        self.metrics.pacing_error.labels(campaign=campaign_id).set((actual - plan) / max(1, campaign.budget))

    # ---- background ------------------------------------------------------------------------------
    async def pace_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.pacing_interval_s)
            try:
                for campaign_id in await self.store.campaign_ids():
                    await self.pace(campaign_id)
            except StateStoreError:
                log.warning("pacing failed (state store unavailable)")

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                for campaign_id in await self.store.campaign_ids():
                    log_status = await self.store.log_status(campaign_id)
                    self.metrics.observe_log(campaign_id, log_status, self.store.log_max_entries)
                    released = await self.store.sweep_expired(campaign_id)
                    if released:
                        self.metrics.reservations_expired.labels(campaign=campaign_id).inc(released)
                        log.info(
                            "released expired reservations",
                            extra={"campaign": campaign_id, "released": released},
                        )
            except StateStoreError:
                log.warning("reservation sweep failed (state store unavailable)")
