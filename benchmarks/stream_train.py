"""Training that streams window shards against training on logs held in memory, at the same step budget.

Simulates random logs of N users x T rounds (`saco simulate`), writes their window shards (`saco windows`), then
for each training seed runs `saco train --logs` (in memory) and `saco train --windows` (streaming), alternately,
each with `--max-steps S`, one torch thread per process, under `/usr/bin/time` (peak resident memory, wall
time); optionally a two-process `torchrun` of the streaming path at S / 2 steps (each step takes two batches).
Every published model is then calibrated, in the world the logs came from, to budgets at 20%, 40% and 60% of
the smallest unconstrained spend of the models (the monotone search of `saco evaluate`, spend in [0.995, 1]
x the budget) on the same fresh users, and its revenue at exactly the budget (interpolated between the
search's points on either side) printed. The last line is JSON.

    .venv/bin/python benchmarks/stream_train.py --users 100000 --rounds 10 --steps 4000 --seeds 0 --torchrun --no-eval
    .venv/bin/python benchmarks/stream_train.py --users 100000 --rounds 10 --steps 4000 --seeds 0 1 2
    .venv/bin/python benchmarks/stream_train.py --users 2000 --rounds 5 --steps 100 --seeds 0 --torchrun  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_store import ModelStore
from offline.calibrate import CalibrationResult, search_monotone
from offline.rollout import SequencePolicy
from research.evaluate import COMPARISON_TARGET_LOW, CachedSimulator
from research.world import SyntheticWorld, WorldConfig

BIN = Path(sys.executable).parent
LEVELS = (0.2, 0.4, 0.6)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(cmd: list[str]) -> tuple[dict[str, Any], float, float]:
    """Run a `saco` command under /usr/bin/time: its JSON line, wall seconds and peak resident MB."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as clock:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "-o", clock.name, *cmd], capture_output=True, text=True, env=env
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        seconds, kilobytes = clock.read().split()
    return json.loads(done.stdout.strip().splitlines()[-1]), float(seconds), float(kilobytes) / 1024


