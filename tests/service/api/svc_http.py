"""Constants and small helpers of the HTTP contract tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_store import ModelStore

ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
COUPONS = [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}, {"action": 3, "cost": 10.0}]


def campaign_body(budget: float = 100.0, **extra: Any) -> dict[str, Any]:
    return {"budget": budget, "coupons": COUPONS, **extra}


def users(n: int, dim: int, prefix: str = "u", value: float = 0.1, **extra: Any) -> list[dict[str, Any]]:
    return [{"user_id": f"{prefix}{i}", "features": [value + 0.01 * i] * dim, **extra} for i in range(n)]


def republish(store_dir: Path, *, make_current: bool = True, **manifest_changes: Any) -> str:
    """Publish the current artifact again as a new version, with manifest fields changed."""
    store = ModelStore(store_dir)
    current = store.load()
    manifest = current.manifest.to_json()
    for key in ("version", "created_at", "model_sha256"):
        manifest.pop(key)
    manifest.update(manifest_changes)
    return store.publish(current.model_path, manifest, make_current=make_current).version
