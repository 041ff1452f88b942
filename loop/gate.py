"""The promotion gate: is a candidate model better than the incumbent before it serves money?

Two pieces of evidence, both required:

1. **Off-policy estimate on logged traffic.** On matured decisions of held-out users (never trained on),
   each model's greedy choice is computed from the logged context (the user's logged history, as the
   service builds it) at the logged lambda. The value of a decision is ``reward - lambda * cost`` (the
   Lagrangian the policy maximises); a model's value per decision is estimated by self-normalised inverse
   propensity scoring with the logged ``probability`` of the logged action:
   ``V = sum(w r) / sum(w)``, ``w = 1[model's action = logged action] / probability``. Both models are
   scored on the same decisions, so the gate bounds their *difference* ``V_candidate - V_incumbent``: a
   one-sided 95% lower bound from the delta method's standard error of the paired difference (each
   estimate's influence ``w (r - V) / mean(w)`` per decision). Holdout decisions are left out (their
   action was not the policy's).
2. **The learned environment.** Both models run through the environment learned from the matured
   training logs (`offline.env.LogEnvironment`) at the median logged lambda.

The candidate is promoted only if the lower bound of the difference is at least
``-tolerance * |incumbent's estimate|`` (the candidate is, with 95% confidence, not worse than the
incumbent by more than the tolerance), its effective sample size is at least ``min_ess``, and its value
in the learned environment is at least the incumbent's minus the same relative tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from model_store import Artifact, load_scripted
from offline.logs import Logs
from offline.trajectories import build_trajectories, make_batch

Z_ONE_SIDED_95 = 1.6448536269514722


@dataclass(frozen=True)
class GateConfig:
    tolerance: float = 0.02  # relative: how much worse than the incumbent the candidate's lower bound may be
    min_ess: float = 50.0  # effective sample size the candidate's estimate needs
    z: float = Z_ONE_SIDED_95


@dataclass
class OffPolicyEstimate:
    value: float  # per decision: reward - lambda * cost
    lower: float
    upper: float
    stderr: float
    revenue: float
    cost: float
    matches: int  # logged decisions where the model chose the logged action
    ess: float  # effective sample size of the weights

    def to_json(self) -> dict[str, float]:
        return {k: round(float(v), 6) for k, v in self.__dict__.items()}


@dataclass
class GateResult:
    promote: bool
    reasons: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)


def greedy_actions(artifact: Artifact, logs: Logs, lam: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """The model's choice at every logged decision, from the context the service would have built: the
    user's last steps (logged features, actions, outcomes) and the to-go values from the manifest's
    targets, at each decision's lambda."""
    m = artifact.manifest
    module = load_scripted(artifact.model_path)
    traj = build_trajectories(logs, m.context_length)
    windows = traj.windows(loss_on_every_step=False)  # one window ending at every row, in row order
    out = np.zeros(logs.n_rows, dtype=np.int64)
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            w = windows[i : i + batch_size]
            b = make_batch(traj, w, "value", lam[i : i + batch_size], m.initial_rtg, m.initial_ctg, m.max_timestep)
            scores = module(*b.inputs)
            out[i : i + len(w)] = scores.argmax(dim=1).numpy()
    return out


def snips(
    chosen: np.ndarray,
    logged: np.ndarray,
    probability: np.ndarray,
    reward: np.ndarray,
    cost: np.ndarray,
    lam: np.ndarray,
    z: float,
) -> OffPolicyEstimate:
    """Self-normalised IPS estimate of a deterministic policy's value per decision, with its bound."""
    w = (chosen == logged) / np.maximum(probability, 1e-12)
    value = reward - lam * cost
    total = float(w.sum())
    if total <= 0:
        nan = float("nan")
        return OffPolicyEstimate(nan, nan, nan, nan, nan, nan, 0, 0.0)
    v = float((w * value).sum() / total)
    stderr = float(np.sqrt(((w * (value - v)) ** 2).sum()) / total)
    ess = total**2 / float((w**2).sum())
    return OffPolicyEstimate(
        value=v,
        lower=v - z * stderr,
        upper=v + z * stderr,
        stderr=stderr,
        revenue=float((w * reward).sum() / total),
        cost=float((w * cost).sum() / total),
        matches=int((chosen == logged).sum()),
        ess=ess,
    )


