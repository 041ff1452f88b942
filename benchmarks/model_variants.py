"""Compare SACO model variants with the two-stage baseline and the myopic oracle at equal spend.

Trains one variant on 10,000 x 10 random logs of the synthetic world, traces revenue and spend over a
lambda grid on 5,000 fresh users, and prints revenue relative to the oracle and to the two-stage model
at 6 spend levels (interpolated on each policy's revenue-vs-spend curve).

    .venv/bin/python benchmarks/model_variants.py '{"epochs": 40}'                       # the default
    .venv/bin/python benchmarks/model_variants.py '{"history_decays": []}' --future-weights 0 0.3
    .venv/bin/python benchmarks/model_variants.py '{"later_loss_weight": 0}' --no-effects
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from offline.logs import validate_table
from offline.rollout import Policy, rollout
from offline.train import TrainConfig, train
from research.baselines import MyopicOracle, TwoStage
from research.evaluate import saco_policy
from research.simulate import simulate_logs
from research.world import SyntheticWorld, WorldConfig

LAMBDAS = [0.0, 0.3, 0.6, 1.0, 1.5, 2.0, 3.0, 5.0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("train_config", nargs="?", default="{}", help="JSON of TrainConfig fields")
    ap.add_argument("--future-weights", type=float, nargs="*", default=None)
    ap.add_argument("--no-effects", action="store_true")
    args = ap.parse_args()
    world_cfg = WorldConfig(users=10_000, rounds=10, seed=0)
    if args.no_effects:
        world_cfg = world_cfg.myopic()
    logs = validate_table(simulate_logs(world_cfg))
    started = time.time()
    result = train(logs, TrainConfig(**json.loads(args.train_config)), progress=False)
    print(f"trained in {time.time() - started:.0f}s: {result.metrics}", flush=True)
    world = SyntheticWorld(world_cfg)

    def curve(policy: Policy) -> tuple[np.ndarray, np.ndarray]:
        runs = [rollout(world, policy, lam, n_users=5000, seed=123) for lam in LAMBDAS]
        return np.array([r.cost for r in runs]), np.array([r.revenue for r in runs])

    def at(cost: np.ndarray, revenue: np.ndarray, x: np.ndarray) -> np.ndarray:
        order = np.argsort(cost)
        return np.interp(x, cost[order], revenue[order])

    oracle, two_stage = curve(MyopicOracle()), curve(TwoStage.fit(logs))
    for fw in args.future_weights if args.future_weights is not None else [result.model.future_weight]:
        result.model.future_weight = fw
        saco = curve(saco_policy(result, logs.feature_dim))
        grid = np.linspace(
            max(c.min() for c, _ in (saco, oracle, two_stage)), min(c.max() for c, _ in (saco, oracle, two_stage)), 6
        )
        print(f"future_weight={fw}: spend over lambda {saco[0].astype(int).tolist()}")
        print("  SACO / oracle   ", np.round(at(*saco, grid) / at(*oracle, grid), 4).tolist())
        print("  SACO / two-stage", np.round(at(*saco, grid) / at(*two_stage, grid), 4).tolist())
    print("two-stage / oracle", np.round(at(*two_stage, grid) / at(*oracle, grid), 4).tolist())


if __name__ == "__main__":
    main()
