from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.body import json_body, parse_json_body
from service.api.deps import CampaignId, EngineDep
from service.schemas import DecisionsRequest, DecisionsResponse, OutcomesRequest, OutcomesResponse

router = APIRouter(prefix="/v1/campaigns", tags=["decisions"])


@router.post("/{campaign_id}/decisions", response_model=DecisionsResponse, openapi_extra=json_body(DecisionsRequest))
async def decide(campaign_id: CampaignId, request: Request, engine: EngineDep) -> Response:
    body = await parse_json_body(request, DecisionsRequest)
    return Response(await engine.decide(campaign_id, body), media_type="application/json")


@router.post("/{campaign_id}/outcomes", openapi_extra=json_body(OutcomesRequest))
async def record_outcomes(campaign_id: CampaignId, request: Request, engine: EngineDep) -> OutcomesResponse:
    return await engine.record_outcomes(campaign_id, await parse_json_body(request, OutcomesRequest))
