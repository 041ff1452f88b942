"""Every baseline against the perfect-information myopic oracle at equal spend.

Trains each baseline on `simulate_logs(WorldConfig(users, rounds))` (uniform random logging), traces its
revenue/cost curve over a lambda grid on a fresh population of the same `SyntheticWorld`
(rollout n_users=5000, seed=123), and prints, at budgets given as fractions of the oracle's largest
spend, each method's revenue relative to the oracle's at the same spend (revenue-vs-cost curves are
linearly interpolated), the same for incremental revenue over giving no coupon at all, plus training
time and decision time per round.

    .venv/bin/python benchmarks/compare_baselines.py [--users 10000 --rounds 10 --eval-users 5000]

CMDP25/50/75 are trained at a fixed lambda0; their curves come from the separate calibration knob
(an advantage threshold, see research/baselines/cmdp.py) swept over the same grid.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from offline.logs import Logs, validate_table
from offline.rollout import Policy, RolloutResult, rollout
from research.baselines import (
    CMDP,
    DFCL,
    BudgetRegularizer,
    CausalForest,
    HiddenRepClustering,
    MyopicOracle,
    RandomAtSpend,
    ThompsonBandit,
    TwoStage,
)
from research.report import Timed
from research.simulate import simulate_logs
from research.world import SyntheticWorld, WorldConfig

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 14.0, 20.0, 30.0)
BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.45)  # fractions of the oracle's spend at lambda = 0


def methods(num_actions: int) -> dict[str, Callable[[Logs], Policy]]:
    return {
        "random": lambda logs: RandomAtSpend(num_actions),
        "two-stage": lambda logs: TwoStage.fit(logs),
        "forest": lambda logs: CausalForest.fit(logs),
        "bandit": lambda logs: ThompsonBandit.fit(logs),
        "cmdp25": lambda logs: CMDP.fit(logs, 0.25),
        "cmdp50": lambda logs: CMDP.fit(logs, 0.5),
        "cmdp75": lambda logs: CMDP.fit(logs, 0.75),
        "dfcl": lambda logs: DFCL.fit(logs),
        "regularizer": lambda logs: BudgetRegularizer.fit(logs),
        "hrc": lambda logs: HiddenRepClustering.fit(logs),
    }


def curve(results: list[RolloutResult]) -> tuple[np.ndarray, np.ndarray]:
    cost = np.array([r.cost for r in results])
    revenue = np.array([r.revenue for r in results])
    order = np.argsort(cost, kind="stable")
    return cost[order], revenue[order]


def at_spend(cost: np.ndarray, revenue: np.ndarray, budget: float) -> float:
    """Revenue at `budget` by linear interpolation; NaN outside the curve's range of spend."""
    if budget < cost.min() - 1e-9 or budget > cost.max() + 1e-9:
        return float("nan")
    return float(np.interp(budget, cost, revenue))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--eval-users", type=int, default=5000)
    parser.add_argument("--eval-seed", type=int, default=123)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = WorldConfig(users=args.users, rounds=args.rounds)
    logs = validate_table(simulate_logs(cfg))
    world = SyntheticWorld(cfg)
    n, seed = args.eval_users, args.eval_seed
    print(
        f"logs: {logs.n_rows} rows ({logs.n_users} users x {args.rounds} rounds); "
        f"evaluation: {n} fresh users (seed {seed}), {len(LAMBDAS)} lambdas"
    )

    oracle = [rollout(world, MyopicOracle(), lam, n, seed) for lam in LAMBDAS]
    o_cost, o_rev = curve(oracle)
    no_coupon = rollout(world, MyopicOracle(), 1e9, n, seed).revenue  # nobody gets a coupon
    budgets = [b * o_cost.max() for b in BUDGETS]
    oracle_at = [at_spend(o_cost, o_rev, b) for b in budgets]

    rows: dict[str, Any] = {}
    for name, fit in methods(cfg.num_actions).items():
        start = time.perf_counter()
        policy = fit(logs)
        train_s = time.perf_counter() - start
        timed = Timed(policy)
        results = [rollout(world, timed, lam, n, seed) for lam in LAMBDAS]
        cost, revenue = curve(results)
        spend = np.array([r.cost for r in results])  # in lambda order
        rise = float(np.max(np.diff(spend) / np.maximum(spend[:-1], 1e-9), initial=0.0))
        rev = [at_spend(cost, revenue, b) for b in budgets]
        rows[name] = {
            "train_s": train_s,
            "act_ms": 1000 * timed.seconds * n / max(timed.decisions, 1),  # one round of n users
            "ratio": [r / o for r, o in zip(rev, oracle_at, strict=True)],
            "incr": [(r - no_coupon) / (o - no_coupon) for r, o in zip(rev, oracle_at, strict=True)],
            "spend_range": (float(cost.min()), float(cost.max())),
            "max_rise": max(rise, 0.0),  # largest relative spend increase between consecutive lambdas
        }
        print(f"  {name:<12} trained in {train_s:6.1f}s", flush=True)

    head = " ".join(f"{int(b * 100):>5}%" for b in BUDGETS)
    print(
        "\nrevenue / myopic-oracle revenue at equal spend (budget = % of the oracle's max spend "
        f"{o_cost.max():,.0f}; oracle revenue there: {', '.join(f'{v:,.0f}' for v in oracle_at)}; "
        f"no-coupon revenue {no_coupon:,.0f})"
    )
    print(
        f"{'method':<12} {'train s':>8} {'act ms':>7} {'rise':>6} | {head} |  mean | incr. revenue / oracle's: {head}"
    )
    for name, row in rows.items():
        ratio = " ".join(f"{v:6.3f}" for v in row["ratio"])
        incr = " ".join(f"{v:6.3f}" for v in row["incr"])
        mean = np.nanmean(row["ratio"]) if np.isfinite(row["ratio"]).any() else float("nan")
        print(
            f"{name:<12} {row['train_s']:8.1f} {row['act_ms']:7.1f} {row['max_rise']:6.3f} | {ratio} | {mean:5.3f} |"
            f"                           {incr}"
        )
    print(
        "act ms = wall time of one act() call for all evaluation users (one round); rise = largest relative "
        "increase of spend from one lambda to the next (0 = spend never rises with lambda); NaN = budget "
        "outside the method's spend range over the lambda grid"
    )
    return rows


if __name__ == "__main__":
    main()
