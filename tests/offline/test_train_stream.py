"""Training that streams window shards (offline/shards.py, `train_windows`, `saco train --windows`): reads that
equal the files, statistics that do not depend on how the shards are split over processes, an order that resumes
at any step, a run killed with SIGKILL that resumes to the same model, a model as good as the in-memory path's,
and a published version the service loads and decides with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import SecretStr
from test_train_distributed import world_value

from model_store import ModelStore, load_scripted
from offline.logs import load_logs
from offline.shards import (
    Read,
    ShardReader,
    WindowStream,
    held_out,
    merge_stats,
    rank_shards,
    shard_stats,
    validation_batches,
)
from offline.train import CHECKPOINT
from offline.trajectories import WindowSteps
from offline.windows import build_windows, read_manifest
from research.simulate import simulate_logs
from research.world import WorldConfig
from service.app import create_app
from service.settings import Settings

BIN = Path(sys.executable).parent
SHARDS = 6
CONTEXT = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Logs of 1,500 users x 5 rounds (the world test_train_distributed trains on) and their window shards."""
    root = tmp_path_factory.mktemp("stream")
    table = simulate_logs(WorldConfig(users=1500, rounds=5, seed=3))
    pq.write_table(table, root / "logs.parquet")
    build_windows(root / "logs.parquet", root / "windows", CONTEXT, shards=SHARDS, threads=1)
    return root


def _readers(windows: Path, shards: list[int] | None = None) -> dict[int, ShardReader]:
    files = read_manifest(windows)["files"]
    assert isinstance(files, list)
    return {s: ShardReader(windows / files[s]["file"]) for s in (shards or range(len(files)))}


def test_reads_equal_the_shard_files(data: Path, tmp_path: Path) -> None:
    reader = _readers(data / "windows", [0])[0]
    with np.load(reader.path) as whole:
        for name in whole.files:
            np.testing.assert_array_equal(reader.read(name), whole[name])
            np.testing.assert_array_equal(reader.read(name, 7, 131), whole[name][7:131])
    truncated = tmp_path / "shard.npz"
    truncated.write_bytes(reader.path.read_bytes()[:-200])
    with pytest.raises(ValueError, match=f"{truncated}: not a readable shard file"):
        ShardReader(truncated)


