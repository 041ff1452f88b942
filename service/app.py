"""The app factory: `create_app(settings)` wires settings, model, state store, batcher and routes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator

import swagger_ui_bundle
import torch
from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import add_error_handlers, body_too_large
from service.api.main import api_router
from service.background import Background
from service.batcher import MicroBatcher
from service.campaigns import Campaigns
from service.decisions import Decisions
from service.jsonlog import configure_logging, redact
from service.metrics import ServiceMetrics
from service.policy import LoadedPolicy, PolicyHolder, load_policy
from service.runtime import Runtime
from service.settings import Settings
from service.state.embedded import EmbeddedRedis
from service.state.store import StateStore

log = logging.getLogger("saco.service")


async def open_state_store(settings: Settings) -> tuple[StateStore, EmbeddedRedis | None]:
    """The configured Redis, or the embedded store's private redis-server when none is configured."""
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.state_path())
        # on this thread, not a worker's: the child is told to stop when the thread that started it ends
        url = embedded.start()
    store = StateStore(
        url,
        prefix=settings.redis_prefix,
        cluster=settings.redis_cluster,
        socket_timeout_s=settings.redis_socket_timeout_s,
        log_max_entries=settings.log_max_entries,
    )
    if not await store.ping():  # Redis down at start: /readyz says so until it answers
        log.warning("state store unreachable at startup")
    return store, embedded


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: ServiceMetrics = app.state.metrics
    torch.set_num_interop_threads(1) if torch.get_num_interop_threads() != 1 else None
    preloaded: LoadedPolicy | None = getattr(app.state, "policy", None)  # `saco serve` verified it before
    if preloaded is None:
        policy = await asyncio.to_thread(load_policy, settings.store, settings.device)
    else:
        policy = preloaded
    metrics.set_model(None, (policy.version, policy.calibration_id))
    store, embedded = await open_state_store(settings)
    batcher = MicroBatcher(
        max_rows=settings.batcher_max_rows,
        max_wait_s=settings.batcher_max_wait_ms / 1000,
        queue_size=settings.batcher_queue_size,
        threads=settings.inference_threads(),
        metrics=metrics,
    )
    await batcher.start()
    policies = PolicyHolder(policy, settings.store, settings.device)
    background = Background(settings, policies, store, metrics)
    decisions = Decisions(settings, policies, store, batcher, metrics, background)
    runtime = Runtime(
        settings,
        metrics,
        policies,
        store,
        batcher,
        decisions,
        Campaigns(settings, policies, store, metrics),
        background,
    )
    runtime.tasks.append(asyncio.create_task(background.sweep_forever(), name="saco-sweep"))
    runtime.tasks.append(asyncio.create_task(background.pace_forever(), name="saco-pacing"))
    runtime.tasks.append(asyncio.create_task(runtime.follow_model_announcements(), name="saco-models"))
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
            "calibration": policy.calibration_id,
            "device": str(policy.device),
            "state_store": "redis" if settings.redis_url else f"embedded ({settings.state_path()})",
            "redis_cluster": store.cluster,
            "redis_url": redact(settings.redis_url or ""),
            "inference_threads": settings.inference_threads(),
        },
    )
    try:
        yield
    finally:
        for task in runtime.tasks:
            task.cancel()
        await asyncio.gather(*runtime.tasks, return_exceptions=True)
        await decisions.drain()
        await batcher.stop()
        gc.callbacks.remove(metrics.gc_pauses)
        gc.unfreeze()
        await store.close()
        if embedded is not None:
            embedded.stop()


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodySizeLimit:
    """413 for a request body above `max_bytes`, before it is parsed: at once when its Content-Length says
    so (nothing read), else as soon as the bytes read pass the limit. Either way one JSON answer naming
    the limit (through the error handlers when the route was reading its body)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdecimal() and (len(declared) > len(str(self.max_bytes)) or int(declared) > self.max_bytes):
            await body_too_large(self.max_bytes)(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if started:
                raise
            await body_too_large(self.max_bytes)(scope, receive, send)


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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="SACO coupon decisioning service",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # served below from local assets: /docs works without internet
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics = ServiceMetrics()
    app.include_router(api_router)
    add_docs(app)
    app.add_middleware(TimingMiddleware, metrics=metrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    add_error_handlers(app, metrics)
    return app


DOCS_ASSETS = "/docs/assets"


def add_docs(app: FastAPI) -> None:
    """The Swagger UI at /docs, its scripts and styles served by this app (the swagger-ui-bundle package's
    copy, with its license), so that the page needs nothing from another host."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )
