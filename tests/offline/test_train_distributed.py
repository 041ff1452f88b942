"""`saco train` data-parallel under torchrun: two CPU processes (gloo) give a model of the same quality as
one process on the same data (held-out loss, and value in the synthetic world the logs came from), from logs
in memory and from window shards (each process reading only its own shards, and resuming from a checkpoint
after one of them is killed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch

from model_store import ModelStore, load_scripted
from offline.rollout import SequencePolicy, rollout
from offline.train import CHECKPOINT, TrainConfig
from offline.windows import build_windows
from research.simulate import simulate_logs
from research.world import SyntheticWorld, WorldConfig

BIN = Path(sys.executable).parent
WORLD = WorldConfig(users=1500, rounds=5, seed=3)
LAM = 0.5
_ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it: two threads per process contend


def _train(cmd: list[str], store: Path, *data: str) -> dict[str, object]:
    data = data or ("--logs", str(store.parent / "logs.parquet"))
    done = subprocess.run(
        [*cmd, "train", *data, "--store", str(store), "--epochs", "6"],
        capture_output=True,
        text=True,
        timeout=600,
        env=_ONE_THREAD,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # one JSON line: rank 0 publishes, rank 1 stays quiet
    return dict(json.loads(lines[0]))


def world_value(store: Path) -> float:
    """Revenue less LAM x cost per user of the store's current policy on 2,000 fresh users of the world of the
    logs (WORLD)."""
    artifact = ModelStore(store).load()
    m = artifact.manifest
    policy = SequencePolicy(
        load_scripted(artifact.model_path), m.context_length, m.initial_rtg, m.initial_ctg, m.feature_dim
    )
    r = rollout(SyntheticWorld(WORLD), policy, LAM, n_users=2000, seed=99)
    return (r.revenue - LAM * r.cost) / r.users


def test_two_processes_train_a_model_as_good_as_one(tmp_path: Path) -> None:
    subprocess.run(
        [
            str(BIN / "saco"),
            "simulate",
            "--users",
            str(WORLD.users),
            "--rounds",
            str(WORLD.rounds),
            "--seed",
            "3",
            "--out",
            str(tmp_path / "logs.parquet"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    one = _train([str(BIN / "saco")], tmp_path / "one")
    # "--": torchrun would read the abbreviation --logs as its own --logs-specs
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "saco", "--"]
    two = _train(torchrun, tmp_path / "two")
    assert one["processes"] == 1 and two["processes"] == 2
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=0.05)
    assert world_value(tmp_path / "two") == pytest.approx(world_value(tmp_path / "one"), rel=0.05)


def test_two_processes_each_stream_half_of_the_shards_to_a_model_as_good_as_one(tmp_path: Path) -> None:
    table = simulate_logs(WORLD)
    pq.write_table(table, tmp_path / "logs.parquet")
    build_windows(tmp_path / "logs.parquet", tmp_path / "windows", TrainConfig().context_length, shards=8, threads=1)
    windows = ("--windows", str(tmp_path / "windows"))
    one = [_train([str(BIN / "saco")], tmp_path / f"one-{seed}", *windows, "--seed", str(seed)) for seed in (0, 1)]
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "saco", "--"]
    two = _train(torchrun, tmp_path / "two", *windows, "--seed", "0")
    processes = two["per_process"]
    assert isinstance(processes, list) and [p["shards"] for p in processes] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    windows_of = [p["train_windows"] for p in processes]
    assert all(0.4 < w / sum(windows_of) < 0.6 for w in windows_of)  # about half of the windows each
    # the held-out loss within the spread of one process over seeds (held-out users differ by seed as well)
    losses = [float(r["val_loss"]) for r in one]  # type: ignore[arg-type]
    spread = max(abs(losses[0] - losses[1]), 0.01 * losses[0])
    assert abs(float(two["val_loss"]) - losses[0]) <= 2 * spread  # type: ignore[arg-type]
    values = [world_value(tmp_path / f"one-{seed}") for seed in (0, 1)]
    assert world_value(tmp_path / "two") == pytest.approx(
        values[0], abs=2 * max(abs(values[0] - values[1]), 0.01 * values[0])
    )

    # one of the two processes killed with SIGKILL after the first checkpoint: torchrun ends the run, and the
    # same command continues it to the model of the run not killed
    checkpoint = tmp_path / "checkpoint"
    again = [*windows, "--seed", "0", "--checkpoint-dir", str(checkpoint), "--checkpoint-every", "5"]
    cmd = [*torchrun, "train", *again, "--store", str(tmp_path / "resumed"), "--epochs", "6"]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ONE_THREAD)
    while not (checkpoint / CHECKPOINT).exists():
        assert run.poll() is None, run.communicate()[1][-3000:]
        time.sleep(0.02)
    workers = psutil.Process(run.pid).children()
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGKILL)
    assert run.wait(timeout=300) != 0
    resumed = _train(torchrun, tmp_path / "resumed", *again)
    assert 0 < int(resumed["resumed_from_step"]) < int(two["steps"])  # type: ignore[call-overload]
    assert resumed["val_loss"] == two["val_loss"]
    a, b = (load_scripted(ModelStore(tmp_path / name).load().model_path).state_dict() for name in ("two", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
