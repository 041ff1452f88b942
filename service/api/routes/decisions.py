"""The decisions and outcomes routes (the commerce backend's API)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import CampaignId, EngineDep
from service.api.route import OrjsonRoute
from service.schemas import DecisionsRequest, DecisionsResponse, OutcomesRequest, OutcomesResponse

router = APIRouter(prefix="/v1/campaigns", tags=["decisions"], route_class=OrjsonRoute)


@router.post("/{campaign_id}/decisions", response_model=DecisionsResponse)
async def decide(campaign_id: CampaignId, body: DecisionsRequest, engine: EngineDep) -> Response:
    """One decision per request, in the same order; each coupon's cost is reserved from the budget."""
    return Response(await engine.decide(campaign_id, body), media_type="application/json")


@router.post("/{campaign_id}/outcomes")
async def record_outcomes(campaign_id: CampaignId, body: OutcomesRequest, engine: EngineDep) -> OutcomesResponse:
    """Settle decisions: the realized cost replaces the reservation; a repeated outcome counts once."""
    return await engine.record_outcomes(campaign_id, body)
