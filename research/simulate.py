"""`saco simulate`: logs of the synthetic world under a random (or biased) behaviour policy.

A population of more than `BLOCK_USERS` users is simulated a block of users at a time (`simulate_blocks`), so
memory is bounded by a block whatever the number of users: the world (its weights) is the same for every
block, each block's users and draws come from (seed, block). Up to `BLOCK_USERS` users it is one block, the
population `simulate_logs` draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from offline.logs import logs_table
from research.world import SyntheticWorld, WorldConfig, behaviour_actions

BLOCK_USERS = 100_000


def simulate_logs(
    config: WorldConfig, behaviour_bias: float = 0.0, progress: Callable[[int], None] | None = None
) -> pa.Table:
    """Run `config.users` users for `config.rounds` rounds; one row per (user, round).

    Besides the contract columns the table carries `propensity` (the behaviour policy's probability of
    the logged action), useful for off-policy estimates and ignored by training.
    """
    world = SyntheticWorld(config)
    return _simulate(
        world, config.users, config.seed, np.random.default_rng(config.seed + 77), 0, behaviour_bias, progress
    )


def blocks(config: WorldConfig) -> int:
    """How many blocks `simulate_blocks` runs."""
    return -(-config.users // BLOCK_USERS)


def simulate_blocks(
    config: WorldConfig, behaviour_bias: float = 0.0, progress: Callable[[int], None] | None = None
) -> Iterator[pa.Table]:
    """The logs of `config.users` users, a block of at most `BLOCK_USERS` users (ordered by user, then
    round) at a time; `progress` is told of every round of every block."""
    if config.users <= BLOCK_USERS:
        yield simulate_logs(config, behaviour_bias, progress)
        return
    world = SyntheticWorld(config)
    for block, first_user in enumerate(range(0, config.users, BLOCK_USERS)):
        n = min(BLOCK_USERS, config.users - first_user)
        seed = int(np.random.SeedSequence([config.seed, block]).generate_state(1)[0])
        rng = np.random.default_rng([config.seed + 77, block])
        yield _simulate(world, n, seed, rng, first_user, behaviour_bias, progress)


def _simulate(
    world: SyntheticWorld,
    n: int,
    seed: int,
    rng: np.random.Generator,
    first_user: int,
    behaviour_bias: float,
    progress: Callable[[int], None] | None,
) -> pa.Table:
    """Users first_user .. first_user + n - 1 (drawn from `seed`, behaviour from `rng`) for every round."""
    config = world.config
    episode = world.start(n, seed)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "t", "action", "cost", "reward", "features", "prop")}
    for t in range(config.rounds):
        features = world.features(episode)
        actions, propensity = behaviour_actions(rng, features, config.num_actions, behaviour_bias)
        response = world.step(episode, actions)
        cols["user"].append(np.arange(first_user, first_user + n))
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
