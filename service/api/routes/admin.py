from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status

from service.api.deps import AdminDep, CampaignId, CampaignsDep, RuntimeDep
from service.api.route import AdminRoute
from service.policy import PolicyRejected
from service.runtime import served
from service.schemas import CampaignPatch, CampaignPut, CampaignView, ReloadResponse, error_responses

# AdminRoute checks the token before the body is read; the dependency declares the scheme in OpenAPI
router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[AdminDep],
    route_class=AdminRoute,
    responses=error_responses(401, 404, 503),
)
BODY_ERRORS = error_responses(413, 415)


@router.put("/campaigns/{campaign_id}", response_model=CampaignView, responses=BODY_ERRORS)
async def put_campaign(campaign_id: CampaignId, body: CampaignPut, campaigns: CampaignsDep) -> dict[str, Any]:
    return await campaigns.put_campaign(campaign_id, body)


@router.patch("/campaigns/{campaign_id}", response_model=CampaignView, responses=BODY_ERRORS)
async def patch_campaign(campaign_id: CampaignId, body: CampaignPatch, campaigns: CampaignsDep) -> dict[str, Any]:
    return await campaigns.patch_campaign(campaign_id, body)


@router.get("/campaigns/{campaign_id}", response_model=CampaignView)
async def get_campaign(campaign_id: CampaignId, campaigns: CampaignsDep) -> dict[str, Any]:
    return await campaigns.get_campaign(campaign_id)


@router.post("/models/reload", responses=error_responses(409))
async def reload_model(runtime: RuntimeDep) -> ReloadResponse:
    """Load the store's current version with its active calibration, verify it (checksums, dimensions, test
    forward), then swap."""
    try:
        previous, current = await runtime.reload_model()
    except PolicyRejected as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"model not loaded, the incumbent keeps serving: {exc}") from exc
    return ReloadResponse(
        version=current.version,
        previous=previous.version,
        changed=served(previous) != served(current),
        calibration=current.calibration_id,
        previous_calibration=previous.calibration_id,
    )
