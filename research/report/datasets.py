"""The report's four datasets: their training logs, the environment that scores them, and notes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from offline.env import LogEnvironment
from offline.logs import Logs, logs_table, validate_table
from offline.rollout import Environment
from research import hillstrom as hs
from research.report.config import ReportConfig
from research.simulate import simulate_logs
from research.world import SyntheticWorld, WorldConfig, behaviour_actions


@dataclass
class Dataset:
    name: str
    logs: Logs
    env: Environment
    eval_users: int | None
    eval_seed: int
    known_world: bool
    holdout: tuple[hs.HillstromData, np.ndarray] | None = None  # for the IPS check
    notes: dict[str, Any] = field(default_factory=dict)


def world_logs(world: SyntheticWorld, cfg: WorldConfig) -> Logs:
    """`simulate_logs` for any SyntheticWorld subclass (uniform random logging)."""
    episode = world.start()
    rng = np.random.default_rng(cfg.seed + 77)
    n = cfg.users
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "t", "action", "cost", "reward", "features")}
    for t in range(cfg.rounds):
        features = world.features(episode)
        actions, _ = behaviour_actions(rng, features, cfg.num_actions)
        response = world.step(episode, actions)
        for key, value in (
            ("user", np.arange(n)),
            ("t", np.full(n, t)),
            ("action", actions),
            ("cost", response.cost),
            ("reward", np.round(response.reward, 2)),
            ("features", features),
        ):
            parts[key].append(value)
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.lexsort((cat["t"], cat["user"]))
    return validate_table(
        logs_table(
            np.char.add("u", cat["user"][order].astype(str)),
            cat["t"][order],
            cat["action"][order],
            cat["cost"][order],
            cat["reward"][order],
            cat["features"][order],
        )
    )


def build_dataset(name: str, cfg: ReportConfig, seed: int, data: hs.HillstromData | None) -> Dataset:
    if name in ("seq-effects-on", "seq-effects-off"):
        wc = WorldConfig(users=cfg.users, rounds=cfg.rounds, seed=seed)
        wc = wc if name == "seq-effects-on" else wc.myopic()
        return Dataset(
            name, validate_table(simulate_logs(wc)), SyntheticWorld(wc), cfg.eval_users, cfg.eval_seed + seed, True
        )
    assert data is not None
    if name == "hillstrom":
        train_rows, test_rows = hs.split(data, cfg.hillstrom_rows, seed)
        train_logs, test_logs = hs.to_logs(data, train_rows), hs.to_logs(data, test_rows)
        fitted = LogEnvironment.fit(train_logs)
        env = LogEnvironment(test_logs, fitted.response, fitted.relative_face, 1, fitted.mean_positive_reward)
        return Dataset(
            name,
            train_logs,
            env,
            None,
            0,
            False,
            holdout=(data, test_rows),
            notes={"train_rows": len(train_rows), "heldout_rows": len(test_rows), "env_fit": fitted.fit_metrics},
        )
    if name == "hillstrom-world":
        wc = hs.hillstrom_world_config(cfg.users, cfg.rounds, seed)
        world = hs.fit_hillstrom_world(data.arm_means(), wc, n=min(20_000, max(2000, cfg.eval_users * 4)))
        return Dataset(
            name,
            world_logs(world, wc),
            world,
            cfg.eval_users,
            cfg.eval_seed + seed,
            True,
            notes={
                "marginals": hs.world_marginals(world),
                "base_shift": world.base_shift,
                "lifts": world.lift[1:].tolist(),
                "basket_scale": world.basket_scale,
            },
        )
    raise ValueError(f"unknown dataset {name!r}")
