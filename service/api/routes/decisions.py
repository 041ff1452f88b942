from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import CampaignId, EngineDep
from service.schemas import DecisionsRequest, DecisionsResponse, OutcomesRequest, OutcomesResponse

router = APIRouter(prefix="/v1/campaigns", tags=["decisions"])


@router.post("/{campaign_id}/decisions", response_model=DecisionsResponse)
async def decide(campaign_id: CampaignId, body: DecisionsRequest, engine: EngineDep) -> Response:
    return Response(await engine.decide(campaign_id, body), media_type="application/json")


@router.post("/{campaign_id}/outcomes")
async def record_outcomes(campaign_id: CampaignId, body: OutcomesRequest, engine: EngineDep) -> OutcomesResponse:
    return await engine.record_outcomes(campaign_id, body)
