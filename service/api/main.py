from fastapi import APIRouter

from service.api.routes import admin, decisions, ops

api_router = APIRouter()
api_router.include_router(decisions.router)
api_router.include_router(admin.router)
api_router.include_router(ops.router)
