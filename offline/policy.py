"""One policy interface for evaluation and calibration, and the rollout that scores a policy.

A policy sees, round by round, the users' current features (and, only if it asks for them, the
environment's exact expected responses: the perfect-information oracle). It returns one action per user
and afterwards observes the realised reward and cost. Lambda prices cost: a policy's spend must not
increase with lambda (calibration relies on it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch


class Environment(Protocol):
    """What a rollout needs of a world (the synthetic world, or one learned from logs)."""

    @property
    def num_actions(self) -> int: ...

    @property
    def rounds(self) -> int: ...

    def start(self, n: int | None = None, seed: int | None = None) -> Any: ...

    def features(self, episode: Any) -> np.ndarray: ...

    def expected_response(self, episode: Any) -> tuple[np.ndarray, np.ndarray]: ...

    def step(self, episode: Any, actions: np.ndarray) -> Any: ...


class Policy(ABC):
    name: str = "policy"
    needs_oracle: bool = False

    def begin(self, n_users: int) -> None:  # noqa: B027  (optional hook)
        """A new population of users starts."""

    @abstractmethod
    def act(
        self, features: np.ndarray, t: int, lam: float, expected: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """Actions [N] for the current round."""

    def observe(self, actions: np.ndarray, reward: np.ndarray, cost: np.ndarray) -> None:  # noqa: B027
        """Realised outcomes of the last `act`."""


@dataclass
class RolloutResult:
    lam: float
    revenue: float  # sum of exact expected revenue over users and rounds
    cost: float
    users: int
    action_counts: np.ndarray
    revenue_by_round: np.ndarray = field(repr=False)
    cost_by_round: np.ndarray = field(repr=False)

    @property
    def roi(self) -> float:
        return self.revenue / self.cost if self.cost > 0 else float("nan")


def rollout(env: Environment, policy: Policy, lam: float, n_users: int | None = None, seed: int = 0) -> RolloutResult:
    """Run every user through `policy` for all rounds; score with exact expected responses."""
    episode = env.start(n_users, seed)
    features = env.features(episode)
    n = features.shape[0]
    policy.begin(n)
    rev, cost = np.zeros(env.rounds), np.zeros(env.rounds)
    counts = np.zeros(env.num_actions, dtype=np.int64)
    for t in range(env.rounds):
        if t:
            features = env.features(episode)
        expected = env.expected_response(episode) if policy.needs_oracle else None
        actions = np.asarray(policy.act(features, t, lam, expected), dtype=np.int64)
        response = env.step(episode, actions)
        policy.observe(actions, response.reward, response.cost)
        rev[t], cost[t] = response.expected_reward.sum(), response.expected_cost.sum()
        counts += np.bincount(actions, minlength=env.num_actions)
    return RolloutResult(lam, float(rev.sum()), float(cost.sum()), n, counts, rev, cost)


class SequencePolicy(Policy):
    """Runs a SACO policy module (eager `PolicyModule` or the exported TorchScript) over user contexts,
    exactly as the service does: right-aligned context of the last L steps, to-go values that start at
    the manifest targets and drop by every observed outcome."""

    def __init__(
        self,
        module: torch.nn.Module,
        context_length: int,
        initial_rtg: float,
        initial_ctg: float,
        feature_dim: int,
        name: str = "saco",
        batch_size: int = 4096,
        rtg_for_lambda: Any = None,
    ) -> None:
        self.module = module
        self.name = name
        self.L = context_length
        self.initial_rtg = initial_rtg
        self.initial_ctg = initial_ctg
        self.d = feature_dim
        self.batch_size = batch_size
        self.rtg_for_lambda = rtg_for_lambda  # optional lam -> initial RTG (dt-lagrangian ablation)

    def begin(self, n_users: int) -> None:
        L = self.L
        self.states = np.zeros((n_users, L, self.d), dtype=np.float32)
        self.actions = np.zeros((n_users, L), dtype=np.int64)
        self.rtg = np.zeros((n_users, L), dtype=np.float32)
        self.ctg = np.zeros((n_users, L), dtype=np.float32)
        self.timesteps = np.zeros((n_users, L), dtype=np.int64)
        self.mask = np.zeros((n_users, L), dtype=bool)
        self.rtg_now: np.ndarray | None = None
        self.ctg_now = np.full(n_users, self.initial_ctg, dtype=np.float64)
        self.step_index = 0

    def act(
        self, features: np.ndarray, t: int, lam: float, expected: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        n = features.shape[0]
        if self.rtg_now is None:
            start = self.rtg_for_lambda(lam) if self.rtg_for_lambda is not None else self.initial_rtg
            self.rtg_now = np.full(n, start, dtype=np.float64)
        # shift the context one step left and write the current step at the last position
        for arr in (self.states, self.actions, self.rtg, self.ctg, self.timesteps, self.mask):
            arr[:, :-1] = arr[:, 1:]
        self.states[:, -1] = features
        self.actions[:, -1] = 0
        self.rtg[:, -1] = self.rtg_now
        self.ctg[:, -1] = self.ctg_now
        self.timesteps[:, -1] = self.step_index
        self.mask[:, -1] = True
        lam_t = torch.full((n,), float(lam), dtype=torch.float32)
        out = np.empty(n, dtype=np.int64)
        with torch.inference_mode():
            for i in range(0, n, self.batch_size):
                sl = slice(i, i + self.batch_size)
                scores = self.module(
                    torch.from_numpy(self.states[sl]),
                    torch.from_numpy(self.actions[sl]),
                    torch.from_numpy(self.rtg[sl]),
                    torch.from_numpy(self.ctg[sl]),
                    torch.from_numpy(self.timesteps[sl]),
                    lam_t[sl],
                    torch.from_numpy(self.mask[sl]),
                )
                out[sl] = scores.argmax(dim=1).numpy()
        return out

    def observe(self, actions: np.ndarray, reward: np.ndarray, cost: np.ndarray) -> None:
        self.actions[:, -1] = actions
        assert self.rtg_now is not None
        self.rtg_now = self.rtg_now - reward
        self.ctg_now = self.ctg_now - cost
        self.step_index += 1
