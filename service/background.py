"""The service's background work: pacing steps and the sweep of expired reservations."""

from __future__ import annotations

import asyncio
import logging

from contract.money import from_cents
from service.lambdas import base_lambda, lambda_scale
from service.metrics import ServiceMetrics
from service.policy import PolicyHolder
from service.settings import Settings
from service.state import (
    StateStoreError,
)
from service.state.store import StateStore

log = logging.getLogger("saco.service.background")


class Background:
    def __init__(self, settings: Settings, policies: PolicyHolder, store: StateStore, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.policies = policies
        self.store = store
        self.metrics = metrics

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
