"""The model inputs and the one rule from a user's history to them.

`ModelInputs` is the model's signature: seven arrays, right-aligned over [B, L] (padding on the left, the
last position is the step the model decides or, in training, the window's last step). Every forward
(the service, training, calibration rollouts, the exported TorchScript) takes them in `ModelInputs.NAMES`
order.

`history_inputs` is the history rule that training windows ("value" objective), calibration rollouts and
the service all call, so that a served user's inputs equal the training window of the same steps:

- to-go inputs are the targets minus what happened before the step:
  RTG_in_t = initial_rtg - sum_{t' < t} r_t' and CTG_in_t = initial_ctg - sum_{t' < t} c_t', the sums in
  integer cents (exact and independent of the order in which outcomes arrive), the subtraction in
  doubles, then float32;
- timesteps are each step's index in the user's history, clipped to max_timestep - 1;
- the last position's action is 0: it is the action being decided (the model reads only earlier ones);
- padding is all zeros (mask False).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from contract.money import CENTS_PER_UNIT


@dataclass(frozen=True)
class ModelInputs:
    """One batch of model inputs, right-aligned (padding on the left, the last position is the decision)."""

    states: np.ndarray  # f32 [B, L, d]
    actions: np.ndarray  # i64 [B, L]
    rtg: np.ndarray  # f32 [B, L]
    ctg: np.ndarray  # f32 [B, L]
    timesteps: np.ndarray  # i64 [B, L]
    lam: np.ndarray  # f32 [B]
    mask: np.ndarray  # bool [B, L]

    @property
    def rows(self) -> int:
        return int(self.states.shape[0])

    @property
    def length(self) -> int:
        return int(self.states.shape[1])

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The seven arrays in the model's argument order."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def sliced(self, rows: slice) -> ModelInputs:
        return ModelInputs(*(a[rows] for a in self.arrays()))

    @staticmethod
    def zeros(rows: int, length: int, feature_dim: int) -> ModelInputs:
        return ModelInputs(
            states=np.zeros((rows, length, feature_dim), np.float32),
            actions=np.zeros((rows, length), np.int64),
            rtg=np.zeros((rows, length), np.float32),
            ctg=np.zeros((rows, length), np.float32),
            timesteps=np.zeros((rows, length), np.int64),
            lam=np.zeros(rows, np.float32),
            mask=np.zeros((rows, length), np.bool_),
        )

    @staticmethod
    def concatenate(parts: list[ModelInputs]) -> ModelInputs:
        """Stack batches, left-padding the shorter ones (zeros, mask False) to the longest context."""
        if len(parts) == 1:
            return parts[0]
        out = ModelInputs.zeros(sum(p.rows for p in parts), max(p.length for p in parts), parts[0].states.shape[2])
        out.lam[:] = np.concatenate([p.lam for p in parts])
        row = 0
        for p in parts:
            rs, cs = slice(row, row + p.rows), slice(out.length - p.length, out.length)
            for name in ("states", "actions", "rtg", "ctg", "timesteps", "mask"):
                getattr(out, name)[rs, cs] = getattr(p, name)
            row += p.rows
        return out


NAMES = tuple(f.name for f in fields(ModelInputs))


def assemble(
    states: np.ndarray,
    actions: np.ndarray,
    rtg: np.ndarray,
    ctg: np.ndarray,
    timesteps: np.ndarray,
    lam: np.ndarray,
    mask: np.ndarray,
    max_timestep: int,
) -> ModelInputs:
    """Model inputs from per-step arrays [B, L] (states [B, L, d], lam [B]): padding (mask False) zeroed,
    timesteps clipped to max_timestep - 1, the last position's action 0 (it is the action being decided,
    never an input), dtypes as the model takes them. The history rule ends here; the hindsight objectives of
    the ablations (dt-literal, dt-lagrangian) build their inputs here directly."""
    pad = ~mask
    known_actions = np.where(pad, 0, actions).astype(np.int64)
    known_actions[:, -1] = 0
    return ModelInputs(
        states=np.where(pad[..., None], 0, states).astype(np.float32, copy=False),
        actions=known_actions,
        rtg=np.where(pad, 0, rtg).astype(np.float32, copy=False),
        ctg=np.where(pad, 0, ctg).astype(np.float32, copy=False),
        timesteps=np.where(pad, 0, np.minimum(timesteps, max_timestep - 1)).astype(np.int64, copy=False),
        lam=np.asarray(lam, np.float32),
        mask=np.asarray(mask, np.bool_),
    )


@dataclass(frozen=True)
class History:
    """A batch of users' recent steps, right-aligned [B, L]; the last position is the step to decide (in
    training: the window's last step). Outcomes are integer cents."""

    states: np.ndarray  # f32 [B, L, d]
    actions: np.ndarray  # i64 [B, L]: the action taken (the last position's is not an input)
    reward: np.ndarray  # i64 [B, L] cents: each step's realised reward (0 until its outcome is known)
    cost: np.ndarray  # i64 [B, L] cents
    timesteps: np.ndarray  # i64 [B, L]: the step's index in the user's whole history
    mask: np.ndarray  # bool [B, L]: a step (True) or padding
    # i64 [B] cents: the sum of every outcome known before the last position, also of steps before the window
    reward_before_last: np.ndarray
    cost_before_last: np.ndarray


def to_go(initial: float, before_last: np.ndarray, per_step: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, L] f64: initial - (the cents before each step) / 100. What happened before step j is what happened
    before the last position less steps j .. L-2 of the window (the last position's own outcome is later)."""
    steps = np.where(mask, per_step, 0)
    steps[:, -1] = 0
    from_here = np.cumsum(steps[:, ::-1], axis=1)[:, ::-1]
    before = before_last[:, None] - from_here
    return initial - before / CENTS_PER_UNIT


def history_inputs(
    history: History, lam: np.ndarray, initial_rtg: float, initial_ctg: float, max_timestep: int
) -> ModelInputs:
    """The history rule (module docstring): model inputs of each user's window, at each row's lambda [B]."""
    mask = history.mask
    return assemble(
        history.states,
        history.actions,
        to_go(initial_rtg, history.reward_before_last, history.reward, mask),
        to_go(initial_ctg, history.cost_before_last, history.cost, mask),
        history.timesteps,
        lam,
        mask,
        max_timestep,
    )