def at_budget(result: CalibrationResult) -> float:
    """Revenue at exactly the budget: interpolated on the policy's (spend, revenue) points the search passed
    through (the calibrated point itself spends 0.995-1.000 of it)."""
    points = sorted((e.cost, e.revenue) for e in result.history)
    return float(np.interp(result.budget, [c for c, _ in points], [r for _, r in points]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4000, help="the step budget of every training run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--torchrun", action="store_true", help="also train the streaming path with 2 processes")
    ap.add_argument("--eval-users", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=Path("var/stream-bench"), help="logs, shards, stores, runs.jsonl")
    ap.add_argument("--no-eval", action="store_true", help="train only (a later invocation evaluates every run)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    saco = str(BIN / "saco")
    logs, windows = out / "logs.parquet", out / "windows"
    rows = args.users * args.rounds
    record = out / "runs.jsonl"  # runs already made (a later invocation adds seeds and evaluates them all)
    runs: list[dict[str, Any]] = (
        [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    )
    done = {(r["path"], r.get("seed")) for r in runs}

    def keep(run: dict[str, Any]) -> None:
        runs.append(run)
        with record.open("a") as fh:
            fh.write(json.dumps(run) + "\n")

    if not logs.exists():
        _, seconds, mb = timed(
            [saco, "simulate", "--users", str(args.users), "--rounds", str(args.rounds), "--out", str(logs)]
        )
        say(f"simulate: {rows} rows in {seconds:.1f} s, peak {mb:.0f} MB")
    if not windows.exists():
        _, seconds, mb = timed(
            [saco, "windows", "--logs", str(logs), "--out", str(windows), "--shards", str(args.shards)]
        )
        say(f"windows: {seconds:.1f} s, peak {mb:.0f} MB")
        keep({"path": "windows", "seconds": seconds, "peak_mb": mb})

    steps = str(args.steps)
    for i, seed in enumerate(args.seeds):
        paths = [("memory", "--logs", logs), ("stream", "--windows", windows)]
        for name, flag, data in paths if i % 2 == 0 else paths[::-1]:  # alternate which goes first
            if (name, seed) in done:
                continue
            store = out / f"{name}-{seed}"
            cmd = [saco, "train", flag, str(data), "--store", str(store), "--max-steps", steps, "--seed", str(seed)]
            result, seconds, mb = timed(cmd)
            keep({"path": name, "seed": seed, "store": str(store), "seconds": seconds, "peak_mb": mb, **result})
            say(f"{name} seed {seed}: {seconds:.1f} s, peak {mb:.0f} MB, held-out loss {result['val_loss']:.4f}")
    if args.torchrun and ("stream x2", 0) not in done:
        store = out / "stream2-0"
        torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "saco", "--"]
        cmd = [*torchrun, "train", "--windows", str(windows), "--store", str(store), "--max-steps"]
        result, seconds, mb = timed([*cmd, str(args.steps // 2), "--seed", "0"])
        keep({"path": "stream x2", "seed": 0, "store": str(store), "seconds": seconds, "peak_mb": mb, **result})
        peaks = [p["peak_rss_mb"] for p in result["per_process"]]
        say(f"stream, 2 processes, seed 0: {seconds:.1f} s, peak per process {peaks} MB")

    if args.no_eval:
        return
    torch.set_num_threads(1)  # the rollouts: as the training runs, one thread on a shared machine
    world = SyntheticWorld(WorldConfig(users=args.users, rounds=args.rounds, seed=0))
    sims = {}
    for run in runs:
        if "store" not in run:
            continue
        policy = SequencePolicy.of_artifact(ModelStore(Path(run["store"])).load())
        sims[run["store"]] = CachedSimulator(world, policy, args.eval_users, 12_345)
    reference = min(sim(0.0)[1] for sim in sims.values())
    for run in runs:
        if "store" in run:
            found = [
                search_monotone(sims[run["store"]], f * reference, target_low=COMPARISON_TARGET_LOW) for f in LEVELS
            ]
            run["revenue"] = [at_budget(r) for r in found]
            run["barate"] = [r.barate for r in found]
            say(f"{run['path']} seed {run['seed']}: revenue {[round(r) for r in run['revenue']]}")

    print(f"\n{rows:,} rows, {args.steps} steps; revenue at {', '.join(f'{f:.0%}' for f in LEVELS)} of spend")
    print("| path | seed | wall s | peak MB | held-out loss | revenue at equal spend | BARate |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        if "store" in run:
            revenue = " / ".join(f"{r:,.0f}" for r in run["revenue"])
            barate = f"{min(run['barate']):.3f}-{max(run['barate']):.3f}"
            print(
                f"| {run['path']} | {run['seed']} | {run['seconds']:.0f} | {run['peak_mb']:.0f} | "
                f"{run['val_loss']:.4f} | {revenue} | {barate} |"
            )
        else:
            print(f"| {run['path']} | - | {run['seconds']:.0f} | {run['peak_mb']:.0f} | - | - | - |")
    by_path = {
        name: np.array([r["revenue"] for r in runs if r["path"] == name and "revenue" in r])
        for name in ("memory", "stream")
    }
    if all(len(v) for v in by_path.values()):
        mean = {name: v.mean(0) for name, v in by_path.items()}
        spread = {name: (v.max(0) - v.min(0)) / v.mean(0) for name, v in by_path.items()}
        print("stream / memory (mean over seeds):", np.round(mean["stream"] / mean["memory"], 4).tolist())
        print(
            "seed spread (max - min) / mean: memory",
            np.round(spread["memory"], 4).tolist(),
            "stream",
            np.round(spread["stream"], 4).tolist(),
        )
    print(json.dumps({"rows": rows, "steps": args.steps, "levels": LEVELS, "reference_spend": reference, "runs": runs}))


if __name__ == "__main__":
    main()
