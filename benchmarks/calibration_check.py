"""Does `saco calibrate` predict what the served policy spends?

On the sequential synthetic world: random logs of N users x T rounds, the SACO model trained and
exported as `saco train` does, then `saco calibrate` (strict ledger, the service's default) run twice to a
budget of half the random policy's spend. The exported TorchScript policy is then run as the service
runs it, in-process: per-round decisions, each user's history built from the sampled outcomes of the
true world, the `strict` ledger with users arriving in random order in 128-user requests, outcomes
settled at the end of each round, pacing off, on fresh users of the same world. Prints the predicted
spend against the realised spend (what the ledger records: redeemed coupons' face values), their ratio,
and lambda of the two calibration runs; the last line is JSON.

    .venv/bin/python benchmarks/calibration_check.py                       # 4,000 x 8, trains a model
    .venv/bin/python benchmarks/calibration_check.py --store S --logs L    # an existing store and logs
    .venv/bin/python benchmarks/calibration_check.py --lambdas 1 2 2.6     # also serve at other lambdas
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from model_store import ModelStore
from offline.calibrate import calibrate_artifact
from offline.export import export_and_publish
from offline.logs import load_logs, validate_table, write_logs
from offline.rollout import RolloutResult, SequencePolicy, StrictReservation, rollout
from offline.train import TrainConfig, train
from research.simulate import simulate_logs
from research.world import SyntheticWorld, WorldConfig


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=4000, help="users in the logs and in each served population")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="world, logs, training and calibration seed")
    ap.add_argument("--budget-fraction", type=float, default=0.5, help="budget / the random policy's spend")
    ap.add_argument("--populations", type=int, default=3, help="fresh populations served")
    ap.add_argument("--store", type=Path, help="an existing model store (with --logs of the same world)")
    ap.add_argument("--logs", type=Path)
    ap.add_argument("--lambdas", type=float, nargs="*", default=[], help="also serve at these lambdas")
    args = ap.parse_args()
    world_cfg = WorldConfig(users=args.users, rounds=args.rounds, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.store is None:
            started = time.time()
            table = simulate_logs(world_cfg)
            logs_path = write_logs(table, Path(tmp) / "logs.parquet")
            say(f"simulated {table.num_rows} rows; training...")
            store = ModelStore(Path(tmp) / "store")
            data = validate_table(table)
            export_and_publish(train(data, TrainConfig(seed=args.seed), progress=False), data, store)
            say(f"trained and exported in {time.time() - started:.0f}s")
        else:
            if args.logs is None:
                ap.error("--store needs --logs")
            store, logs_path = ModelStore(args.store), args.logs
        result = check(store, logs_path, world_cfg, args.budget_fraction, args.populations, args.lambdas)
        print(json.dumps(result))


def serve(
    policy: SequencePolicy, world_cfg: WorldConfig, lam: float, budget: float, populations: int
) -> list[RolloutResult]:
    """The policy behind the strict ledger on fresh populations (never the logs' users, seed world_cfg.seed)."""
    world = SyntheticWorld(world_cfg)
    out = []
    for k in range(populations):
        fresh = 1_000_003 + k
        ledger = StrictReservation(budget, world_cfg.coupon_values, request_size=128, seed=fresh)
        out.append(rollout(world, policy, lam, n_users=world_cfg.users, seed=fresh, reservation=ledger))
    return out


def check(
    store: ModelStore,
    logs_path: Path,
    world_cfg: WorldConfig,
    budget_fraction: float,
    populations: int,
    lambdas: list[float],
) -> dict[str, Any]:
    data = load_logs(logs_path)
    budget = budget_fraction * float(data.cost.sum())
    runs = []
    for run in (1, 2):
        started = time.time()
        runs.append(calibrate_artifact(store, data, budget, seed=world_cfg.seed))
        say(f"calibration run {run}: lambda {runs[-1]['lambda']!r} in {time.time() - started:.0f}s")
    lam, predicted = runs[0]["lambda"], runs[0]["cost"]
    artifact = store.load(runs[0]["version"])
    policy = SequencePolicy.of_artifact(artifact)
    served = serve(policy, world_cfg, lam, budget, populations)
    realised = [r.sampled_cost for r in served]
    mean_realised = sum(realised) / len(realised)
    print(f"budget                     {budget:12,.2f}  (half the random policy's spend: {budget_fraction:g})")
    print(f"lambda, two runs           {runs[0]['lambda']!r}, {runs[1]['lambda']!r}")
    print(f"lambda without a ledger    {runs[0]['lambda_without_ledger']!r}")
    print(f"predicted spend            {predicted:12,.2f}  (BARate {predicted / budget:.3f})")
    for k, r in enumerate(served):
        print(
            f"served population {k}        {r.sampled_cost:12,.2f}  (expected {r.cost:,.2f}; "
            f"{r.refused} of {r.users * world_cfg.rounds} decisions refused their coupon)"
        )
    print(f"predicted / realised       {predicted / mean_realised:12.4f}")
    others = {}
    for other in lambdas:
        runs_at = serve(policy, world_cfg, other, budget, populations)
        spend = sum(r.sampled_cost for r in runs_at) / len(runs_at)
        revenue = sum(r.revenue for r in runs_at) / len(runs_at)
        refused = sum(r.refused for r in runs_at) / len(runs_at)
        others[other] = {"spend": spend, "revenue": revenue, "refused": refused}
        print(
            f"served at lambda {other:<9g} spend {spend / budget:.3f} x B, "
            f"revenue {revenue:,.0f}, refused {refused:,.0f}"
        )
    mean_revenue = sum(r.revenue for r in served) / len(served)
    print(
        f"served at lambda {lam:<9.4g} spend {mean_realised / budget:.3f} x B, revenue {mean_revenue:,.0f} (calibrated)"
    )
    return {
        "budget": budget,
        "lambda_runs": [r["lambda"] for r in runs],
        "lambda_without_ledger": runs[0]["lambda_without_ledger"],
        "predicted_spend": predicted,
        "realised_spend": realised,
        "realised_expected_spend": [r.cost for r in served],
        "refused": [r.refused for r in served],
        "ratio": predicted / mean_realised,
        "predicted_revenue": runs[0]["revenue"],
        "realised_revenue": [r.revenue for r in served],
        "other_lambdas": others,
    }


if __name__ == "__main__":
    main()
