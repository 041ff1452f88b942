"""What the gate can resolve at a given traffic: the standard error of its paired difference at equal spend.

On the sequential world (research/world.py) an incumbent serves users with exploration: its own choice with
probability 1 - epsilon, else a uniformly random action (as a campaign's `exploration_rate` does), at lambda
`--lam`. The incumbent is the myopic oracle on mis-estimated responses (each decision's expected reward off by a
log-normal factor of sd `--misestimate`); the candidate is the exact myopic oracle. The gate's estimator
(`loop.gate.compare_at_equal_spend`) then compares them on the logged decisions, the candidate at the lambda
of the incumbent's estimated spend, with three direct models: none (self-normalised IPS), the environment
learned from a separate training population served the same way (`offline.env.LogEnvironment`, what `saco
retrain` fits), and the world's exact expectations (the best any direct model can do). Per row: held-out
decisions, exploration, the candidate's effective sample size (Kish), the estimated difference against the
true one (exact expectations at the lambda found), its standard error and the smallest difference the gate
resolves (2 standard errors), as a share of the incumbent's revenue per decision.

    .venv/bin/python benchmarks/gate_resolution.py                     # ~1 min on 2 cores
    .venv/bin/python benchmarks/gate_resolution.py --json var/gate_resolution.json

The table goes to stdout; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from loop.gate import GateConfig, LoggedDecisions, compare_at_equal_spend, direct_model  # noqa: E402
from offline.env import LogEnvironment  # noqa: E402
from offline.logs import Logs, logs_table, validate_table  # noqa: E402
from research.world import SyntheticWorld, WorldConfig  # noqa: E402


@dataclass
class Served:
    """Decisions of a served population, sorted by (user, t), with each decision's exact expectations and the
    incumbent's mis-estimation factor."""

    logs: Logs
    probability: np.ndarray
    expected_reward: np.ndarray  # [N, K]
    expected_cost: np.ndarray
    misestimate: np.ndarray  # [N]


def serve(world: SyntheticWorld, users: int, rounds: int, epsilon: float, lam: float, sd: float, seed: int) -> Served:
    rng = np.random.default_rng(seed)
    episode = world.start(users, seed=seed)
    k = world.num_actions
    cols: dict[str, list[np.ndarray]] = {n: [] for n in ("t", "a", "p", "r", "c", "x", "er", "ec", "m")}
    for t in range(rounds):
        features = world.features(episode)
        er, ec = world.expected_response(episode)
        m = np.exp(rng.normal(0.0, sd, size=users))
        greedy = np.argmax(er * m[:, None] - lam * ec, axis=1)
        explore = rng.random(users) < epsilon
        action = np.where(explore, rng.integers(0, k, size=users), greedy)
        probability = np.where(action == greedy, 1 - epsilon + epsilon / k, epsilon / k)
        response = world.step(episode, action)
        values = (np.full(users, t), action, probability, response.reward, response.cost, features, er, ec, m)
        for name, value in zip(cols, values, strict=True):
            cols[name].append(value)
    user = np.tile(np.arange(users), rounds)
    order = np.lexsort((np.concatenate(cols["t"]), user))
    col = {name: np.concatenate(v)[order] for name, v in cols.items()}
    table = logs_table(
        np.char.add("u", user[order].astype(str)), col["t"], col["a"], col["c"], np.round(col["r"], 2), col["x"]
    )
    return Served(validate_table(table), col["p"], col["er"], col["ec"], col["m"])


def compare(served: Served, lam: float, dm: tuple[np.ndarray, np.ndarray] | None) -> dict[str, float]:
    logs = served.logs
    decisions = LoggedDecisions(
        action=logs.action,
        probability=served.probability,
        reward=logs.reward,
        cost=logs.cost,
        lam=np.full(logs.n_rows, lam),
        expected_reward=None if dm is None else dm[0],
        expected_cost=None if dm is None else dm[1],
    )
    er, ec, m = served.expected_reward, served.expected_cost, served.misestimate

    def candidate(at: np.ndarray) -> np.ndarray:
        return np.argmax(er - at[:, None] * ec, axis=1)

    def incumbent(at: np.ndarray) -> np.ndarray:
        return np.argmax(er * m[:, None] - at[:, None] * ec, axis=1)

    c = compare_at_equal_spend(decisions, candidate, incumbent, GateConfig(spend_low=0.995))
    rows = np.arange(logs.n_rows)
    true_inc = float(er[rows, incumbent(decisions.lam)].mean())
    true_cand = float(er[rows, candidate(np.full(logs.n_rows, c.candidate.lam))].mean())
    revenue = c.incumbent.revenue
    return {
        "ess": c.candidate.estimate.ess,
        "matches": c.candidate.estimate.matches,
        "agreement": float(np.mean(c.candidate.estimate.actions == c.incumbent.actions)),
        "difference": c.difference.revenue_difference,
        "true_difference": true_cand - true_inc,
        "stderr": c.difference.stderr,
        "resolves": c.difference.smallest_resolved,
        "resolves_share": c.difference.smallest_resolved / revenue,
        "revenue": revenue,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--exploration", type=float, nargs="+", default=[0.1, 0.2, 0.5])
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--misestimate", type=float, default=1.0)
    parser.add_argument("--train-users", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.time()
    world = SyntheticWorld(WorldConfig(seed=args.seed))
    rows: list[dict[str, Any]] = []
    print("| held-out decisions | exploration | direct model | ESS | difference (true) | stderr | 2 stderr / revenue |")
    print("|---|---|---|---|---|---|---|")
    for epsilon in args.exploration:
        train = serve(world, args.train_users, args.rounds, epsilon, args.lam, args.misestimate, args.seed + 1)
        env = LogEnvironment.fit(train.logs, seed=args.seed, num_actions=world.num_actions)
        for i, users in enumerate(args.users):
            served = serve(world, users, args.rounds, epsilon, args.lam, args.misestimate, args.seed + 100 + i)
            models: dict[str, tuple[np.ndarray, np.ndarray] | None] = {
                "none (IPS)": None,
                "learned environment": direct_model(env, served.logs),
                "exact": (served.expected_reward, served.expected_cost),
            }
            for name, dm in models.items():
                r = {"decisions": served.logs.n_rows, "exploration": epsilon, "direct_model": name}
                r |= compare(served, args.lam, dm)
                rows.append(r)
                print(
                    f"| {r['decisions']:,} | {epsilon:g} | {name} | {r['ess']:.0f} | {r['difference']:+.3f} "
                    f"({r['true_difference']:+.3f}) | {r['stderr']:.3f} | {r['resolves_share']:.1%} |",
                    flush=True,
                )
    print(json.dumps({"rows": rows, "seconds": round(time.time() - started, 1), "args": vars(args)}, default=str))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
