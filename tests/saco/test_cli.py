"""The `saco` command end to end on a tiny world, as a user runs it (real subprocesses)."""

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model_store import ModelStore


def saco(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "saco", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_simulate_train_calibrate_end_to_end(tmp_path: Path) -> None:
    logs, store = tmp_path / "logs.parquet", tmp_path / "store"
    sim = last_json(saco("simulate", "--users", "300", "--rounds", "4", "--seed", "2", "--out", str(logs)).stdout)
    assert sim == {"rows": 1200, "path": str(logs)}
    trained = saco("train", "--logs", str(logs), "--store", str(store), "--epochs", "6", "--seed", "0")
    info = last_json(trained.stdout)
    assert ModelStore(store).current_version() == info["version"]
    assert "train" in trained.stderr  # progress went to stderr
    budget = round(0.5 * pc.sum(pq.read_table(logs)["cost"]).as_py(), 2)
    # without a ledger lambda matches spend to the budget (the strict default trades spend for revenue)
    calibrate = ("calibrate", "--store", str(store), "--logs", str(logs), "--budget", str(budget))
    cal = last_json(saco(*calibrate, "--reservation", "none").stdout)
    assert 0.98 <= cal["cost"] / budget <= 1.0, cal
    manifest = ModelStore(store).load().manifest
    assert manifest.default_lambda == cal["lambda"] and len(manifest.lambda_table) >= 3
    costs = [p.cost_per_user for p in manifest.lambda_table]  # sorted by lambda: spend falls
    # in a sequential environment fewer coupons now can mean slightly more redemptions later: allow 1%
    assert all(a >= b - 0.01 * costs[0] for a, b in itertools.pairwise(costs)), costs
    assert costs[0] > 2 * costs[-1], costs
    listed = last_json(saco("models", "list", "--store", str(store)).stdout)
    assert listed["current"] == info["version"]
    # --no-promote publishes a version without making it current
    quiet = last_json(saco("train", "--logs", str(logs), "--store", str(store), "--epochs", "1", "--no-promote").stdout)
    assert quiet["current"] is False and quiet["version"] != info["version"]
    listed = last_json(saco("models", "list", "--store", str(store)).stdout)
    assert listed["current"] == info["version"] and quiet["version"] in listed["versions"]


def test_csv_output_and_bad_logs_refused(tmp_path: Path) -> None:
    csv = tmp_path / "logs.csv"
    saco("simulate", "--users", "20", "--rounds", "2", "--out", str(csv))
    assert csv.read_text().splitlines()[0].startswith("user_id,t,action,cost,reward,f0")
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,t,action,cost,reward,f0\nu1,0,1,1.0,2.0,nan\n")
    proc = saco("train", "--logs", str(bad), "--store", str(tmp_path / "s"), check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: column 'f0'")
    assert not (tmp_path / "s").exists() or ModelStore(tmp_path / "s").list_versions() == []


def test_errors_are_one_line(tmp_path: Path) -> None:
    proc = saco(
        "calibrate", "--store", str(tmp_path / "none"), "--logs", str(tmp_path / "x.csv"), "--budget", "10", check=False
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no current version" in lines[0]
    proc = saco("serve", "--store", str(tmp_path / "none"), check=False)
    assert proc.returncode != 0 and "--bootstrap" in proc.stderr


def test_simulate_refuses_an_unknown_extension_before_simulating(tmp_path: Path) -> None:
    out = tmp_path / "new" / "logs.txt"
    started = time.monotonic()
    # a million users x 50 rounds would take minutes to simulate: the refusal must come first
    proc = subprocess.run(
        [sys.executable, "-m", "saco", "simulate", "--users", "1000000", "--rounds", "50", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert time.monotonic() - started < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "logs.txt" in lines[0] and ".parquet or .csv" in lines[0], proc.stderr
    assert proc.stdout == ""
    assert not out.parent.exists()  # nothing written, not even the directory


def test_help_reads_naturally() -> None:
    """Every boolean option reads --x / --no-x (or is a plain --x flag): never --no-no-x."""
    commands = [[], ["simulate"], ["train"], ["calibrate"], ["evaluate"], ["serve"], ["report"], ["models", "list"]]
    commands.append(["retrain"])
    helps = {}
    for cmd in commands:
        proc = subprocess.run(
            [sys.executable, "-m", "saco", *cmd, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert proc.returncode == 0, proc.stderr
        helps[" ".join(cmd)] = proc.stdout
        assert "--no-no-" not in proc.stdout, (cmd, proc.stdout)
    assert "--promote" in helps["train"] and "--no-promote" in helps["train"]
    assert "--effects" in helps["simulate"] and "--no-effects" in helps["simulate"]
    assert "--quick" in helps["report"] and "--no-quick" not in helps["report"]
    assert "--by-features" in helps["retrain"] and "--by-index" in helps["retrain"]


def test_windows_shards_a_parquet_log_and_names_a_bad_row(tmp_path: Path) -> None:
    logs = tmp_path / "logs.parquet"
    saco("simulate", "--users", "50", "--rounds", "3", "--seed", "1", "--out", str(logs))
    built = last_json(saco("windows", "--logs", str(logs), "--out", str(tmp_path / "w"), "--shards", "3").stdout)
    assert built == {"rows": 150, "users": 50, "windows": 50, "shards": 3, "path": str(tmp_path / "w")}
    assert sorted(p.name for p in (tmp_path / "w").glob("shard-*.npz")) == [f"shard-0000{k}.npz" for k in range(3)]
    table = pq.read_table(logs)
    pq.write_table(table.set_column(3, "cost", pa.array([-1.0] + [0.0] * 149)), tmp_path / "bad.parquet")
    refused = saco("windows", "--logs", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "b"), check=False)
    assert refused.returncode != 0
    assert refused.stderr.strip() == "error: column 'cost' must be >= 0; row 1 has -1.0"
    engine = saco("windows", "--logs", str(logs), "--out", str(tmp_path / "e"), "--engine", "hive", check=False)
    assert engine.returncode != 0
    assert engine.stderr.strip() == "error: --engine must be one of duckdb, spark, got 'hive'"


def test_train_takes_window_shards_and_refuses_what_does_not_fit_them(tmp_path: Path) -> None:
    logs, windows, store = tmp_path / "logs.parquet", tmp_path / "w", tmp_path / "store"
    saco("simulate", "--users", "60", "--rounds", "4", "--seed", "1", "--out", str(logs))
    saco("windows", "--logs", str(logs), "--out", str(windows), "--shards", "2")
    # the directory `saco windows` wrote, given as --logs, is streamed like --windows
    trained = last_json(saco("train", "--logs", str(windows), "--store", str(store), "--max-steps", "3").stdout)
    assert trained["steps"] == 3 and trained["per_process"][0]["shards"] == [0, 1]
    assert ModelStore(store).load().version == trained["version"]
    refusals = {
        ("--store", str(store)): "error: give the training data: --logs PATH or --windows DIR",
        ("--logs", str(logs), "--store", str(store), "--checkpoint-dir", str(tmp_path / "c")): (
            "error: --checkpoint-dir needs --windows: training on logs in memory keeps no checkpoints"
        ),
        ("--windows", str(windows), "--store", str(store), "--context-length", "3"): (
            f"error: the windows in {windows} are 6 steps long and the model's context is 3: build windows of that "
            "length (saco windows --context-length)"
        ),
    }
    for args, line in refusals.items():
        refused = saco("train", *args, check=False)
        assert refused.returncode != 0 and refused.stderr.strip() == line
