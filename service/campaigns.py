"""Campaigns: create, replace, patch, read (the admin routes), and the campaign view."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from contract.catalog import Catalog, CatalogError
from contract.money import from_cents, to_cents
from service.lambdas import resolve_lambda
from service.metrics import ServiceMetrics
from service.policy import PolicyHolder
from service.schemas import (
    CampaignPatch,
    CampaignPut,
    InvalidInput,
)
from service.scoring import min_redemption
from service.settings import Settings
from service.state import (
    CampaignNotFound,
    CampaignState,
    CampaignUpdate,
    Groups,
)
from service.state.store import StateStore


def now_ms() -> int:
    return int(time.time() * 1000)


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


def coupons_view(campaign: CampaignState) -> dict[str, Any]:
    """The view's coupons: {action, cost} each for a campaign without a catalog; with one, each coupon's
    catalog fields and the units of its stock left (below 0 only after an operator lowered the stock below
    what is held or redeemed, or a coupon redeemed after its reservation expired took its unit again), and
    the allowed bundles."""
    catalog = campaign.settings.catalog
    if catalog is None:
        return {"coupons": [{"action": a, "cost": from_cents(c)} for a, c in sorted(campaign.coupons.items())]}
    coupons = []
    for coupon in catalog.coupons:
        left = None if coupon.stock is None else coupon.stock - campaign.stock_used.get(coupon.action, 0)
        coupons.append({**coupon.public(), "stock_left": left})
    return {"coupons": coupons, **catalog.public()}


def epoch_ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


class Campaigns:
    def __init__(self, settings: Settings, policies: PolicyHolder, store: StateStore, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.policies = policies
        self.store = store
        self.metrics = metrics

    def _catalog(self, body: CampaignPut | CampaignPatch, stored: CampaignState | None) -> Catalog | None:
        """The campaign's catalog after this PUT or PATCH (None: unchanged, a PATCH that names none of its
        fields); a PATCH keeps what it does not name of the stored one. Every rule of contract/catalog.py,
        and each coupon one of the model's actions."""
        given = body.model_fields_set & {"coupons", "bundles", "max_per_bundle"}
        if stored is not None and not given:
            return None
        kept = None if stored is None else stored.settings
        kept_catalog = None if kept is None else kept.catalog or Catalog.of_costs(kept.coupons)
        bundles = body.bundles if "bundles" in given or kept_catalog is None else kept_catalog.listed
        per_bundle = (
            body.max_per_bundle if "max_per_bundle" in given or kept_catalog is None else kept_catalog.max_per_bundle
        )
        try:
            if "coupons" in given:
                coupons = [c.model_dump(by_alias=True, exclude_none=True) for c in body.coupons or []]
                catalog = Catalog.parse(coupons, bundles, per_bundle)
            else:  # the stored coupons
                assert kept_catalog is not None
                catalog = Catalog.build(kept_catalog.coupons, bundles, per_bundle)
        except CatalogError as exc:
            raise InvalidInput(exc.loc, exc.msg, exc.value) from None
        num_actions = self.policies.current.manifest.num_actions
        for i, coupon in enumerate(catalog.coupons):
            if coupon.action >= num_actions:
                raise InvalidInput(
                    ("coupons", i, "action"),
                    f"must be within 1..{num_actions - 1} (the model's actions)",
                    coupon.action,
                )
        return catalog

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
        catalog = self._catalog(body, None if replace else stored)
        return CampaignUpdate(
            replace=replace,
            budget=None if body.budget is None else to_cents(body.budget),
            coupons=None if catalog is None else catalog.costs,
            catalog=None if catalog is None or catalog.plain else catalog,
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
            cleared=cleared - {"budget", "coupons", "bundles", "max_per_bundle"},
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
        policy = self.policies.current
        lam, source = resolve_lambda(campaign.config, policy.manifest)
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
            **coupons_view(campaign),
            "lambda_source": source,
            "calibration": policy.calibration_id,
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
            "min_redemption": min_redemption(self.settings.min_redemption, settings),
            "outstanding": from_cents(campaign.outstanding),
            "explored": campaign.explored,
            "holdout": group_view(campaign.holdout),
            "treated": group_view(campaign.treated),
            "incremental_revenue_per_decision": incremental,
            "log_entries": campaign.log_entries,
            "log_lost": campaign.log_lost,
        }
