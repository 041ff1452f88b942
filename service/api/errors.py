"""Domain errors as HTTP answers, in one place: every route raises them, none translates them itself."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import BatcherOverloaded
from service.metrics import ServiceMetrics
from service.schemas import InvalidInput
from service.state import (
    CampaignNotFound,
    CostAboveReservation,
    CouponCostsRefused,
    RequestIdConflict,
    StateStoreError,
)

log = logging.getLogger("saco.service")
RETRY = {"Retry-After": "1"}
# A 422 names what is wrong without echoing a large input back: at most this many errors, strings cut to
# this many characters, arrays and objects summarised past this many entries or this depth.
MAX_ERRORS = 50
ECHO_CHARS = 120
ECHO_ITEMS = 8
ECHO_DEPTH = 2


def _error(status_code: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


def body_too_large(max_bytes: int) -> JSONResponse:
    return _error(413, f"request body larger than {max_bytes} bytes (SACO_MAX_BODY_BYTES)")


def add_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    async def invalid_input(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidInput)
        return _error(422, exc.errors)

    async def cost_above_reservation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, CostAboveReservation)
        loc = ["body", "outcomes", exc.index, "cost" if exc.coupon is None else "coupons"]
        message = f"{exc}; no outcome of this request was applied"
        return _error(422, [{"type": "value_error", "loc": loc, "msg": message}])

    async def coupon_costs_refused(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, CouponCostsRefused)
        loc = ["body", "outcomes", exc.index, "coupons"]
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
        found = exc.errors()
        errors: list[Any] = [
            {k: [_short(p) for p in v] if k == "loc" else _short(v) for k, v in e.items() if k != "ctx" or _plain(v)}
            for e in found[:MAX_ERRORS]
        ]
        if len(found) > MAX_ERRORS:
            errors.append({"type": "too_many_errors", "loc": ["body"], "msg": f"and {len(found) - MAX_ERRORS} more"})
        return _error(422, _jsonable(errors))

    async def request_id_conflict(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestIdConflict)
        loc = ["body", "requests", exc.item, "request_id"]
        message = f"{exc}; no decision of this request was made"
        return _error(409, [{"type": "request_id_conflict", "loc": loc, "msg": _short(message)}])

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 413:
            return body_too_large(request.app.state.settings.max_body_bytes)
        return await http_exception_handler(request, exc)

    app.add_exception_handler(InvalidInput, invalid_input)
    app.add_exception_handler(CostAboveReservation, cost_above_reservation)
    app.add_exception_handler(CouponCostsRefused, coupon_costs_refused)
    app.add_exception_handler(CampaignNotFound, campaign_not_found)
    app.add_exception_handler(StateStoreError, store_unavailable)
    app.add_exception_handler(BatcherOverloaded, overloaded)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(RequestIdConflict, request_id_conflict)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _plain(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str | int | float | bool) for v in value.values())


def _short(value: Any, depth: int = 0) -> Any:
    """`value` cut to a size that names what was wrong without sending a large input back."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        return value if len(value) <= ECHO_CHARS else f"{value[:ECHO_CHARS]}... ({len(value)} characters)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**ECHO_CHARS:
        return f"(an integer of {len(str(abs(value)))} digits)"
    if isinstance(value, dict):
        if len(value) > ECHO_ITEMS or depth >= ECHO_DEPTH:
            return f"(an object of {len(value)} fields)"
        return {_short(k, depth + 1): _short(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if len(value) > ECHO_ITEMS or depth >= ECHO_DEPTH:
            return f"(an array of {len(value)} items)"
        return [_short(v, depth + 1) for v in value]
    return value


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
