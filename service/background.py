"""The service's background work: pacing steps and the sweep of expired reservations."""

from __future__ import annotations

import asyncio
import logging

from contract.money import from_cents
from service.lambdas import lambda_scale, resolve_lambda
from service.metrics import ServiceMetrics
from service.policy import PolicyHolder
from service.settings import Settings
from service.state import CampaignConfig, CampaignSettings, ReserveResult, StateStoreError
from service.state.store import StateStore

log = logging.getLogger("saco.service.background")


# A replica asks the store for a traffic step this many times per share of traffic it sees itself: the store
# steps once the share has passed since the last step, across every replica
ASKS_PER_SHARE = 4


class Background:
    def __init__(self, settings: Settings, policies: PolicyHolder, store: StateStore, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.policies = policies
        self.store = store
        self.metrics = metrics
        # per campaign, since this process last asked for a traffic step: decisions answered, and the highest
        # budget remaining it has seen (cents)
        self._traffic: dict[str, tuple[int, int]] = {}
        self._traffic_steps: dict[str, asyncio.Task[None]] = {}  # at most one in flight per campaign

    async def pace(self, campaign_id: str) -> None:
        """One pacing step of a campaign whose settings ask for it (the store runs at most one per interval
        across replicas, or sooner after a share of its traffic); the campaign's lambda, plan, spend and
        pacing error go to the metrics."""
        campaign = await self.store.get_campaign(campaign_id)
        if campaign is not None:
            await self._step(campaign_id, campaign.settings)

    async def _step(self, campaign_id: str, campaign: CampaignSettings) -> None:
        if not campaign.pacing_on:
            return
        manifest, settings = self.policies.current.manifest, self.settings
        scale = lambda_scale(manifest)
        stepped = await self.store.pace(
            campaign_id,
            interval_ms=int(settings.pacing_interval_s * 1000),
            start_lambda=resolve_lambda(CampaignConfig(campaign_id, campaign), manifest, paced=False)[0],
            step=settings.pacing_step * scale,
            max_step=settings.pacing_max_step * scale,
            lambda_max=settings.pacing_lambda_max * scale,
            prior=max(campaign.coupons.values(), default=0) * settings.prior_coupons,
            prior_coupons=settings.prior_coupons,
            step_share=settings.pacing_step_share,
        )
        if stepped is None:
            return
        lam, plan, actual, _ = stepped
        self.metrics.campaign_lambda.labels(campaign=campaign_id).set(lam)
        self.metrics.plan_spend.labels(campaign=campaign_id).set(from_cents(plan))
        self.metrics.pacing_error.labels(campaign=campaign_id).set((actual - plan) / max(1, campaign.budget))

    def after_decisions(self, campaign: CampaignConfig, reserved: ReserveResult) -> None:
        """Pacing on traffic as well as time: once this process has answered a part of the step share
        (SACO_PACING_STEP_SHARE) of the plan's decisions, or seen that part of the budget go, it asks for a
        pacing step in the background; the store steps only if the whole share has gone since the last step.
        Costs the decision path a few comparisons."""
        share = self.settings.pacing_step_share / ASKS_PER_SHARE
        if share <= 0 or not campaign.settings.pacing_on:
            return
        campaign_id, expected = campaign.campaign_id, campaign.settings.expected_decisions
        decisions, remaining = self._traffic.get(campaign_id, (0, reserved.remaining))
        decisions, remaining = decisions + len(reserved.actions), max(remaining, reserved.remaining)
        due = remaining - reserved.remaining >= share * campaign.budget
        due = due or (expected is not None and decisions >= share * expected)
        if not due or campaign_id in self._traffic_steps:
            self._traffic[campaign_id] = decisions, remaining
            return
        self._traffic[campaign_id] = 0, reserved.remaining
        task = asyncio.get_running_loop().create_task(self._traffic_step(campaign))
        self._traffic_steps[campaign_id] = task
        task.add_done_callback(lambda _: self._traffic_steps.pop(campaign_id, None))

    async def _traffic_step(self, campaign: CampaignConfig) -> None:
        try:
            await self._step(campaign.campaign_id, campaign.settings)
        except Exception:  # nobody awaits this task: the timer's steps go on
            log.warning("pacing step on traffic failed", extra={"campaign": campaign.campaign_id}, exc_info=True)

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
