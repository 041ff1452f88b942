"""`saco serve`: run the app under uvicorn (one worker; scale with processes sharing one Redis)."""

from __future__ import annotations

from typing import Any

import uvicorn

from service.app import create_app
from service.settings import Settings


def run(store: str, host: str = "127.0.0.1", port: int = 8000, redis_url: str | None = None) -> None:
    """Serve the current model of `store`; `redis_url` None falls back to SACO_REDIS_URL, else embedded."""
    overrides: dict[str, Any] = {"store": store}
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    settings = Settings(**overrides)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=host,
        port=port,
        workers=1,
        access_log=False,
        log_config=None,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="run the SACO decision service")
    parser.add_argument("--store", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--redis-url", default=None)
    ns = parser.parse_args()
    run(ns.store, ns.host, ns.port, ns.redis_url)
