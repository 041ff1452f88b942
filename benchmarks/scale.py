"""Scale: simulate -> windows -> train -> calibrate at growing log sizes, the peak memory of every process.

Per size (rows = users x 10 rounds), each stage is the `saco` command a platform runs, in a fresh process:

1. `saco simulate --users N/10` (a block of users at a time, written as it goes);
2. `saco windows --shards S --memory-limit 512MB` (DuckDB, out of core; S = max(4, rows / 10^6));
3. training: `saco train --windows DIR --max-steps STEPS` where `saco train` streams window shards, else the
   in-memory `saco train --logs --epochs 1` (it loads the whole log; up to --train-max-rows); with
   --train-revision REV, the training stage runs that git revision's `saco train` (a `git archive` of it,
   `python -m saco` run from its root);
4. `saco calibrate --windows DIR --sample 20000 --workers 2` (a map over shards; the budget half the logged
   random policy's spend per user, for every user), with the model of the largest size trained.

Each process tree is sampled every 0.1 s (psutil: the resident memory of the command and of each worker it
starts) and run under /usr/bin/time (%M: the largest resident memory any process of the tree reached; the
figure reported is the larger of the two). Time per row is the stage's wall time over the rows. Results
are merged into --json by size, so sizes can be run separately; the PNG plots every size in it.

    .venv/bin/python benchmarks/scale.py                                 # 10^5, 10^6, 10^7 rows
    .venv/bin/python benchmarks/scale.py --rows 100000000                # one more size, merged in
    .venv/bin/python benchmarks/scale.py --rows 100000 --out /tmp/scale  # a quick look
    .venv/bin/python benchmarks/scale.py --report --json docs/scale.json --png docs/scale.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
SACO = [sys.executable, "-m", "saco"]
LIMIT_MB = 2048


def run_stage(name: str, argv: list[str], log: Path, cwd: Path = REPO) -> dict[str, Any]:
    """Run one command; its wall time, last JSON line, and the peak resident memory of each of its processes."""
    with tempfile.NamedTemporaryFile(suffix=".time") as timing, open(log, "ab") as err:
        err.write(f"\n$ {' '.join(argv)}\n".encode())
        err.flush()
        started = time.perf_counter()
        proc = psutil.Popen(
            ["/usr/bin/time", "-f", "%M", "-o", timing.name, *argv], stdout=subprocess.PIPE, stderr=err, cwd=cwd
        )
        peaks: dict[int, float] = {}
        roles: dict[int, str] = {}
        while proc.poll() is None:
            try:
                tree = proc.children(recursive=True)
            except psutil.Error:
                tree = []
            for p in tree:
                try:
                    rss = p.memory_info().rss / 2**20
                    if p.pid not in roles:
                        helper = "resource_tracker" in " ".join(p.cmdline())  # multiprocessing's bookkeeper
                        roles[p.pid] = "command" if p.ppid() == proc.pid else "helper" if helper else "worker"
                except psutil.Error:
                    continue
                peaks[p.pid] = max(peaks.get(p.pid, 0.0), rss)
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        stdout = proc.stdout.read().decode() if proc.stdout is not None else ""
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {proc.returncode}): see {log}")
        tree_max = int(Path(timing.name).read_text().strip().splitlines()[-1]) / 1024
    command = [mb for pid, mb in peaks.items() if roles.get(pid) == "command"]
    workers = [mb for pid, mb in peaks.items() if roles.get(pid) == "worker"]
    helpers = [mb for pid, mb in peaks.items() if roles.get(pid) == "helper"]
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return {
        "seconds": round(seconds, 2),
        "peak_mb": round(max([tree_max, *command, *workers, *helpers]), 1),
        "command_mb": round(max(command, default=tree_max), 1),
        "workers": len(workers),
        "worker_peak_mb": round(max(workers, default=0.0), 1),
        "result": json.loads(lines[-1]) if lines else None,
    }


def streaming_train(train: list[str], cwd: Path) -> bool:
    """Whether `saco train` streams window shards with a step budget."""
    out = subprocess.run([*train, "train", "--help"], capture_output=True, text=True, cwd=cwd, check=True).stdout
    return "--windows" in out and "--max-steps" in out


def revision_source(revision: str, root: Path) -> Path:
    """A git revision's tree, extracted under `root` (its `python -m saco` runs from there)."""
    source = root / "train-revision"
    if source.exists():
        shutil.rmtree(source)
    source.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    return source


