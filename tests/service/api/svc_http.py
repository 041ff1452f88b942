"""Constants and small helpers of the HTTP contract tests."""

from __future__ import annotations

from typing import Any

ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
COUPONS = [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}, {"action": 3, "cost": 10.0}]


def campaign_body(budget: float = 100.0, **extra: Any) -> dict[str, Any]:
    return {"budget": budget, "coupons": COUPONS, **extra}


def users(n: int, dim: int, prefix: str = "u", value: float = 0.1, **extra: Any) -> list[dict[str, Any]]:
    return [{"user_id": f"{prefix}{i}", "features": [value + 0.01 * i] * dim, **extra} for i in range(n)]
