"""The decisions and outcomes routes (the commerce backend's API)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import CampaignId, EngineDep
from service.api.route import DecisionsRoute, OrjsonRoute
from service.schemas import (
    DecisionsRequest,
    DecisionsResponse,
    OutcomesRequest,
    OutcomesResponse,
    error_responses,
)

PREFIX = "/v1/campaigns"
decisions_router = APIRouter(prefix=PREFIX, tags=["decisions"], route_class=DecisionsRoute)
outcomes_router = APIRouter(prefix=PREFIX, tags=["decisions"], route_class=OrjsonRoute)


@decisions_router.post(
    "/{campaign_id}/decisions",
    response_model=DecisionsResponse,
    responses=error_responses(404, 409, 413, 415, 503),
)
async def decide(campaign_id: CampaignId, body: DecisionsRequest, engine: EngineDep) -> Response:
    """One decision per request, in the same order; each coupon's cost is reserved from the budget."""
    return Response(await engine.decide(campaign_id, body), media_type="application/json")


@outcomes_router.post("/{campaign_id}/outcomes", responses=error_responses(404, 413, 415, 503))
async def record_outcomes(campaign_id: CampaignId, body: OutcomesRequest, engine: EngineDep) -> OutcomesResponse:
    """Settle decisions: the realized cost replaces the reservation; a repeated outcome counts once."""
    return await engine.record_outcomes(campaign_id, body)


router = APIRouter()
router.include_router(decisions_router)
router.include_router(outcomes_router)
