"""The decisions and outcomes routes (the commerce backend's API)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import CampaignId, DecisionsDep
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
async def decide(campaign_id: CampaignId, body: DecisionsRequest, decisions: DecisionsDep) -> Response:
    """One decision per request, in the same order; each coupon's cost is reserved from the budget."""
    return Response(await decisions.decide(campaign_id, body), media_type="application/json")


@outcomes_router.post("/{campaign_id}/outcomes", responses=error_responses(404, 413, 415, 503))
async def record_outcomes(campaign_id: CampaignId, body: OutcomesRequest, decisions: DecisionsDep) -> OutcomesResponse:
    """Settle decisions: the realized cost replaces the reservation; a repeated outcome counts once."""
    return await decisions.record_outcomes(campaign_id, body)


router = APIRouter()
router.include_router(decisions_router)
router.include_router(outcomes_router)
