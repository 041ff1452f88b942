"""POST /v1/admin/models/reload: a good version swaps in; a bad one is refused and the incumbent serves."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from svc_http import ADMIN, campaign_body, republish, users


def test_reload_swaps_to_the_new_current_version(client: TestClient, model_store_dir: Path, feature_dim: int) -> None:
    before = client.get("/readyz").json()["model_version"]
    same = client.post("/v1/admin/models/reload", headers=ADMIN).json()
    assert same == {"version": before, "previous": before, "changed": False}
    new = republish(model_store_dir)
    resp = client.post("/v1/admin/models/reload", headers=ADMIN)
    assert resp.status_code == 200 and resp.json() == {"version": new, "previous": before, "changed": True}
    client.put("/v1/admin/campaigns/c1", json=campaign_body(), headers=ADMIN)
    decisions = client.post("/v1/campaigns/c1/decisions", json={"requests": users(2, feature_dim)}).json()
    assert {d["model_version"] for d in decisions["decisions"]} == {new}


def check_refused(client: TestClient, feature_dim: int, incumbent: str, reason: str) -> None:
    resp = client.post("/v1/admin/models/reload", headers=ADMIN)
    assert resp.status_code == 409, resp.text
    assert reason in resp.json()["detail"]
    assert client.get("/readyz").json()["model_version"] == incumbent
    client.put("/v1/admin/campaigns/c1", json=campaign_body(), headers=ADMIN)
    ok = client.post("/v1/campaigns/c1/decisions", json={"requests": users(1, feature_dim)})
    assert ok.status_code == 200 and ok.json()["decisions"][0]["model_version"] == incumbent


def test_reload_refuses_a_model_whose_forward_fails(
    client: TestClient, model_store_dir: Path, feature_dim: int
) -> None:
    incumbent = client.get("/readyz").json()["model_version"]
    republish(model_store_dir, feature_dim=feature_dim + 1)
    check_refused(client, feature_dim, incumbent, "test forward failed")


def test_reload_refuses_wrong_output_dimensions(
    client: TestClient, model_store_dir: Path, feature_dim: int, num_actions: int
) -> None:
    incumbent = client.get("/readyz").json()["model_version"]
    republish(model_store_dir, num_actions=num_actions + 1)
    check_refused(client, feature_dim, incumbent, "shape")


def test_reload_refuses_a_corrupt_artifact(client: TestClient, model_store_dir: Path, feature_dim: int) -> None:
    incumbent = client.get("/readyz").json()["model_version"]
    version = republish(model_store_dir)
    model = model_store_dir / "versions" / version / "model.pt"
    model.write_bytes(model.read_bytes() + b"tampered")
    check_refused(client, feature_dim, incumbent, "checksum")
    manifest = json.loads((model_store_dir / "versions" / version / "manifest.json").read_text())
    assert manifest["version"] == version
