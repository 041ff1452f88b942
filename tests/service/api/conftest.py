from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_http import ADMIN_TOKEN

from model_store import ModelStore
from service.app import create_app
from service.settings import Settings


@pytest.fixture
def settings(store_kind: str, request: pytest.FixtureRequest, model_store_dir: Path, tmp_path: Path) -> Settings:
    """The service on each kind of store: the embedded one (no Redis URL: the service starts its own),
    a standalone Redis and a 3-master Cluster."""
    overrides: dict[str, Any] = {"store": str(model_store_dir), "admin_token": ADMIN_TOKEN, "device": "cpu"}
    if store_kind == "embedded":
        overrides["state_dir"] = str(tmp_path / "state")
    else:
        overrides["redis_url"] = request.getfixturevalue("store_url")
        overrides["redis_prefix"] = request.getfixturevalue("redis_prefix")
    return Settings(**overrides)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def feature_dim(model_store_dir: Path) -> int:
    return ModelStore(model_store_dir).load().manifest.feature_dim


@pytest.fixture
def num_actions(model_store_dir: Path) -> int:
    return ModelStore(model_store_dir).load().manifest.num_actions
