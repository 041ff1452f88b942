"""`saco simulate`: logs of the synthetic world under a random (or biased) behaviour policy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from offline.logs import logs_table
from research.world import SyntheticWorld, WorldConfig, behaviour_actions


def simulate_logs(
    config: WorldConfig, behaviour_bias: float = 0.0, progress: Callable[[int], None] | None = None
) -> pa.Table:
    """Run `config.users` users for `config.rounds` rounds; one row per (user, round).

    Besides the contract columns the table carries `propensity` (the behaviour policy's probability of
    the logged action), useful for off-policy estimates and ignored by training.
    """
    world = SyntheticWorld(config)
    episode = world.start()
    rng = np.random.default_rng(config.seed + 77)
    n, rounds = config.users, config.rounds
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "t", "action", "cost", "reward", "features", "prop")}
    for t in range(rounds):
        features = world.features(episode)
        actions, propensity = behaviour_actions(rng, features, config.num_actions, behaviour_bias)
        response = world.step(episode, actions)
        cols["user"].append(np.arange(n))
        cols["t"].append(np.full(n, t))
        cols["action"].append(actions)
        cols["cost"].append(response.cost)
        cols["reward"].append(np.round(response.reward, 2))
        cols["features"].append(features)
        cols["prop"].append(propensity)
        if progress is not None:
            progress(1)
    user = np.concatenate(cols["user"])
    order = np.lexsort((np.concatenate(cols["t"]), user))
    user_ids = np.char.add("u", user.astype(str))
    return logs_table(
        user_ids[order],
        np.concatenate(cols["t"])[order],
        np.concatenate(cols["action"])[order],
        np.concatenate(cols["cost"])[order],
        np.concatenate(cols["reward"])[order],
        np.concatenate(cols["features"])[order],
        extra={"propensity": np.concatenate(cols["prop"])[order]},
    )
