from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import RuntimeDep, check_admin
from service.metrics import WithoutCampaigns
from service.schemas import error_responses

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(runtime: RuntimeDep, response: Response) -> dict[str, object]:
    store_ok = await runtime.store.ping()
    if not store_ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    policy = runtime.policies.current
    return {
        "ready": store_ok,
        "model_version": policy.version,
        "calibration": policy.calibration_id,
        "state_store": store_ok,
    }


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format; what it shows is SACO_METRICS_EXPOSURE's choice",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **error_responses(401),
    },
)
async def metrics(runtime: RuntimeDep, request: Request) -> Response:
    exposure = runtime.settings.metrics_exposure
    if exposure == "admin":
        check_admin(request)
    registry = runtime.metrics.registry
    body = generate_latest(WithoutCampaigns(registry) if exposure == "aggregate" else registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
