"""Logs -> per-user trajectories of (state, action, reward, cost, RTG, CTG, t) and training windows.

RTG_t = sum_{t' >= t} r_t' and CTG_t = sum_{t' >= t} c_t' (gamma = 1), computed per user over the
logged steps in `t` order. What the model is conditioned on depends on the objective:

- "value" (default): the inputs are contract/inputs.py's history rule, the one the service and the
  calibration rollouts call: to-go inputs are *targets minus what has happened so far*
  (RTG_in_t = initial_rtg - sum_{t' < t} r_t', in cents), so nothing the model sees in training is
  unavailable when it decides, and a served user's inputs equal the window of the same logged steps. The
  value heads are fitted to the realised revenue/cost now (r_t, c_t) and later (RTG_t - r_t, CTG_t - c_t).
- "dt-literal" (the paper): hindsight RTG_t / CTG_t as inputs, lambda drawn uniformly and independently
  of the trajectory (so it carries no information), cross-entropy on the logged action.
- "dt-lagrangian": like dt-literal, but the return input is the Lagrangian return-to-go
  sum (r - lambda c) under the drawn lambda, so lambda changes what the model is asked to achieve.
  Both build their hindsight inputs through the same input type (contract/inputs.py `assemble`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from contract.inputs import NAMES, History, ModelInputs, assemble, history_inputs
from contract.money import rounded_cents
from offline.logs import Logs

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Trajectories:
    logs: Logs
    position: np.ndarray  # [n] 0-based step index within the user's trajectory
    rtg: np.ndarray  # [n] return-to-go including this step
    ctg: np.ndarray  # [n] cost-to-go including this step
    reward_cents: np.ndarray  # [n] i64: the step's reward in cents (rounded half up, as the service logs it)
    cost_cents: np.ndarray  # [n] i64
    reward_before: np.ndarray  # [n] i64: cents of the user's rewards before this step
    cost_before: np.ndarray  # [n] i64
    context_length: int

    @property
    def n_rows(self) -> int:
        return self.logs.n_rows

    def initial_targets(self) -> tuple[float, float]:
        """Mean total return and cost per user: the to-go targets at a user's first step."""
        first = self.position == 0
        return float(self.rtg[first].mean()), float(self.ctg[first].mean())

    def scales(self) -> tuple[float, float]:
        first = self.position == 0
        rtg_scale = float(np.std(self.rtg[first])) or 1.0
        ctg_scale = float(np.std(self.ctg[first])) or 1.0
        return rtg_scale, ctg_scale

    def windows(self, loss_on_every_step: bool = True) -> np.ndarray:
        """Row indices [W, L] of training windows, right-aligned, -1 = padding.

        Windows end at every L-th step of a user and at the user's last step, each keeping as much
        history as fits; `make_batch`'s loss mask then puts every logged step in exactly one loss.
        """
        L = self.context_length
        starts = self.logs.user_slices()
        lengths = np.diff(starts)
        last_of_user = np.zeros(self.n_rows, dtype=bool)
        last_of_user[starts[1:] - 1] = True
        if loss_on_every_step:
            ends = np.flatnonzero(((self.position + 1) % L == 0) | last_of_user)
        else:
            ends = np.arange(self.n_rows)
        offsets = np.arange(-L + 1, 1)
        idx = ends[:, None] + offsets[None, :]
        user_start = np.repeat(starts[:-1], lengths)[ends]
        idx = np.where(idx >= user_start[:, None], idx, -1)
        return idx.astype(np.int64)


def build_trajectories(logs: Logs, context_length: int) -> Trajectories:
    starts = logs.user_slices()
    lengths = np.diff(starts)
    user_start = np.repeat(starts[:-1], lengths)
    position = np.arange(logs.n_rows) - user_start
    rtg, ctg = _reverse_cumsum_by_user(logs.reward, starts), _reverse_cumsum_by_user(logs.cost, starts)
    reward_cents, cost_cents = rounded_cents(logs.reward), rounded_cents(logs.cost)
    reward_before = _cumsum_by_user(reward_cents, starts) - reward_cents
    cost_before = _cumsum_by_user(cost_cents, starts) - cost_cents
    return Trajectories(logs, position, rtg, ctg, reward_cents, cost_cents, reward_before, cost_before, context_length)


def _cumsum_by_user(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each user's running sum of x, added in step order from zero and independently of other users, so a
    user's sums are the same bits whichever users share the array (the out-of-core windows, offline/windows.py,
    build them a group of users at a time). One pass per step position, vectorised over users."""
    lengths = np.diff(starts)
    out = np.empty_like(x)
    if not len(lengths):
        return out
    by_length = np.argsort(-lengths, kind="stable")
    first, longest_first = starts[:-1][by_length], lengths[by_length]
    running = np.zeros(len(first), dtype=x.dtype)
    for step in range(int(longest_first[0])):
        k = int(np.searchsorted(-longest_first, -step, side="left"))  # users with more than `step` steps
        rows = first[:k] + step
        running[:k] += x[rows]
        out[rows] = running[:k]
    return out


def _reverse_cumsum_by_user(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    inclusive = _cumsum_by_user(x, starts)
    user_total = np.repeat(inclusive[starts[1:] - 1], np.diff(starts))
    return user_total - inclusive + x


def split_users(n_users: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense user indices for training and validation (80/20 by user by default)."""
    perm = np.random.default_rng(seed).permutation(n_users)
    n_val = round(n_users * val_fraction)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclass
class Batch:
    """Training windows: the model inputs (contract/inputs.py, as tensors in the model's argument order) and
    what the loss compares them with."""

    inputs: tuple[torch.Tensor, ...]
    taken: torch.Tensor  # [B, L] the logged actions (the action head's targets; the value heads' columns)
    loss_mask: torch.Tensor  # [B, L] steps this window is responsible for (each step in one window only)
    value_targets: torch.Tensor  # [B, L, 4]: revenue now, cost now, revenue later, cost later (raw units)

    def input(self, name: str) -> torch.Tensor:
        return self.inputs[NAMES.index(name)]


@dataclass(frozen=True)
class WindowSteps:
    """What training windows [W, L] hold before a lambda and the to-go targets are chosen: the history the
    rule (contract/inputs.py) turns into model inputs, and what the loss compares them with."""

    history: History
    loss_mask: np.ndarray  # [W, L] steps each window is responsible for (each step in one window only)
    value_targets: np.ndarray  # [W, L, 4] f32: revenue now, cost now, revenue later, cost later (raw units)

    def batch(self, lam: np.ndarray, initial_rtg: float, initial_ctg: float, max_timestep: int) -> Batch:
        """The "value" objective's batch: the history rule's inputs at per-window lambda [W]."""
        inputs = history_inputs(self.history, lam, initial_rtg, initial_ctg, max_timestep)
        return _batch(inputs, self.history.actions, self.loss_mask, self.value_targets)


def window_steps(traj: Trajectories, window: np.ndarray) -> WindowSteps:
    """Gather windows [W, L] of rows (-1 = padding) into their history, loss mask and value targets."""
    logs = traj.logs
    mask = window >= 0
    rows = np.where(mask, window, 0)
    first_owned = (traj.position[window[:, -1]] // traj.context_length) * traj.context_length
    loss_mask = mask & (traj.position[rows] >= first_owned[:, None])
    last = window[:, -1]

    def steps_of(per_row: np.ndarray) -> np.ndarray:  # padding zeroed: a window is a function of its user alone
        return np.where(mask.reshape(mask.shape + (1,) * (per_row.ndim - 1)), per_row[rows], 0).astype(per_row.dtype)

    history = History(
        steps_of(logs.features),
        steps_of(logs.action),
        steps_of(traj.reward_cents),
        steps_of(traj.cost_cents),
        steps_of(traj.position),
        mask,
        reward_before_last=traj.reward_before[last],
        cost_before_last=traj.cost_before[last],
    )
    targets = np.stack(
        [logs.reward[rows], logs.cost[rows], traj.rtg[rows] - logs.reward[rows], traj.ctg[rows] - logs.cost[rows]],
        axis=-1,
    )
    return WindowSteps(history, loss_mask, np.where(mask[..., None], targets, 0.0).astype(np.float32))


def make_batch(
    traj: Trajectories,
    window: np.ndarray,
    objective: str,
    lam: np.ndarray,
    initial_rtg: float,
    initial_ctg: float,
    max_timestep: int,
) -> Batch:
    """Gather windows [B, L] of rows into model inputs for `objective` with per-window lambda [B]."""
    steps = window_steps(traj, window)
    if objective == "value":
        return steps.batch(lam, initial_rtg, initial_ctg, max_timestep)
    if objective not in ("dt-literal", "dt-lagrangian"):
        raise ValueError(f"unknown objective {objective!r}")
    rows = np.where(steps.history.mask, window, 0)
    rtg_in, ctg_in = traj.rtg[rows], traj.ctg[rows]
    if objective == "dt-lagrangian":
        rtg_in = rtg_in - lam[:, None] * ctg_in
    h = steps.history
    inputs = assemble(h.states, h.actions, rtg_in, ctg_in, h.timesteps, lam, h.mask, max_timestep)
    return _batch(inputs, h.actions, steps.loss_mask, steps.value_targets)


def _batch(inputs: ModelInputs, taken: np.ndarray, loss_mask: np.ndarray, value_targets: np.ndarray) -> Batch:
    import torch  # here: the window builders (offline/windows.py, in Spark's Python workers too) need no torch

    return Batch(
        inputs=tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.arrays()),
        taken=torch.from_numpy(taken),
        loss_mask=torch.from_numpy(loss_mask),
        value_targets=torch.from_numpy(value_targets),
    )