def one_size(rows: int, args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    users = rows // 10
    work = args.out / f"{rows}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = work / "stderr.log"
    logs, windows, store = work / "logs.parquet", work / "windows", work / "store"
    shards = max(4, rows // 1_000_000)
    out: dict[str, Any] = {"rows": rows, "users": users, "shards": shards}

    def stage(name: str, argv: list[str], cwd: Path = REPO) -> dict[str, Any]:
        print(f"  {rows:>11,} rows: {name} ...", file=sys.stderr, flush=True)
        result = run_stage(name, argv, log, cwd)
        print(
            f"  {rows:>11,} rows: {name} {result['seconds']:.1f} s, peak {result['peak_mb']:.0f} MB"
            + (
                f" ({result['workers']} workers, each <= {result['worker_peak_mb']:.0f} MB)"
                if result["workers"]
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )
        out[name] = result
        return result

    stage("simulate", [*SACO, "simulate", "--users", str(users), "--rounds", "10", "--seed", "0", "--out", str(logs)])
    limit = ["--memory-limit", args.memory_limit]
    built = stage(
        "windows",
        [*SACO, "windows", "--logs", str(logs), "--out", str(windows), "--shards", str(shards), *limit],
    )
    assert built["result"] is not None and built["result"]["rows"] == rows
    if state["streaming"]:
        train = [*SACO, "train", "--windows", str(windows), "--store", str(store), "--max-steps", str(args.steps)]
    elif rows <= args.train_max_rows:
        train = [*SACO, "train", "--logs", str(logs), "--store", str(store), "--epochs", "1"]
    else:
        train = []
    if train:
        stage("train", train, state["train_cwd"])
        state["store"] = store
    else:
        out["train"] = {"skipped": f"the in-memory `saco train` above {args.train_max_rows:,} rows"}
    if state.get("store") is None:
        raise RuntimeError("no model to calibrate: train at a smaller size first (--rows in increasing order)")
    manifest = json.loads((windows / "manifest.json").read_text())
    budget = round(args.budget_fraction * float(manifest["initial_ctg"]) * manifest["users"], 2)
    sample = min(args.sample, users)
    calibrate = [*SACO, "calibrate", "--store", str(state["store"]), "--windows", str(windows)]
    calibrate += ["--budget", str(budget), "--sample", str(sample), "--workers", str(args.workers)]
    stage("calibrate", calibrate)
    out["calibrate"]["budget"] = budget
    out["calibrate"]["model_rows"] = int(Path(state["store"]).parent.name)
    for name in ("simulate", "windows", "train", "calibrate"):
        if "seconds" in out[name]:
            out[name]["us_per_row"] = round(out[name]["seconds"] / rows * 1e6, 3)
    if not args.keep:  # the disk: 10^8 rows are ~17 GB of logs and shards
        logs.unlink()
        for f in windows.glob("shard-*.npz"):
            f.unlink()
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("simulate", "windows", "train", "calibrate")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in stages:
        points = [(r["rows"], r[name]) for r in results if "seconds" in r.get(name, {})]
        if not points:
            continue
        rows = [p[0] for p in points]
        left.plot(rows, [p[1]["us_per_row"] for p in points], marker="o", label=name)
        right.plot(rows, [p[1]["peak_mb"] for p in points], marker="o", label=name)
    right.axhline(LIMIT_MB, color="grey", linestyle="--", linewidth=1, label="2 GB")
    right.set_ylim(0, LIMIT_MB * 1.1)
    left.set_yscale("log")
    for ax, title, unit in ((left, "time per row", "µs per row"), (right, "peak resident memory", "MB")):
        ax.set_xscale("log")
        ax.set_xlabel("rows (log scale)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("saco simulate -> windows -> train -> calibrate (2 cores; each process's peak)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: list[dict[str, Any]]) -> None:
    print(f"{'rows':>12} | {'stage':<9} | {'seconds':>8} | {'us/row':>7} | {'peak MB':>7} | processes")
    for r in results:
        for name in ("simulate", "windows", "train", "calibrate"):
            s = r.get(name, {})
            if "seconds" not in s:
                print(f"{r['rows']:>12,} | {name:<9} | {s.get('skipped', '-')}")
                continue
            procs = f"1 + {s['workers']} workers (<= {s['worker_peak_mb']:.0f} MB)" if s["workers"] else "1"
            print(
                f"{r['rows']:>12,} | {name:<9} | {s['seconds']:>8.1f} | {s['us_per_row']:>7.2f} | "
                f"{s['peak_mb']:>7.0f} | {procs}"
            )
    sized = {r["rows"]: r for r in results}
    for name in ("windows", "calibrate"):
        per_row = [(rows, sized[rows][name]["us_per_row"]) for rows in sorted(sized) if rows >= 1_000_000]
        if len(per_row) > 1:
            (first, a), (last, b) = per_row[0], per_row[-1]
            print(f"{name}: {a:.2f} µs per row at {first:,} rows, {b:.2f} at {last:,} rows (x{b / a:.2f})")
    over = [
        (r["rows"], name, r[name]["peak_mb"])
        for r in results
        for name in ("simulate", "windows", "train", "calibrate")
        if r.get(name, {}).get("peak_mb", 0) > LIMIT_MB
    ]
    print("every process under 2 GB" if not over else f"over 2 GB: {over}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--out", type=Path, default=REPO / "var" / "scale", help="working directory")
    parser.add_argument("--json", type=Path, default=None, help="results, merged by size (default OUT/scale.json)")
    parser.add_argument("--png", type=Path, default=None, help="figure (default OUT/scale.png)")
    parser.add_argument("--steps", type=int, default=300, help="the step budget of streaming training")
    parser.add_argument("--train-max-rows", type=int, default=1_000_000, help="in-memory training up to")
    parser.add_argument("--memory-limit", default="512MB", help="DuckDB's, in saco windows")
    parser.add_argument("--sample", type=int, default=20_000, help="users simulated by saco calibrate")
    parser.add_argument("--workers", type=int, default=2, help="saco calibrate's worker processes")
    parser.add_argument("--budget-fraction", type=float, default=0.5, help="of the logged policy's spend")
    parser.add_argument("--keep", action="store_true", help="keep each size's logs and shards")
    parser.add_argument("--train-revision", help="train with this git revision's `saco train` (e.g. a branch)")
    parser.add_argument("--report", action="store_true", help="only print and plot the results in --json")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.out / "scale.json"
    png_path = args.png or args.out / "scale.png"
    if args.report:
        results = json.loads(json_path.read_text())
        report(results)
        plot(results, png_path)
        return
    train_cwd = REPO if args.train_revision is None else revision_source(args.train_revision, args.out)
    state: dict[str, Any] = {"train_cwd": train_cwd, "streaming": streaming_train(SACO, train_cwd), "store": None}
    known = {r["rows"]: r for r in (json.loads(json_path.read_text()) if json_path.exists() else [])}
    # for a size not trained: the model an earlier run trained at the largest smaller size
    trained = [r for r in sorted(known) if "seconds" in known[r].get("train", {}) and r < min(args.rows)]
    if trained and (args.out / str(trained[-1]) / "store").exists():
        state["store"] = args.out / str(trained[-1]) / "store"
    training = "streaming `saco train --windows --max-steps`" if state["streaming"] else "in-memory `saco train`"
    if args.train_revision is not None:
        commit = subprocess.run(["git", "rev-parse", "--short", args.train_revision], cwd=REPO, capture_output=True)
        training += f" of {args.train_revision} ({commit.stdout.decode().strip()})"
    print(f"training: {training}", file=sys.stderr)
    for rows in sorted(args.rows):
        known[rows] = one_size(rows, args, state)
        known[rows]["training"] = training
        json_path.write_text(json.dumps([known[r] for r in sorted(known)], indent=1) + "\n")
        plot([known[r] for r in sorted(known)], png_path)
    results = [known[r] for r in sorted(known)]
    report(results)
    print(f"results: {json_path}; figure: {png_path}")


if __name__ == "__main__":
    main()
