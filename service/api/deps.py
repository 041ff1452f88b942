"""Route dependencies, as `Annotated` aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.campaigns import Campaigns
from service.decisions import Decisions
from service.runtime import Runtime
from service.schemas import CAMPAIGN_ID_PATTERN, CAMPAIGN_ID_TEXT


async def get_runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain `def` dependency on its thread pool (a thread hop per request)
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_decisions(request: Request) -> Decisions:
    decisions: Decisions = request.app.state.runtime.decisions
    return decisions


async def get_campaigns(request: Request) -> Campaigns:
    campaigns: Campaigns = request.app.state.runtime.campaigns
    return campaigns


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
DecisionsDep = Annotated[Decisions, Depends(get_decisions)]
CampaignsDep = Annotated[Campaigns, Depends(get_campaigns)]
CampaignId = Annotated[str, Path(pattern=CAMPAIGN_ID_PATTERN, description=CAMPAIGN_ID_TEXT)]

_bearer = HTTPBearer(auto_error=False)


def check_admin(request: Request) -> None:
    """Bearer SACO_ADMIN_TOKEN (401 without it). Without a configured token the admin routes do not
    exist (404). Runs before the request's body is read (the admin routes' route class calls it)."""
    token = request.app.state.settings.admin_token
    if token is None or not token.get_secret_value():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "admin API is disabled (SACO_ADMIN_TOKEN is not set)")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong admin bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_admin(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """The admin check as a dependency: declares the bearer scheme in the OpenAPI document."""
    check_admin(request)


AdminDep = Depends(require_admin)
