"""One policy interface for evaluation and calibration, and the rollout that scores a policy.

A policy sees, round by round, the users' current features (and, only if it asks for them, the
environment's exact expected responses: the perfect-information oracle). It returns one action per user
and afterwards observes the realised (sampled) reward and cost. Lambda prices cost: a policy's spend
must not increase with lambda (calibration relies on it).

A rollout can run behind the service's `strict` budget ledger (`StrictReservation`): every round the
users arrive in requests, each request's coupons are granted as `contract/ranking.py` `first_fit`
grants them (the reference service/lua/reserve.lua is tested against), and each coupon holds its face value until its
outcome settles at the end of the round. That is what a served policy spends, where a rollout without
it is what the policy would spend with no budget at all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from contract.inputs import History, ModelInputs, history_inputs
from contract.money import rounded_cents
from contract.ranking import first_fit
from model_store import Artifact, load_scripted


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

    def scores(
        self, features: np.ndarray, t: int, lam: float, expected: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """Scores [N, K] for the current round, higher preferred (what the service ranks coupons by); in
        place of `act`, never both in one round. Without scores of its own a policy prefers its action,
        then no coupon."""
        actions = np.asarray(self.act(features, t, lam, expected), dtype=np.int64)
        k = max(int(actions.max(initial=0)) + 1, 1 if expected is None else expected[0].shape[1])
        out = np.zeros((len(actions), k))
        out[np.arange(len(actions)), actions] = 1.0
        return out

    def observe(self, actions: np.ndarray, reward: np.ndarray, cost: np.ndarray) -> None:  # noqa: B027
        """Realised outcomes of the last `act`."""


@dataclass(frozen=True)
class StrictReservation:
    """The service's `strict` ledger in a rollout. `prices[a]` is coupon a's face value (what it reserves;
    `prices[0]` is ignored); only actions with a price are offered. Each round the users arrive in random
    order (drawn from `seed` and the round alone: the same for every lambda) in requests of
    `request_size`; outcomes settle at the end of the round."""

    budget: float
    prices: Sequence[float]
    request_size: int = 128
    seed: int = 0


class _Ledger:
    """Spent and reserved money of one simulated campaign (cents), round by round."""

    def __init__(self, reservation: StrictReservation, num_actions: int) -> None:
        self.reservation = reservation
        self.prices = np.full(num_actions, -1, dtype=np.int64)
        given = rounded_cents(np.asarray(reservation.prices, dtype=np.float64)[:num_actions])
        self.prices[: len(given)] = given
        self.prices[0] = 0
        self.budget = int(rounded_cents(reservation.budget))
        self.spent = 0
        self.refused = 0

    def decide(self, scores: np.ndarray, t: int) -> np.ndarray:
        n = len(scores)
        arrival = np.random.default_rng([self.reservation.seed, t]).permutation(n)
        actions = np.zeros(n, dtype=np.int64)
        available = self.budget - self.spent  # nothing is reserved between rounds
        size = max(1, self.reservation.request_size)
        for i in range(0, n, size):
            rows = arrival[i : i + size]
            granted, refused = first_fit(scores[rows], self.prices, available)
            actions[rows] = granted
            available -= int(self.prices[granted].sum())
            self.refused += int(refused.sum())
        return actions

    def settle(self, actions: np.ndarray, cost: np.ndarray) -> None:
        """Outcomes replace the reservations: a settled cost never exceeds what its coupon reserved."""
        self.spent += int(np.minimum(rounded_cents(cost), self.prices[actions]).sum())


@dataclass
class RolloutResult:
    lam: float
    revenue: float  # sum of exact expected revenue over users and rounds
    cost: float
    users: int
    action_counts: np.ndarray
    revenue_by_round: np.ndarray = field(repr=False)
    cost_by_round: np.ndarray = field(repr=False)
    sampled_revenue: float = 0.0  # sum of the sampled outcomes the policy observed
    sampled_cost: float = 0.0
    refused: int = 0  # decisions whose preferred coupon the ledger refused
    revenue_by_user: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # [users] over rounds
    cost_by_user: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def roi(self) -> float:
        return self.revenue / self.cost if self.cost > 0 else float("nan")


def rollout(
    env: Environment,
    policy: Policy,
    lam: float,
    n_users: int | None = None,
    seed: int = 0,
    reservation: StrictReservation | None = None,
) -> RolloutResult:
    """Run every user through `policy` for all rounds, behind `reservation`'s ledger if given; the policy
    observes sampled outcomes; revenue and cost are totalled on exact expected responses."""
    episode = env.start(n_users, seed)
    features = env.features(episode)
    n = features.shape[0]
    policy.begin(n)
    ledger = _Ledger(reservation, env.num_actions) if reservation is not None else None
    rev, cost = np.zeros(env.rounds), np.zeros(env.rounds)
    rev_user, cost_user = np.zeros(n), np.zeros(n)
    sampled = np.zeros(2)
    counts = np.zeros(env.num_actions, dtype=np.int64)
    for t in range(env.rounds):
        if t:
            features = env.features(episode)
        expected = env.expected_response(episode) if policy.needs_oracle else None
        if ledger is None:
            actions = np.asarray(policy.act(features, t, lam, expected), dtype=np.int64)
        else:
            actions = ledger.decide(np.asarray(policy.scores(features, t, lam, expected)), t)
        response = env.step(episode, actions)
        policy.observe(actions, response.reward, response.cost)
        if ledger is not None:
            ledger.settle(actions, response.cost)
        rev[t], cost[t] = response.expected_reward.sum(), response.expected_cost.sum()
        rev_user += response.expected_reward
        cost_user += response.expected_cost
        sampled += response.reward.sum(), response.cost.sum()
        counts += np.bincount(actions, minlength=env.num_actions)
    refused = ledger.refused if ledger is not None else 0
    return RolloutResult(
        lam,
        float(rev.sum()),
        float(cost.sum()),
        n,
        counts,
        rev,
        cost,
        float(sampled[0]),
        float(sampled[1]),
        refused,
        rev_user,
        cost_user,
    )


class SequencePolicy(Policy):
    """Runs a SACO policy module (eager `PolicyModule` or the exported TorchScript) over user contexts,
    exactly as the service does: each user's last L steps through the history rule (contract/inputs.py),
    the to-go values starting at the manifest targets and dropping by every observed outcome (in cents).
    `max_timestep` clips the step index as the manifest says (None: the module's own clamp does)."""

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
        offered: np.ndarray | None = None,
        max_timestep: int | None = None,
        action_table: np.ndarray | None = None,
    ) -> None:
        self.module = module
        # [T, F]: the actions to score, by their features (a module with `catalog_scores`); None: the module's own
        self.action_table = None if action_table is None else torch.from_numpy(np.asarray(action_table, np.float32))
        # [K] bool: the actions `act` may choose (as the service offers only a campaign's coupons); None: every one
        self.offered = offered
        self.name = name
        self.L = context_length
        self.initial_rtg = initial_rtg
        self.initial_ctg = initial_ctg
        self.d = feature_dim
        self.batch_size = batch_size
        self.rtg_for_lambda = rtg_for_lambda  # optional lam -> initial RTG (dt-lagrangian ablation)
        self.max_timestep = max_timestep if max_timestep is not None else np.iinfo(np.int64).max

    @classmethod
    def of_artifact(
        cls,
        artifact: Artifact,
        module: torch.nn.Module | None = None,
        offered: np.ndarray | None = None,
        action_table: np.ndarray | None = None,
    ) -> SequencePolicy:
        """A published model as a policy: its manifest's context length, to-go targets and feature count;
        `module` its loaded TorchScript (default: loaded here)."""
        m = artifact.manifest
        return cls(
            load_scripted(artifact.model_path) if module is None else module,
            m.context_length,
            m.initial_rtg,
            m.initial_ctg,
            m.feature_dim,
            offered=offered,
            action_table=action_table,
        )

    def begin(self, n_users: int) -> None:
        L = self.L
        zeros = np.zeros((n_users, L), dtype=np.int64)
        self.history = History(
            np.zeros((n_users, L, self.d), dtype=np.float32),
            zeros.copy(),
            zeros.copy(),
            zeros.copy(),
            zeros.copy(),
            np.zeros((n_users, L), dtype=bool),
            np.zeros(n_users, dtype=np.int64),
            np.zeros(n_users, dtype=np.int64),
        )
        self.rtg_start: float | None = None
        self.step_index = 0
        self.inputs: ModelInputs | None = None

    def act(
        self, features: np.ndarray, t: int, lam: float, expected: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        scores = self.scores(features, t, lam, expected)
        if self.offered is not None:
            scores = np.where(self.offered[: scores.shape[1]], scores, -np.inf)
        return np.asarray(scores.argmax(axis=1), dtype=np.int64)

    def scores(
        self, features: np.ndarray, t: int, lam: float, expected: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        n = features.shape[0]
        if self.rtg_start is None:
            self.rtg_start = self.rtg_for_lambda(lam) if self.rtg_for_lambda is not None else self.initial_rtg
        h = self.history
        # shift the context one step left and write the current step at the last position
        for arr in (h.states, h.actions, h.reward, h.cost, h.timesteps, h.mask):
            arr[:, :-1] = arr[:, 1:]
        h.states[:, -1] = features
        h.actions[:, -1] = h.reward[:, -1] = h.cost[:, -1] = 0
        h.timesteps[:, -1] = self.step_index
        h.mask[:, -1] = True
        lams = np.full(n, lam, dtype=np.float32)
        self.inputs = history_inputs(h, lams, self.rtg_start, self.initial_ctg, self.max_timestep)
        if self.action_table is not None:
            catalog_scores: Any = self.module.catalog_scores
            return self._run(lambda part: catalog_scores(*part, self.action_table))
        return self._run(lambda part: self.module(*part))

    def _run(self, forward: Any, lam: float | None = None) -> np.ndarray:
        """`forward` over the current inputs (at `lam` if given) in parts of `batch_size` users."""
        inputs = self.inputs
        assert inputs is not None
        if lam is not None:
            inputs = replace(inputs, lam=np.full(inputs.rows, lam, dtype=np.float32))
        parts = []
        with torch.inference_mode():
            for i in range(0, inputs.rows, self.batch_size):
                arrays = inputs.sliced(slice(i, i + self.batch_size)).arrays()
                parts.append(forward([torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]))
        return torch.cat(parts).numpy()

    def expected_costs_now(self, lam: float) -> np.ndarray:
        """[n, K]: each coupon's expected cost now (the exported module's `score_terms`, last K columns) at
        the current step; call after `scores` of that step."""
        if self.action_table is not None:
            catalog_terms: Any = self.module.catalog_terms
            terms = self._run(lambda part: catalog_terms(*part, self.action_table), lam)
        else:
            score_terms: Any = self.module.score_terms
            terms = self._run(lambda part: score_terms(*part), lam)
        return terms[:, 2 * terms.shape[1] // 3 :]

    def observe(self, actions: np.ndarray, reward: np.ndarray, cost: np.ndarray) -> None:
        h = self.history
        h.actions[:, -1] = actions
        reward_cents, cost_cents = rounded_cents(reward), rounded_cents(cost)
        h.reward[:, -1], h.cost[:, -1] = reward_cents, cost_cents
        h.reward_before_last[:] += reward_cents
        h.cost_before_last[:] += cost_cents
        self.step_index += 1
