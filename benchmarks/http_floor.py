"""The HTTP floor of the decisions route: what any FastAPI service answering it costs, with no model and no
store. The same route class and body model as the service (so the same parse and validation of the body),
the same answer rendered the same way, run under uvicorn as `saco serve` runs the service. Every user gets
action 0.

    python benchmarks/http_floor.py --port 8001      # bench_service.py starts it beside the services
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastapi import APIRouter, FastAPI, Response

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from service.api.deps import CampaignId  # noqa: E402
from service.api.route import DecisionsRoute  # noqa: E402
from service.schemas import DecisionsRequest, DecisionsResponse  # noqa: E402
from service.scoring import render  # noqa: E402
from service.server import serve_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.state import ReserveResult  # noqa: E402

router = APIRouter(route_class=DecisionsRoute)


@router.post("/v1/campaigns/{campaign_id}/decisions", response_model=DecisionsResponse)
async def decide(campaign_id: CampaignId, body: DecisionsRequest) -> Response:
    users = len(body.requests)
    answer = ReserveResult(
        decision_ids=[f"d-floor-{i}" for i in range(users)],
        user_ids=[r.user_id for r in body.requests],
        actions=[0] * users,
        costs=[0] * users,
        versions=["floor"] * users,
        lams=[0.0] * users,
        new=[True] * users,
        downgraded=[False] * users,
        remaining=0,
    )
    return Response(render(list(range(users)), answer), media_type="application/json")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def floor_app() -> FastAPI:
    app = FastAPI(title="decisions route floor")
    app.state.settings = Settings()  # the batch limit the route class checks
    app.include_router(router)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    serve_app(floor_app(), args.host, args.port, "WARNING")
