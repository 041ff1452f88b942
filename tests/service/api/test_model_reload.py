"""POST /v1/admin/models/reload: a good version swaps in; a bad one is refused and the incumbent serves."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from svc_http import ADMIN, campaign_body, republish, users

from model_store import ModelStore


def test_reload_swaps_to_the_new_current_version(client: TestClient, model_store_dir: Path, feature_dim: int) -> None:
    before = client.get("/readyz").json()["model_version"]
    same = client.post("/v1/admin/models/reload", headers=ADMIN).json()
    unchanged = {"calibration": None, "previous_calibration": None}
    assert same == {"version": before, "previous": before, "changed": False, **unchanged}
    new = republish(model_store_dir)
    resp = client.post("/v1/admin/models/reload", headers=ADMIN)
    assert resp.status_code == 200
    assert resp.json() == {"version": new, "previous": before, "changed": True, **unchanged}
    client.put("/v1/admin/campaigns/c1", json=campaign_body(), headers=ADMIN)
    decisions = client.post("/v1/campaigns/c1/decisions", json={"requests": users(2, feature_dim)}).json()
    assert {d["model_version"] for d in decisions["decisions"]} == {new}


def test_reload_serves_a_new_calibration_of_the_serving_version(
    client: TestClient, model_store_dir: Path, feature_dim: int
) -> None:
    """A calibration recorded for the version that serves is served after a reload (the version unchanged),
    and the answers name it: the reload, /readyz, the campaign view, the metrics."""
    store = ModelStore(model_store_dir)
    version = client.get("/readyz").json()["model_version"]
    client.put("/v1/admin/campaigns/c1", json=campaign_body(1e6), headers=ADMIN)
    before = client.post("/v1/campaigns/c1/decisions", json={"requests": users(1, feature_dim)}).json()
    calibration = store.calibrate(version, command="test", lam=0.375).calibration
    assert calibration is not None
    still = client.post("/v1/campaigns/c1/decisions", json={"requests": users(1, feature_dim, "v")}).json()
    assert still["decisions"][0]["lambda"] == before["decisions"][0]["lambda"] != 0.375  # not told yet
    resp = client.post("/v1/admin/models/reload", headers=ADMIN).json()
    assert resp == {
        "version": version,
        "previous": version,
        "changed": True,
        "calibration": calibration.id,
        "previous_calibration": None,
    }
    after = client.post("/v1/campaigns/c1/decisions", json={"requests": users(1, feature_dim, "w")}).json()
    assert after["decisions"][0]["lambda"] == 0.375 and after["decisions"][0]["model_version"] == version
    view = client.get("/v1/admin/campaigns/c1", headers=ADMIN).json()
    assert view["lambda"] == 0.375 and view["lambda_source"] == "model-default"
    assert view["calibration"] == calibration.id
    assert client.get("/readyz").json()["calibration"] == calibration.id
    assert f'calibration="{calibration.id}"' in client.get("/metrics").text
    again = client.post("/v1/admin/models/reload", headers=ADMIN).json()
    assert again["changed"] is False and again["calibration"] == calibration.id


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
