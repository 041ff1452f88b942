"""The app factory: `create_app(settings)` wires settings, model, state store, batcher and routes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.body import add_raw_body_schemas
from service.api.main import api_router
from service.api.routes.decisions import decisions_openapi, decisions_route
from service.batcher import BatcherOverloaded, MicroBatcher
from service.engine import DecisionEngine, InvalidInput
from service.logs import configure_logging, redact
from service.metrics import ServiceMetrics
from service.policy import PolicyHolder, load_policy
from service.runtime import Runtime
from service.settings import Settings
from service.state import CampaignNotFound, CostAboveReservation, StateStore, StateStoreError
from service.state.memory import MemoryStateStore
from service.state.redis_store import RedisStateStore

log = logging.getLogger("saco.service")


def make_state_store(settings: Settings) -> StateStore:
    if settings.redis_url:
        return RedisStateStore(
            settings.redis_url, prefix=settings.redis_prefix, socket_timeout_s=settings.redis_socket_timeout_s
        )
    return MemoryStateStore()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: ServiceMetrics = app.state.metrics
    torch.set_num_interop_threads(1) if torch.get_num_interop_threads() != 1 else None
    policy = await asyncio.to_thread(load_policy, settings.store, settings.device)
    metrics.set_model(None, policy.version)
    store = make_state_store(settings)
    if isinstance(store, RedisStateStore):
        try:
            await store.load_scripts()
        except Exception:  # Redis down at start: /readyz says so; scripts load on first NOSCRIPT
            log.warning("state store unreachable at startup")
    batcher = MicroBatcher(
        max_rows=settings.batcher_max_rows,
        max_wait_s=settings.batcher_max_wait_ms / 1000,
        queue_size=settings.batcher_queue_size,
        threads=settings.inference_threads(),
        metrics=metrics,
    )
    await batcher.start()
    policies = PolicyHolder(policy, settings.store, settings.device)
    engine = DecisionEngine(settings, policies, store, batcher, metrics)
    runtime = Runtime(settings, metrics, policies, store, batcher, engine)
    runtime.background.append(asyncio.create_task(engine.sweep_forever(), name="saco-sweep"))
    app.state.runtime = runtime
    # The model, the app and the libraries are long-lived: keep them out of the cyclic GC's passes, whose
    # full collections otherwise walk them all and show up as multi-millisecond tail latency.
    gc.collect()
    gc.freeze()
    gc.callbacks.append(metrics.gc_pauses)
    log.info(
        "service ready",
        extra={
            "model_version": policy.version,
            "device": str(policy.device),
            "state_store": "redis" if settings.redis_url else "embedded",
            "redis_url": redact(settings.redis_url or ""),
            "inference_threads": settings.inference_threads(),
        },
    )
    try:
        yield
    finally:
        for task in runtime.background:
            task.cancel()
        await engine.drain()
        await batcher.stop()
        gc.callbacks.remove(metrics.gc_pauses)
        gc.unfreeze()
        await store.close()


class TimingMiddleware:
    """Request latency by route template (pure ASGI: no per-request task like BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.request_seconds.labels(scope["method"], path, str(status_code)).observe(
                time.perf_counter() - started
            )


def _error(status_code: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    app = FastAPI(title="SACO coupon decisioning service", version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics = ServiceMetrics()
    app.router.routes.insert(0, decisions_route)  # first: the hot path skips the matching of the others
    app.include_router(api_router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = decisions_openapi(add_raw_body_schemas(FastAPI.openapi(app)))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(TimingMiddleware, metrics=metrics)

    @app.exception_handler(InvalidInput)
    async def invalid_input(_: Request, exc: InvalidInput) -> JSONResponse:
        return _error(422, exc.errors)

    @app.exception_handler(CostAboveReservation)
    async def cost_above(_: Request, exc: CostAboveReservation) -> JSONResponse:
        return _error(
            422,
            [
                {
                    "type": "value_error",
                    "loc": ["body", "outcomes", exc.index, "cost"],
                    "msg": str(exc) + "; no outcome of this request was applied",
                }
            ],
        )

    @app.exception_handler(CampaignNotFound)
    async def not_found(_: Request, exc: CampaignNotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(StateStoreError)
    async def store_down(_: Request, exc: StateStoreError) -> JSONResponse:
        metrics.state_store_errors.inc()
        log.warning("state store error", extra={"error": str(exc)})
        return _error(503, "state store unavailable, retry later", {"Retry-After": "1"})

    @app.exception_handler(BatcherOverloaded)
    async def overloaded(_: Request, exc: BatcherOverloaded) -> JSONResponse:
        return _error(503, f"overloaded: {exc}", {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k != "ctx" or _plain(v)} for e in exc.errors()]
        return _error(422, _jsonable(errors))

    return app


def _plain(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str | int | float | bool) for v in value.values())


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if (isinstance(value, float) and value != value) or value in (float("inf"), float("-inf")):
        return str(value)
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    return str(value)
