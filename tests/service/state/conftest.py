"""Store scenarios run against each way the store runs (standalone Redis, Cluster, embedded)."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from service.state import CampaignUpdate, ReserveBatch, ReserveItem, ReserveResult
from service.state.store import StateStore

Scenario = Callable[[StateStore], Awaitable[Any]]
Run = Callable[[Scenario], Any]
DAY_MS = 86_400_000
ONE, TWO = struct.pack("<f", 1.0), struct.pack("<f", 2.0)  # 1-feature states


@pytest.fixture
def run(store_url: str, redis_prefix: str) -> Run:
    """Run an async scenario against a fresh store on `store_url` (each kind of store in turn)."""

    def runner(scenario: Scenario) -> Any:
        async def main() -> Any:
            # a generous bound: these tests check rules, not timeouts, on a machine that may be busy
            store = StateStore(store_url, prefix=redis_prefix, socket_timeout_s=5)
            try:
                return await scenario(store)
            finally:
                await store.close()

        return asyncio.run(main())

    return runner


def put(budget: int, coupons: dict[int, int] | None = None, **kw: Any) -> CampaignUpdate:
    return CampaignUpdate(replace=True, budget=budget, coupons=coupons or {1: 200, 2: 500, 3: 1000}, **kw)


async def reserve(
    store: StateStore,
    campaign: str,
    items: list[ReserveItem] | ReserveBatch,
    now: int | None = None,
    expiry_ms: int = DAY_MS,
) -> ReserveResult:
    return await store.reserve(
        campaign,
        items,
        model_version="v1",
        lam=0.25,
        now_ms=now if now is not None else int(time.time() * 1000),
        reservation_expiry_ms=expiry_ms,
        decision_ttl_ms=30 * DAY_MS,
    )


def item(user: str, prefs: list[int], request_id: str | None = None) -> ReserveItem:
    return ReserveItem(user, request_id, prefs)
