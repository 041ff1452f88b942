"""The SACO ablations: variants of the product model, each trained with `offline.train.train` and turned into
a policy that can be held to the same budgets as every other method.

Inputs that TrainConfig cannot switch off (RTG, CTG, lambda) are zeroed by a batch transform handed to
`train` (training and validation batches) and by `ZeroInputs` at decision time. Variants whose decision
ignores lambda (the cross-entropy DT objectives) get a budget knob: lambda above `split` withholds coupons
from a fixed random subset of users (fraction 1 - exp(-(lambda - split))).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from contract.inputs import NAMES
from offline.logs import Logs
from offline.model import PolicyModule
from offline.rollout import Policy, SequencePolicy
from offline.train import TrainConfig, train
from offline.trajectories import Batch
from research.report.policies import BudgetKnob


@dataclass(frozen=True)
class Ablation:
    name: str
    what: str
    objective: str = "value"
    token_layout: str = "step"
    context_length: int | None = None  # None = the product's
    later_loss_weight: float | None = None
    future_weight: float | None = None
    history_decays: tuple[float, ...] | None = None
    zero_rtg: bool = False
    zero_ctg: bool = False
    zero_lam: bool = False
    knob_split: float | None = None  # None: lambda is the model's own price of cost (value objective)
    lagrangian_rtg: bool = False


ABLATIONS = (
    Ablation(
        "no-constraint",
        "objective dt-literal, layout dt4, lambda and CTG inputs zeroed in training and "
        "at decision time (the paper's No-constraint); budget met by withholding coupons",
        "dt-literal",
        "dt4",
        zero_ctg=True,
        zero_lam=True,
        knob_split=0.0,
    ),
    Ablation(
        "no-RTG",
        "the product (objective value) with the RTG input zeroed in training and at decision time "
        "(the paper's No-RTG; in the step layout this also hides the previous step's revenue)",
        zero_rtg=True,
    ),
    Ablation(
        "dt-literal",
        "the paper's literal DT: objective dt-literal, layout dt4 (lambda drawn independently "
        "of the trajectory, hindsight RTG/CTG, cross-entropy on logged actions); budget met by "
        "withholding coupons",
        "dt-literal",
        "dt4",
        knob_split=0.0,
    ),
    Ablation(
        "dt-lagrangian",
        "informative lambda: objective dt-lagrangian, layout dt4 (RTG input = Lagrangian "
        "return-to-go under lambda; initial RTG = 75% quantile of r - lambda c to go); lambda in [0, 1] "
        "drives the model, above 1 coupons are also withheld",
        "dt-lagrangian",
        "dt4",
        knob_split=1.0,
        lagrangian_rtg=True,
    ),
    Ablation("context-1", "the product with context_length = 1 (no history in the sequence model)", context_length=1),
    Ablation(
        "long-term-heads",
        "the product with the 'later' value heads trained (later_loss_weight = 1) and "
        "used in the decision (future_weight = 1): revenue and cost to the end of the trajectory, as "
        "estimated under the random logging policy",
        later_loss_weight=1.0,
        future_weight=1.0,
    ),
    Ablation(
        "no-history",
        "the product without the history moving averages in the step tokens "
        "(history_decays = ()): history only through attention",
        history_decays=(),
    ),
)


class ZeroInputs(torch.nn.Module):
    """A policy module with some conditioning inputs replaced by zeros (ablations). Eager only: it takes the
    model inputs in their order (contract/inputs.py)."""

    def __init__(self, inner: torch.nn.Module, rtg: bool, ctg: bool, lam: bool) -> None:
        super().__init__()
        self.inner = inner
        self.zeroed = _zeroed(rtg, ctg, lam)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(*_zero(self.zeroed, inputs))
        return out


def _zeroed(rtg: bool, ctg: bool, lam: bool) -> frozenset[str]:
    return frozenset(name for name, zero in (("rtg", rtg), ("ctg", ctg), ("lam", lam)) if zero)


def _zero(zeroed: frozenset[str], inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`inputs` (the model's, in order) with the named ones replaced by zeros."""
    return tuple(torch.zeros_like(x) if name in zeroed else x for name, x in zip(NAMES, inputs, strict=True))


def zero_inputs(rtg: bool, ctg: bool, lam: bool) -> Callable[[Batch], Batch] | None:
    """A training batch transform that zeroes the chosen conditioning inputs (targets untouched);
    None when nothing is zeroed."""
    if not (rtg or ctg or lam):
        return None

    zeroed = _zeroed(rtg, ctg, lam)

    def transform(batch: Batch) -> Batch:
        return replace(batch, inputs=_zero(zeroed, batch.inputs))

    return transform


def ablation_policy(ab: Ablation, logs: Logs, base: TrainConfig, seed: int) -> tuple[Policy, float]:
    """Train the variant `ab` on `logs`; returns its policy and the training wall time in seconds."""
    cfg = replace(
        base,
        objective=ab.objective,
        token_layout=ab.token_layout,
        seed=seed,
        context_length=ab.context_length or base.context_length,
        later_loss_weight=base.later_loss_weight if ab.later_loss_weight is None else ab.later_loss_weight,
        future_weight=base.future_weight if ab.future_weight is None else ab.future_weight,
        history_decays=base.history_decays if ab.history_decays is None else ab.history_decays,
    )
    started = time.perf_counter()
    result = train(logs, cfg, progress=False, batch_transform=zero_inputs(ab.zero_rtg, ab.zero_ctg, ab.zero_lam))
    seconds = time.perf_counter() - started
    module: torch.nn.Module = PolicyModule(result.model).eval()
    if ab.zero_rtg or ab.zero_ctg or ab.zero_lam:
        module = ZeroInputs(module, ab.zero_rtg, ab.zero_ctg, ab.zero_lam).eval()
    rtg_for_lambda: Callable[[float], float] | None = None
    if ab.lagrangian_rtg:
        traj = result.trajectories
        first = traj.position == 0
        rtg_first, ctg_first = traj.rtg[first], traj.ctg[first]

        def lagrangian_initial_rtg(lam: float) -> float:
            return float(np.quantile(rtg_first - lam * ctg_first, 0.75))

        rtg_for_lambda = lagrangian_initial_rtg

    policy: Policy = SequencePolicy(
        module,
        cfg.context_length,
        result.initial_rtg,
        result.initial_ctg,
        logs.feature_dim,
        name=ab.name,
        rtg_for_lambda=rtg_for_lambda,
    )
    if ab.knob_split is not None:
        policy = BudgetKnob(policy, ab.knob_split, seed=seed)
    return policy, seconds