def influence(chosen: np.ndarray, logged: np.ndarray, probability: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Each decision's influence on the SNIPS estimate (its standard error is their sd / sqrt(n))."""
    w = (chosen == logged) / np.maximum(probability, 1e-12)
    mean_w = float(w.mean()) if len(w) else 0.0
    if mean_w <= 0:
        return np.zeros_like(value)
    v = float((w * value).sum() / w.sum())
    return np.asarray(w * (value - v) / mean_w)


@dataclass
class PairedDifference:
    difference: float  # candidate minus incumbent, value per decision
    lower: float
    stderr: float

    def to_json(self) -> dict[str, float]:
        return {k: round(float(v), 6) for k, v in self.__dict__.items()}


def off_policy_estimates(
    artifacts: dict[str, Artifact], logs: Logs, table: pa.Table, z: float = Z_ONE_SIDED_95
) -> tuple[dict[str, OffPolicyEstimate], dict[str, np.ndarray]]:
    """SNIPS estimates of each model on `logs` (matured, held-out), whose rows align with `table`'s, and
    each decision's influence on them (for the paired difference)."""
    lam = table.column("lambda").to_numpy(zero_copy_only=False).astype(np.float64)
    probability = table.column("probability").to_numpy(zero_copy_only=False).astype(np.float64)
    holdout = table.column("holdout").to_numpy(zero_copy_only=False).astype(bool)
    scored = ~holdout
    out: dict[str, OffPolicyEstimate] = {}
    influences = {}
    value = logs.reward[scored] - lam[scored] * logs.cost[scored]
    for name, artifact in artifacts.items():
        chosen = greedy_actions(artifact, logs, lam)[scored]
        out[name] = snips(
            chosen, logs.action[scored], probability[scored], logs.reward[scored], logs.cost[scored], lam[scored], z
        )
        influences[name] = influence(chosen, logs.action[scored], probability[scored], value)
    return out, influences


def paired_difference(
    estimates: dict[str, OffPolicyEstimate], influences: dict[str, np.ndarray], z: float = Z_ONE_SIDED_95
) -> PairedDifference:
    """Candidate minus incumbent on the same decisions, with the one-sided lower bound."""
    diff = influences["candidate"] - influences["incumbent"]
    n = max(len(diff), 1)
    stderr = float(diff.std(ddof=1) / np.sqrt(n)) if len(diff) > 1 else float("inf")
    d = estimates["candidate"].value - estimates["incumbent"].value
    return PairedDifference(d, d - z * stderr, stderr)


def environment_values(
    artifacts: dict[str, Artifact], env_logs: Logs, lam: float, users: int | None = None, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Each model's value (revenue - lam * cost), revenue and cost per user in the environment learned from
    `env_logs`, in the models' action space; each model chooses among the actions the logs hold (the learned
    environment has no response for the others, as a campaign offers only its own coupons)."""
    from offline.env import LogEnvironment
    from offline.rollout import SequencePolicy, rollout

    num_actions = max(a.manifest.num_actions for a in artifacts.values())
    env = LogEnvironment.fit(env_logs, seed=seed, num_actions=max(num_actions, env_logs.num_actions))
    out = {}
    for name, artifact in artifacts.items():
        m = artifact.manifest
        policy = SequencePolicy(
            load_scripted(artifact.model_path),
            m.context_length,
            m.initial_rtg,
            m.initial_ctg,
            m.feature_dim,
            offered=env.logged_actions,
        )
        r = rollout(env, policy, lam, n_users=users, seed=seed)
        out[name] = {
            "value": (r.revenue - lam * r.cost) / r.users,
            "revenue": r.revenue / r.users,
            "cost": r.cost / r.users,
        }
    return out


def _not_worse(candidate: float, incumbent: float, tolerance: float) -> bool:
    return candidate >= incumbent - tolerance * abs(incumbent)


def decide(
    estimates: dict[str, OffPolicyEstimate],
    difference: PairedDifference,
    env: dict[str, dict[str, float]] | None,
    cfg: GateConfig,
) -> GateResult:
    """Promote or refuse the candidate, with every reason (see the module docstring)."""
    cand, inc = estimates["candidate"], estimates["incumbent"]
    reasons: list[str] = []
    ok = True
    allowed = -cfg.tolerance * abs(inc.value)
    if not cand.ess >= cfg.min_ess:
        ok = False
        reasons.append(
            f"too little evidence: the candidate matches {cand.matches} logged decisions "
            f"(effective sample size {cand.ess:.1f} < {cfg.min_ess:g})"
        )
    elif not difference.lower >= allowed:
        ok = False
        reasons.append(
            f"off-policy lower bound of candidate minus incumbent {difference.lower:.4f} per decision is below "
            f"the tolerance {allowed:.4f} ({cfg.tolerance:.0%} of the incumbent's {inc.value:.4f}): the candidate "
            f"({cand.value:.4f}) may be worse than the incumbent"
        )
    else:
        reasons.append(
            f"off-policy lower bound of candidate minus incumbent {difference.lower:.4f} per decision >= "
            f"{allowed:.4f} ({cfg.tolerance:.0%} of the incumbent's {inc.value:.4f})"
        )
    if env is not None:
        c, i = env["candidate"]["value"], env["incumbent"]["value"]
        if _not_worse(c, i, cfg.tolerance):
            reasons.append(
                f"learned environment: value per user {c:.4f} >= incumbent {i:.4f} minus {cfg.tolerance:.0%}"
            )
        else:
            ok = False
            reasons.append(
                f"learned environment: value per user {c:.4f} is below the incumbent's {i:.4f} "
                f"by more than the tolerance {cfg.tolerance:.0%}"
            )
    metrics: dict[str, Any] = {
        "off_policy": {name: e.to_json() for name, e in estimates.items()},
        "off_policy_difference": difference.to_json(),
        "tolerance": cfg.tolerance,
    }
    if env is not None:
        metrics["environment"] = env
    return GateResult(ok, reasons, metrics)
