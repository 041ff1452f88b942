from __future__ import annotations

from fastapi import APIRouter, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import RuntimeDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(runtime: RuntimeDep, response: Response) -> dict[str, object]:
    store_ok = await runtime.store.ping()
    if not store_ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return {"ready": store_ok, "model_version": runtime.policies.current.version, "state_store": store_ok}


@router.get("/metrics")
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
