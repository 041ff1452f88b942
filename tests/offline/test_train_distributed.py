"""`saco train` data-parallel under torchrun: two CPU processes (gloo) give a model of the same quality as
one process on the same data (held-out loss, and value in the synthetic world the logs came from)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model_store import ModelStore, load_scripted
from offline.rollout import SequencePolicy, rollout
from research.world import SyntheticWorld, WorldConfig

BIN = Path(sys.executable).parent
WORLD = WorldConfig(users=1500, rounds=5, seed=3)
LAM = 0.5


def _train(cmd: list[str], store: Path) -> dict[str, object]:
    done = subprocess.run(
        [*cmd, "train", "--logs", str(store.parent / "logs.parquet"), "--store", str(store), "--epochs", "6"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # one JSON line: rank 0 publishes, rank 1 stays quiet
    return dict(json.loads(lines[0]))


def _world_value(store: Path) -> float:
    artifact = ModelStore(store).load()
    m = artifact.manifest
    policy = SequencePolicy(
        load_scripted(artifact.model_path), m.context_length, m.initial_rtg, m.initial_ctg, m.feature_dim
    )
    r = rollout(SyntheticWorld(WorldConfig(users=2000, rounds=5, seed=99)), policy, LAM)
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
    assert _world_value(tmp_path / "two") == pytest.approx(_world_value(tmp_path / "one"), rel=0.05)
