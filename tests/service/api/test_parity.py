"""Training-serving parity: a user's decisions and outcomes sent through HTTP to the served app, exported by
`saco export` and built into training windows: the inputs the served model saw equal, exactly, the inputs
training builds for the same steps. On standalone Redis, a Cluster and the embedded store."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from svc_http import ADMIN, campaign_body

from contract.inputs import NAMES, ModelInputs
from loop.data import DelayConfig, training_logs
from model_store import ModelStore
from offline.trajectories import build_trajectories, make_batch
from service.app import create_app
from service.policy import LoadedPolicy
from service.settings import Settings

SACO = str(Path(sys.executable).with_name("saco"))


class RecordingPolicy(LoadedPolicy):
    """The served policy (its real TorchScript runs), keeping every batch of inputs it was given."""

    seen: list[ModelInputs]

    def scores(self, inputs: ModelInputs) -> np.ndarray:
        self.seen.append(inputs)
        return super().scores(inputs)


def left_padded(inputs: ModelInputs, length: int) -> ModelInputs:
    """`inputs` padded on the left (zeros, mask False) to `length` steps, as training windows are."""
    return ModelInputs.concatenate([inputs, ModelInputs.zeros(0, length, inputs.states.shape[2])])


def serve_export_and_record(settings: Settings, feature_dim: int, out: Path) -> dict[str, Any]:
    """Two users' decisions and outcomes (each outcome before the user's next decision; rewards of any
    precision, some half a cent) through HTTP, then `saco export` into `out`. Returns, by decision id, the
    inputs the model saw for that decision and the user."""
    rng = np.random.default_rng(7)
    served: dict[str, Any] = {}
    with TestClient(create_app(settings)) as client:
        runtime: Any = client.app.state.runtime  # type: ignore[attr-defined]
        current: LoadedPolicy = runtime.policies.current
        recording = RecordingPolicy(current.artifact, current.module, current.device)
        object.__setattr__(recording, "seen", [])
        runtime.policies.current = recording
        body = campaign_body(1_000_000.0, **{"lambda": 0.25})
        assert client.put("/v1/admin/campaigns/c", json=body, headers=ADMIN).status_code == 200
        steps = recording.artifact.manifest.context_length + 3  # more than a context holds: the oldest trim
        for step in range(steps):
            for user in ("u", "v"):
                features = rng.normal(size=feature_dim).round(3).tolist()
                resp = client.post(
                    "/v1/campaigns/c/decisions", json={"requests": [{"user_id": user, "features": features}]}
                )
                assert resp.status_code == 200, resp.text
                (decision,) = resp.json()["decisions"]
                served[decision["decision_id"]] = (recording.seen[-1], user)
                reward = float(rng.choice([0.0, 0.125, 3.335, round(float(rng.uniform(0, 40)), 4)]))
                cost = decision["cost"] if decision["action"] and rng.random() < 0.6 else 0.0
                outcome = {"decision_id": decision["decision_id"], "reward": reward, "cost": cost}
                resp = client.post("/v1/campaigns/c/outcomes", json={"outcomes": [outcome]})
                assert resp.json()["accepted"] == 1, resp.text
                time.sleep(0.002)  # decisions in distinct milliseconds: the logs order a user's steps by time
            assert step < steps
        client.portal.call(runtime.decisions.drain)  # type: ignore[union-attr]
        prefix = settings.redis_prefix
        cmd = [
            SACO,
            "export",
            "--redis-url",
            runtime.store.url,
            "--prefix",
            prefix,
            "--out",
            str(out),
            "--batch-size",
            "7",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return served


def test_served_inputs_equal_the_training_windows_of_the_same_steps(settings: Settings, tmp_path: Path) -> None:
    manifest = ModelStore(settings.store).load().manifest
    out = tmp_path / "export"
    served = serve_export_and_record(settings, manifest.feature_dim, out)

    logs, logged = training_logs(out, now_ms=int(time.time() * 1000) + 1, delay=DelayConfig("naive", maturity_ms=0))
    assert logs.n_rows == len(served)
    table = logged.table
    decision_of = {
        (user, t): d
        for user, t, d in zip(
            table["user_id"].to_pylist(), table["t"].to_pylist(), table["decision_id"].to_pylist(), strict=True
        )
    }
    lam_of = dict(zip(table["decision_id"].to_pylist(), table["lambda"].to_pylist(), strict=True))
    rows = [decision_of[(str(logs.user_ids[u]), int(t))] for u, t in zip(logs.user, logs.t, strict=True)]
    traj = build_trajectories(logs, manifest.context_length)
    windows = traj.windows(loss_on_every_step=False)  # one window ending at every logged step, in row order
    lam = np.array([lam_of[d] for d in rows])
    batch = make_batch(traj, windows, "value", lam, manifest.initial_rtg, manifest.initial_ctg, manifest.max_timestep)
    trained = ModelInputs(*(x.numpy() for x in batch.inputs))

    compared = 0
    for row, decision_id in enumerate(rows):
        seen, user = served[decision_id]
        assert str(logs.user_ids[logs.user[row]]) == f"c/{user}" and seen.rows == 1  # training's ids: campaign/user
        window = trained.sliced(slice(row, row + 1))
        padded = left_padded(seen, manifest.context_length)
        for name, got, want in zip(NAMES, padded.arrays(), window.arrays(), strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            np.testing.assert_array_equal(got, want, err_msg=f"{name} of {decision_id} (row {row})")
        compared += 1
    assert compared == len(served)
    # the windows are not trivially equal: the to-go inputs moved with the outcomes, and contexts were trimmed
    assert len(set(trained.rtg[:, -1].tolist())) > len(served) // 2
    assert trained.timesteps[:, -1].max() == manifest.context_length + 2
