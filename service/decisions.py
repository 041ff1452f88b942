"""Deciding and settling: the hot path behind POST /decisions and POST /outcomes."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter

import numpy as np

from contract.money import from_cents, to_cents
from model_store import Manifest
from service.background import Background
from service.batcher import MicroBatcher
from service.lambdas import resolve_lambda
from service.metrics import ServiceMetrics
from service.policy import PolicyHolder
from service.schemas import (
    DecisionsRequest,
    InvalidInput,
    OutcomesRequest,
    OutcomesResponse,
)
from service.scoring import ActionRowsCache, ScoreTerms, build_inputs, choose, min_redemption, render
from service.settings import Settings
from service.state import (
    CampaignConfig,
    CampaignNotFound,
    NewSteps,
    Outcome,
    RequestIdConflict,
    ReserveBatch,
    ReserveResult,
    StateStoreError,
    UserContext,
)
from service.state.store import StateStore

log = logging.getLogger("saco.service.decisions")


class Decisions:
    def __init__(
        self,
        settings: Settings,
        policies: PolicyHolder,
        store: StateStore,
        batcher: MicroBatcher,
        metrics: ServiceMetrics,
        background: Background,
    ) -> None:
        self.settings = settings
        self.policies = policies
        self.store = store
        self.batcher = batcher
        self.metrics = metrics
        self.background = background
        self.rng = random.Random(settings.exploration_seed)  # the exploration draws
        self.action_rows = ActionRowsCache()  # each catalog's action table, for a model scoring by features
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
            lam, _ = resolve_lambda(campaign, policy.manifest)  # the model's lambda input
            # a model scoring by features: the campaign's action table (cached per catalog)
            action_rows = self.action_rows.of(campaign, policy.manifest.num_actions) if policy.by_features else None
            table = None if action_rows is None else action_rows.table
            inputs = build_inputs(policy.manifest, features, contexts, lam, campaign.settings.catalog, action_rows)
            outputs = await self.batcher.scores(policy, inputs, ticket, table)
        scores, expected, several = outputs, None, None
        if policy.manifest.score_terms:
            bundles = None if action_rows is None else tuple(b.coupons for b in action_rows.several)
            terms = ScoreTerms.split(outputs, campaign, policy.manifest.cost_ratios, inputs.timesteps[:, -1], bundles)
            terms = terms.floored(campaign, min_redemption(self.settings.min_redemption, campaign.settings))
            lam, _ = resolve_lambda(campaign, policy.manifest, terms, pacing_lambda_max=self.settings.pacing_lambda_max)
            scores, expected, several = terms.scores(lam), terms.expected, terms.bundle_scores(lam)
        rows = features.astype("<f4", copy=False)
        order, batch = choose(scores, expected, campaign, body, rows, self.rng, self.metrics, several)
        try:
            reserved = await self.store.reserve(
                campaign_id,
                batch,
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
        self._record(campaign_id, order, batch, reserved, contexts, policy.manifest)
        self.background.after_decisions(campaign, reserved)
        return render(order, reserved)

    def _validate(self, body: DecisionsRequest, manifest: Manifest) -> np.ndarray:
        """Every feature row against the model: the [users, feature_dim] float32 array. (The batch size is
        checked before the body is validated: `DecisionsRoute`.)"""
        requests = body.requests
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
        batch: ReserveBatch,
        reserved: ReserveResult,
        contexts: list[UserContext | None],
        manifest: Manifest,
    ) -> None:
        """Each new decision becomes a step of its user's context (written behind the answer: the
        reservations are what must be durable before it), and the metrics. A step holds the decision's action
        as answered (a bundle of several coupons: BUNDLE_ACTIONS + its position); the model reads it as its
        own action (service/scoring.py `model_actions`)."""
        new = reserved.new
        fresh = sum(new)
        steps_actions = reserved.actions
        if fresh == len(new):
            steps = NewSteps(
                batch.user_ids, reserved.decision_ids, steps_actions, batch.features, [contexts[i] for i in order]
            )
            held_out, explored = len(batch.holdout), len(batch.explore)
            actions = reserved.actions
        else:  # some repeated request_ids: their earlier decisions are already steps
            row = len(batch.features) // max(1, len(new))
            kept = [p for p, is_new in enumerate(new) if is_new]
            steps = NewSteps(
                [batch.user_ids[p] for p in kept],
                [reserved.decision_ids[p] for p in kept],
                [steps_actions[p] for p in kept],
                b"".join([batch.features[p * row : (p + 1) * row] for p in kept]),
                [contexts[order[p]] for p in kept],
            )
            held_out = sum(new[p] for p in batch.holdout)
            explored = sum(new[p] for p, _ in batch.explore)
            actions = [reserved.actions[p] for p in kept]
        if held_out:
            self.metrics.holdout_decisions.labels(campaign=campaign_id).inc(held_out)
        if explored:
            self.metrics.explored_decisions.labels(campaign=campaign_id).inc(explored)
        if fresh:
            self._write_behind(campaign_id, steps, manifest)
        for action, count in Counter(actions).items():
            self.metrics.decisions.labels(action=str(action)).inc(count)
        downgraded = sum(reserved.downgraded)
        if downgraded:
            self.metrics.reservations_refused.labels(campaign=campaign_id).inc(downgraded)
        if fresh < len(new):
            self.metrics.idempotent_replays.inc(len(new) - fresh)
        self.metrics.budget_remaining.labels(campaign=campaign_id).set(from_cents(max(0, reserved.remaining)))

    def _write_behind(self, campaign_id: str, steps: NewSteps, manifest: Manifest) -> None:
        async def write() -> None:
            try:
                await self.store.append_steps(
                    campaign_id,
                    steps,
                    capacity=manifest.context_length - 1,
                    ttl_ms=self.settings.context_ttl_s * 1000,
                )
            except Exception:  # nobody awaits this task: every failure is logged and counted here
                # the reservations are made and answered: the users' next steps lack this one
                self.metrics.context_write_failures.inc()
                log.warning("context write failed after a successful reservation", exc_info=True)

        task = asyncio.get_running_loop().create_task(write())
        self._writes[task] = campaign_id, frozenset(steps.user_ids)
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
        outcomes = [
            Outcome(
                o.decision_id,
                o.reward,
                to_cents(o.cost),
                None if o.coupons is None else [(c.action, to_cents(c.cost)) for c in o.coupons],
            )
            for o in body.outcomes
        ]
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