def test_statistics_are_the_training_rows_and_the_same_for_any_split_over_processes(data: Path) -> None:
    windows = data / "windows"
    manifest = read_manifest(windows)
    scales = (float(manifest["rtg_scale"]), float(manifest["ctg_scale"]))  # type: ignore[arg-type]
    readers = _readers(windows)
    stats = {s: shard_stats(r, s, 0, 0.2, *scales, read_windows=97) for s, r in readers.items()}
    one = merge_stats(list(stats.values()))
    for world in (2, 4):  # each process's shards, gathered process by process
        split = [stats[s] for rank in range(world) for s in rank_shards(SHARDS, rank, world)]
        other = merge_stats(split)
        for a, b in zip(vars(one).values(), vars(other).values(), strict=True):
            np.testing.assert_array_equal(a, b)

    # the training rows: each logged step of a training user is in exactly one window's loss mask
    features, costs, actions = [], [], []
    for s, reader in readers.items():
        loss_mask, users = reader.read("loss_mask"), reader.read("window_user")
        train = ~held_out(0, s, users, 0.2)
        features.append(reader.read("states")[loss_mask & train[:, None]])
        costs.append(reader.read("value_targets")[..., 1][loss_mask])
        actions.append(reader.read("actions")[loss_mask])
    rows = np.concatenate(features).astype(np.float64)
    logs = load_logs(data / "logs.parquet")
    assert one.rows == len(rows) and sum(len(c) for c in costs) == logs.n_rows
    assert 0.15 < 1 - len(rows) / logs.n_rows < 0.25  # about val_fraction of the rows held out
    np.testing.assert_allclose(one.state_mean, rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(one.state_std, rows.std(0), rtol=1e-6)
    assert one.num_actions == logs.num_actions
    np.testing.assert_allclose(
        one.action_costs, [logs.cost[logs.action == a].mean() for a in range(logs.num_actions)], rtol=1e-9
    )


def test_an_epoch_is_every_training_window_once_and_any_step_can_be_read_again(data: Path) -> None:
    windows = data / "windows"
    readers = _readers(windows, [1, 3])  # a small buffer and odd reads: batches straddle buffers
    reads = [
        Read(s, start, min(start + 37, r.windows), int(n))
        for s, r in readers.items()
        for start, n in zip(range(0, r.windows, 37), shard_stats(r, s, 5, 0.2, 1.0, 1.0, 37).train_windows, strict=True)
    ]
    stream = WindowStream(readers, reads, seed=5, rank=1, val_fraction=0.2, buffer_windows=100, lambda_max=1.0)

    def key(batch: tuple[WindowSteps, np.ndarray]) -> list[bytes]:
        steps = batch[0]
        return [steps.history.states[i].tobytes() + steps.value_targets[i].tobytes() for i in range(len(batch[1]))]

    batch = 64
    steps = -(-stream.windows // batch)
    epoch = [key(stream.batch(0, j, batch)) for j in range(steps)]
    seen = [k for keys in epoch for k in keys][: stream.windows]
    expected = []
    for s, reader in readers.items():
        _, all_steps = reader.steps(0, reader.windows)
        train = ~held_out(5, s, reader.read("window_user"), 0.2)
        for i in np.flatnonzero(train):
            expected.append(all_steps.history.states[i].tobytes() + all_steps.value_targets[i].tobytes())
    assert sorted(seen) == sorted(expected)  # each training window once, no held-out one
    assert [k for keys in epoch for k in keys][stream.windows :] == seen[: steps * batch - stream.windows]
    again = WindowStream(readers, reads, seed=5, rank=1, val_fraction=0.2, buffer_windows=100, lambda_max=1.0)
    for j in (steps - 1, 3, 0):  # a process that starts at step j reads what the one that got there read
        assert key(again.batch(0, j, batch)) == epoch[j]
    assert key(again.batch(1, 0, batch)) != epoch[0]  # another epoch, another order

    held = [len(lam) for _, lam in validation_batches(readers, 5, 0.2, 1.0, 37)]
    assert sum(held) + stream.windows == sum(r.windows for r in readers.values())


def _saco_train(*args: str) -> subprocess.Popen[str]:
    # one torch thread: two contend badly with the other work of a small shared machine
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [str(BIN / "saco"), "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _json(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return dict(json.loads(out.strip().splitlines()[-1]))


def _weights(store: Path, version: str) -> dict[str, torch.Tensor]:
    return dict(load_scripted(ModelStore(store).load(version).model_path).state_dict())


def test_a_run_killed_with_sigkill_resumes_to_the_model_of_a_run_not_killed(data: Path, tmp_path: Path) -> None:
    windows, steps = str(data / "windows"), 120
    common = ["--windows", windows, "--max-steps", str(steps), "--checkpoint-every", "10", "--seed"]
    checkpoint = tmp_path / "ckpt"
    killed = _saco_train(*common, "2", "--store", str(tmp_path / "a"), "--checkpoint-dir", str(checkpoint))
    deadline = time.monotonic() + 600
    while not (checkpoint / CHECKPOINT).exists():  # the first checkpoint (step 10): it is training
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "a").exists() or not ModelStore(tmp_path / "a").list_versions()  # nothing published

    resumed = _json(_saco_train(*common, "2", "--store", str(tmp_path / "a"), "--checkpoint-dir", str(checkpoint)))
    whole = _json(_saco_train(*common, "2", "--store", str(tmp_path / "b")))
    assert 0 < int(resumed["resumed_from_step"]) < steps  # type: ignore[call-overload]
    assert whole["resumed_from_step"] == 0 and resumed["steps"] == whole["steps"] == steps
    assert resumed["val_loss"] == whole["val_loss"]
    a, b = _weights(tmp_path / "a", str(resumed["version"])), _weights(tmp_path / "b", str(whole["version"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = _saco_train(*common, "3", "--store", str(tmp_path / "a"), "--checkpoint-dir", str(checkpoint))
    _, err = other.communicate(timeout=300)
    assert other.returncode != 0 and "differs in config.seed" in err and "--no-resume" in err


def test_the_streamed_model_is_as_good_as_the_in_memory_one_and_the_service_serves_it(
    data: Path, tmp_path: Path
) -> None:
    memory = _saco_train("--logs", str(data / "logs.parquet"), "--store", str(tmp_path / "m"), "--epochs", "6")
    memory_run = _json(memory)
    stream_run = _json(_saco_train("--windows", str(data / "windows"), "--store", str(tmp_path / "s"), "--epochs", "6"))
    assert stream_run["epochs_run"] == memory_run["epochs_run"] == 6
    # quality: value per user on fresh users of the world the logs came from (the held-out losses are over
    # different held-out users, each path drawing its own)
    assert world_value(tmp_path / "s") == pytest.approx(world_value(tmp_path / "m"), rel=0.03)

    artifact = ModelStore(tmp_path / "s").load()
    assert artifact.version == stream_run["version"] and artifact.manifest.context_length == CONTEXT
    settings = Settings(
        store=str(tmp_path / "s"), admin_token=SecretStr("t"), device="cpu", state_dir=str(tmp_path / "state")
    )
    with TestClient(create_app(settings)) as client:
        coupons = [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}, {"action": 3, "cost": 10.0}]
        put = client.put(
            "/v1/admin/campaigns/c1",
            json={"budget": 1000.0, "coupons": coupons, "lambda": 0.1},
            headers={"Authorization": "Bearer t"},
        )
        assert put.status_code == 200, put.text
        dim = artifact.manifest.feature_dim
        requests = [{"user_id": f"u{i}", "features": [0.1 * i] * dim} for i in range(8)]
        answer = client.post("/v1/campaigns/c1/decisions", json={"requests": requests})
        assert answer.status_code == 200, answer.text
        decisions = answer.json()["decisions"]
        assert [d["model_version"] for d in decisions] == [artifact.version] * 8
        assert any(d["action"] > 0 for d in decisions)
