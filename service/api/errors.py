"""Domain errors as HTTP answers, in one place: every route raises them, none translates them itself."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.batcher import BatcherOverloaded
from service.engine import InvalidInput
from service.metrics import ServiceMetrics
from service.state import CampaignNotFound, CostAboveReservation, StateStoreError

log = logging.getLogger("saco.service")
RETRY = {"Retry-After": "1"}


def _error(status_code: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


def add_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    async def invalid_input(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidInput)
        return _error(422, exc.errors)

    async def cost_above_reservation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, CostAboveReservation)
        loc = ["body", "outcomes", exc.index, "cost"]
        message = f"{exc}; no outcome of this request was applied"
        return _error(422, [{"type": "value_error", "loc": loc, "msg": message}])

    async def campaign_not_found(_: Request, exc: Exception) -> JSONResponse:
        return _error(404, str(exc))

    async def store_unavailable(_: Request, exc: Exception) -> JSONResponse:
        metrics.state_store_errors.inc()
        log.warning("state store error", extra={"error": str(exc)})
        return _error(503, "state store unavailable, retry later", RETRY)

    async def overloaded(_: Request, exc: Exception) -> JSONResponse:
        return _error(503, f"overloaded: {exc}", RETRY)

    async def invalid_body(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{k: v for k, v in e.items() if k != "ctx" or _plain(v)} for e in exc.errors()]
        return _error(422, _jsonable(errors))

    app.add_exception_handler(InvalidInput, invalid_input)
    app.add_exception_handler(CostAboveReservation, cost_above_reservation)
    app.add_exception_handler(CampaignNotFound, campaign_not_found)
    app.add_exception_handler(StateStoreError, store_unavailable)
    app.add_exception_handler(BatcherOverloaded, overloaded)
    app.add_exception_handler(RequestValidationError, invalid_body)


def _plain(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str | int | float | bool) for v in value.values())


def _jsonable(value: Any) -> Any:
    """A validation error's input as JSON can carry it (NaN and infinities as text)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if (isinstance(value, float) and value != value) or value in (float("inf"), float("-inf")):
        return str(value)
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    return str(value)
