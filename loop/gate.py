"""The promotion gate: does the candidate earn more than the incumbent at the spend it will be served at?

Two pieces of evidence, both required:

1. **Off-policy estimate at the operating point, on logged traffic.** On logged decisions that neither model
   trained on (the `Evidence` parts: held-out users' decisions, and decisions new to the incumbent, each scored
   with a candidate that never saw them; `loop.retrain.EvidencePlan`), each model's choice is computed from the
   logged context (the user's logged history, as the service builds it). The incumbent is scored at the lambdas
   it served at; the candidate at the lambda whose estimated spend per decision meets the incumbent's estimated
   spend (or a given target, e.g. a campaign's plan): a monotone search over lambda on the same logged
   decisions (spend falls as lambda rises), starting from the incumbent's lambda. Comparing both at the logged
   lambda would compare two different operating points, as a candidate may spend much more or less there;
   recalibration moves it to this one anyway.

   Both models' revenue and cost per decision are estimated with the same weights by a doubly robust
   estimator: the direct model (the learned environment's expected reward and cost of every action at every
   logged decision) plus the self-normalised importance-weighted residuals of the decisions where the model
   chose the logged action, ``w = 1[model's action = logged action] / probability``:
   ``V = mean(q(x, model's action)) + sum(w (y - q(x, logged action))) / sum(w)``. Without a direct model
   (q = 0) it is self-normalised inverse propensity scoring. A model's value is ``revenue - lambda_ref * cost``,
   ``lambda_ref`` the incumbent's median logged lambda: at equal spend its difference is the revenue
   difference, and what spend is left unmatched is priced at the incumbent's lambda. The gate bounds the
   paired difference ``candidate - incumbent`` on the same decisions: a one-sided 95% lower bound from the
   standard error of the per-decision difference of the two estimates' influences (the variation of the
   candidate's lambda, itself estimated, is not counted). Holdout-group decisions are left out (their action
   was not the policy's).
2. **The learned environment.** Both models run through the environment learned from the training logs, the
   incumbent at the median logged lambda, the candidate at the lambda whose simulated spend meets the
   incumbent's there; the value is priced the same way.

Models that score coupons and bundles by their features are compared on the rows of the training table (the
logged actions are its rows: no coupon, each coupon alone, each bundle of several coupons the logs hold;
loop/actions.py): both choose among those rows, with the same weights whatever table they were trained on, so a
logged bundle is matched by a model's choice of that bundle.

The candidate is promoted only if the lower bound of the difference is at least
``-tolerance * incumbent's revenue`` per decision (with 95% confidence, the candidate earns at equal spend no
less than the incumbent less the tolerance), its effective sample size (Kish: ``sum(w)^2 / sum(w^2)``) is at
least ``min_ess``, and its value in the learned environment is at least the incumbent's less the same share of
the incumbent's revenue there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from contract.inputs import NAMES
from model_store import Artifact, load_scripted
from offline.logs import Logs
from offline.trajectories import build_trajectories, make_batch

if TYPE_CHECKING:
    from offline.env import LogEnvironment

Z_ONE_SIDED_95 = 1.6448536269514722

Choices = Callable[[np.ndarray], np.ndarray]  # lambda of every decision [N] -> the policy's action at each [N]


@dataclass(frozen=True)
class GateConfig:
    tolerance: float = 0.02  # relative: how much worse than the incumbent the candidate's lower bound may be
    min_ess: float = 50.0  # effective sample size the candidate's weights need
    z: float = Z_ONE_SIDED_95
    spend_low: float = 0.99  # equal spend: the candidate's estimated spend within [spend_low, 1] x the target
    doubly_robust: bool = True  # the learned environment as the direct model; False: self-normalised IPS


@dataclass
class LoggedDecisions:
    """The evidence: logged decisions with the propensity of their action, their labels and the lambda each was
    made at, and (for the doubly robust estimate) the direct model's expected reward and cost of every action."""

    action: np.ndarray  # [N] int
    probability: np.ndarray  # [N] the logging policy's probability of `action`
    reward: np.ndarray  # [N]
    cost: np.ndarray  # [N]
    lam: np.ndarray  # [N]
    expected_reward: np.ndarray | None = None  # [N, K]
    expected_cost: np.ndarray | None = None  # [N, K]

    def __post_init__(self) -> None:
        n = len(self.action)
        for name in ("probability", "reward", "cost", "lam"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} decisions, action {n}")
        if (self.expected_reward is None) != (self.expected_cost is None):
            raise ValueError("give both expected_reward and expected_cost, or neither")
        if self.expected_reward is not None and self.expected_cost is not None:
            if self.expected_reward.shape != self.expected_cost.shape or self.expected_reward.shape[0] != n:
                raise ValueError(
                    f"expected_reward {self.expected_reward.shape} and expected_cost {self.expected_cost.shape} "
                    f"must both be [{n}, K]"
                )
            if n and int(self.action.max()) >= self.expected_reward.shape[1]:
                raise ValueError(f"logged action {int(self.action.max())} is beyond the direct model's actions")

    @property
    def n(self) -> int:
        return len(self.action)

    @property
    def reference_lambda(self) -> float:
        """The incumbent's lambda: the median of the logged lambdas (0 without decisions)."""
        return float(np.median(self.lam)) if self.n else 0.0


@dataclass
class PolicyEstimate:
    """A deterministic policy's revenue and cost per decision on logged decisions, with each decision's influence
    on them (an estimate's standard error is their sd / sqrt(N); a paired difference's, that of their difference)."""

    revenue: float
    cost: float
    revenue_influence: np.ndarray
    cost_influence: np.ndarray
    matches: int  # decisions where the policy chose the logged action
    ess: float  # Kish effective sample size of the weights
    actions: np.ndarray  # [N] the policy's choices
    lam: float | None = None  # the one lambda it was scored at; None: each decision's logged lambda

    def value(self, lam_ref: float) -> float:
        return self.revenue - lam_ref * self.cost

    def value_influence(self, lam_ref: float) -> np.ndarray:
        return np.asarray(self.revenue_influence - lam_ref * self.cost_influence)

    def to_json(self, lam_ref: float, z: float) -> dict[str, float | int | None]:
        value = self.value(lam_ref)
        stderr = _stderr(self.value_influence(lam_ref))
        return {
            "value": value,
            "lower": value - z * stderr,
            "upper": value + z * stderr,
            "stderr": stderr,
            "revenue": self.revenue,
            "cost": self.cost,
            "cost_stderr": _stderr(self.cost_influence),
            "matches": self.matches,
            "ess": self.ess,
            "lambda": self.lam,
        }


def _stderr(influence: np.ndarray) -> float:
    return float(influence.std(ddof=1) / math.sqrt(len(influence))) if len(influence) > 1 else math.inf


def _dr_mean(
    y: np.ndarray, direct: np.ndarray | None, logged_q: np.ndarray | None, w: np.ndarray
) -> tuple[float, np.ndarray]:
    """Doubly robust mean of `y` under the policy (self-normalised residual correction) and its influence."""
    n = len(y)
    if n == 0:
        return math.nan, np.zeros(0)
    dm = direct if direct is not None else np.zeros(n)
    residual = y - logged_q if logged_q is not None else y
    total = float(w.sum())
    base = float(dm.mean())
    if total <= 0:
        if direct is None:  # nothing matches and no model: nothing is known
            return math.nan, np.zeros(n)
        return base, dm - base
    correction = float((w * residual).sum() / total)
    return base + correction, dm - base + w * (residual - correction) / (total / n)


def estimate(decisions: LoggedDecisions, chosen: np.ndarray, lam: float | None = None) -> PolicyEstimate:
    """The doubly robust (without a direct model: self-normalised IPS) estimate of the policy that chose `chosen`
    at each logged decision."""
    d = decisions
    match = chosen == d.action
    w = match / np.maximum(d.probability, 1e-12)
    rows = np.arange(d.n)
    if d.expected_reward is not None and d.expected_cost is not None:
        revenue, revenue_inf = _dr_mean(d.reward, d.expected_reward[rows, chosen], d.expected_reward[rows, d.action], w)
        cost, cost_inf = _dr_mean(d.cost, d.expected_cost[rows, chosen], d.expected_cost[rows, d.action], w)
    else:
        revenue, revenue_inf = _dr_mean(d.reward, None, None, w)
        cost, cost_inf = _dr_mean(d.cost, None, None, w)
    squares = float((w**2).sum())
    ess = float(w.sum()) ** 2 / squares if squares > 0 else 0.0
    return PolicyEstimate(revenue, cost, revenue_inf, cost_inf, int(match.sum()), ess, chosen, lam)


@dataclass
class OperatingPoint:
    """A policy at the lambda whose estimated spend per decision meets a target."""

    estimate: PolicyEstimate
    target_cost: float
    passes: int  # lambdas scored
    matched: bool  # the estimated spend lies within [spend_low, 1] x the target
    reason: str = ""  # why not, when not matched

    @property
    def lam(self) -> float:
        assert self.estimate.lam is not None
        return self.estimate.lam


def equal_spend(
    decisions: LoggedDecisions, choices: Choices, target_cost: float, start_lam: float, spend_low: float = 0.99
) -> OperatingPoint:
    """The lambda (one for every decision) at which the policy's estimated spend per decision lies within
    [spend_low, 1] x `target_cost`: `start_lam` if it does, else a monotone search (spend falls as lambda rises;
    bracket, then false position on log spend). A policy that spends less than the target even at lambda 0 is
    scored there; one that cannot be brought down to the target, at the largest lambda tried (not matched)."""
    from offline.calibrate import BudgetUnreachable, search_monotone

    scored: dict[float, PolicyEstimate] = {}

    def at(lam: float) -> PolicyEstimate:
        if lam not in scored:
            scored[lam] = estimate(decisions, choices(np.full(decisions.n, lam)), lam)
        return scored[lam]

    def within(e: PolicyEstimate) -> bool:
        return spend_low * target_cost <= e.cost <= target_cost

    first = at(start_lam)
    if not math.isfinite(target_cost):
        return OperatingPoint(first, target_cost, len(scored), False, "no target spend (nothing to estimate it on)")
    if within(first):
        return OperatingPoint(first, target_cost, len(scored), True)
    try:
        found = search_monotone(lambda lam: (at(lam).revenue, at(lam).cost), target_cost, target_low=spend_low)
    except BudgetUnreachable as exc:
        reason = f"its estimated spend is {exc.cost:.4g} per decision at lambda {exc.lam:g}, above {target_cost:.4g}"
        return OperatingPoint(at(exc.lam), target_cost, len(scored), False, reason)
    e = at(found.lam)
    if within(e):
        return OperatingPoint(e, target_cost, len(scored), True)
    if found.lam == 0.0 and e.cost < target_cost:
        reason = f"it spends {e.cost:.4g} per decision at lambda 0, below {target_cost:.4g}"
    else:
        reason = f"the search ended at spend {e.cost:.4g} per decision for a target of {target_cost:.4g}"
    return OperatingPoint(e, target_cost, len(scored), False, reason)


@dataclass
class PairedDifference:
    difference: float  # candidate minus incumbent, value per decision (revenue - lambda_ref * cost)
    lower: float
    stderr: float
    revenue_difference: float
    cost_difference: float
    cost_stderr: float

    @property
    def smallest_resolved(self) -> float:
        """The smallest difference the evidence resolves: two standard errors."""
        return 2.0 * self.stderr

    def to_json(self) -> dict[str, float]:
        return {**{k: float(v) for k, v in self.__dict__.items()}, "smallest_resolved": self.smallest_resolved}


def paired_difference(
    candidate: PolicyEstimate, incumbent: PolicyEstimate, lam_ref: float, z: float = Z_ONE_SIDED_95
) -> PairedDifference:
    """Candidate minus incumbent on the same decisions, with the one-sided lower bound."""
    d = candidate.value(lam_ref) - incumbent.value(lam_ref)
    stderr = _stderr(candidate.value_influence(lam_ref) - incumbent.value_influence(lam_ref))
    return PairedDifference(
        difference=d,
        lower=d - z * stderr,
        stderr=stderr,
        revenue_difference=candidate.revenue - incumbent.revenue,
        cost_difference=candidate.cost - incumbent.cost,
        cost_stderr=_stderr(candidate.cost_influence - incumbent.cost_influence),
    )


@dataclass
class OffPolicyComparison:
    """Both models on the same logged decisions: the incumbent at its logged lambdas (or at the target's lambda),
    the candidate at the lambda of equal spend."""

    candidate: OperatingPoint
    incumbent: PolicyEstimate
    difference: PairedDifference
    lam_ref: float
    target_from: str
    estimator: str
    decisions: int

    def to_json(self, z: float) -> dict[str, Any]:
        return {
            "objective": f"revenue - {self.lam_ref:.6g} x cost per decision, both models at equal spend",
            "estimator": self.estimator,
            "decisions": self.decisions,
            "target_cost": self.candidate.target_cost,
            "target_from": self.target_from,
            "spend_matched": self.candidate.matched,
            "spend_ratio": self.candidate.estimate.cost / self.candidate.target_cost
            if self.candidate.target_cost > 0
            else None,
            "candidate_lambda": self.candidate.lam,
            "incumbent_lambda": self.incumbent.lam if self.incumbent.lam is not None else self.lam_ref,
            "search_passes": self.candidate.passes,
            # the decisions where the two choose differently are the only ones that tell them apart
            "agreement": float(np.mean(self.candidate.estimate.actions == self.incumbent.actions))
            if self.decisions
            else None,
            "ess": {"candidate": self.candidate.estimate.ess, "incumbent": self.incumbent.ess},
        }


def compare_at_equal_spend(
    decisions: LoggedDecisions,
    candidate: Choices,
    incumbent: Choices,
    cfg: GateConfig,
    target_cost: float | None = None,
) -> OffPolicyComparison:
    """The candidate against the incumbent at equal estimated spend per decision: the incumbent's at the lambdas
    it served at, or (`target_cost`, e.g. a campaign's plan per decision) that target, the incumbent then also at
    the lambda that meets it."""
    lam_ref = decisions.reference_lambda
    if target_cost is None:
        inc = estimate(decisions, incumbent(decisions.lam))
        target, target_from = inc.cost, "the incumbent's estimated spend at its logged lambdas"
    else:
        inc_point = equal_spend(decisions, incumbent, target_cost, lam_ref, cfg.spend_low)
        inc, target, target_from = inc_point.estimate, target_cost, "the given spend per decision"
    cand = equal_spend(decisions, candidate, target, lam_ref, cfg.spend_low)
    estimator = (
        "doubly robust (direct model: the learned environment)"
        if decisions.expected_reward is not None
        else "self-normalised inverse propensity scoring"
    )
    difference = paired_difference(cand.estimate, inc, lam_ref, cfg.z)
    return OffPolicyComparison(cand, inc, difference, lam_ref, target_from, estimator, decisions.n)


class ModelChoices:
    """A model's choice at every logged decision, from the context the service would have built: the user's last
    steps (logged features, actions, outcomes) and the to-go values from the manifest's targets. The inputs are
    built once; each call (a lambda per decision) is one forward pass.

    A model scoring by features chooses among the rows of `table` [T, F] (the training table, whose rows the
    logged actions are; default: the model's own), so a logged bundle is compared with its choice among bundles;
    a model by index among its K actions (`table` is then not given)."""

    def __init__(self, artifact: Artifact, logs: Logs, batch_size: int = 4096, table: np.ndarray | None = None) -> None:
        m = artifact.manifest
        self.module = load_scripted(artifact.model_path)
        self.table = scoring_table(artifact, self.module, table)
        traj = build_trajectories(logs, m.context_length)
        windows = traj.windows(loss_on_every_step=False)  # one window ending at every row, in row order
        zero = np.zeros(len(windows))
        # the inputs of each batch (the decision's own action is 0, as the service sends it), lambda aside
        self.batches = [
            make_batch(
                traj,
                windows[i : i + batch_size],
                "value",
                zero[i : i + batch_size],
                m.initial_rtg,
                m.initial_ctg,
                m.max_timestep,
            ).inputs
            for i in range(0, len(windows), batch_size)
        ]
        self.n = logs.n_rows

    def __call__(self, lam: np.ndarray) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.int64)
        start = 0
        at = NAMES.index("lam")
        with torch.inference_mode():
            for inputs in self.batches:
                size = len(inputs[0])
                given = list(inputs)
                given[at] = torch.from_numpy(np.asarray(lam[start : start + size], dtype=np.float32))
                scores = self.module(*given) if self.table is None else self.module.catalog_scores(*given, self.table)
                out[start : start + size] = scores.argmax(dim=1).numpy()
                start += size
        return out


def scoring_table(artifact: Artifact, module: torch.nn.Module, table: np.ndarray | None) -> torch.Tensor | None:
    """The action table a model chooses among: `table` (default: the model's own) for a model scoring by
    features; None for a model by index (ValueError if a table is given for it)."""
    if not artifact.manifest.action_features:
        if table is not None:
            raise ValueError(f"model {artifact.version} scores coupons by index: it takes no action table")
        return None
    if table is None:
        scripted: Any = module
        return torch.as_tensor(scripted.model.action_table).clone()
    return torch.from_numpy(np.asarray(table, np.float32))


def greedy_actions(
    artifact: Artifact, logs: Logs, lam: np.ndarray, batch_size: int = 4096, table: np.ndarray | None = None
) -> np.ndarray:
    """The model's choice at every logged decision at each decision's lambda (see `ModelChoices`)."""
    return ModelChoices(artifact, logs, batch_size, table)(lam)


def direct_model(env: LogEnvironment, logs: Logs) -> tuple[np.ndarray, np.ndarray]:
    """The learned environment's expected reward and cost [N, K] of every action at every logged decision, from
    the decision's features and the user's logged history as the environment summarises it."""
    from offline.env import history_summaries, response_features

    coupons, purchases, face, position = history_summaries(logs, env.relative_face)
    p, reward, cost = env.response.predict_parts(response_features(logs.features, coupons, purchases, face, position))
    cost[:, 0] = 0.0  # no coupon costs nothing
    return p * reward, p * cost


@dataclass
class Evidence:
    """One part of the gate's evidence: the logs of some users (whole trajectories: the models' context), the rows
    among them that are evidence (the others are context only), aligned rows of their logging `table` (lambda,
    probability, holdout), the candidate that never trained on the evidence rows and the direct model (the
    environment learned without them; None: IPS)."""

    candidate: Artifact
    logs: Logs
    table: pa.Table
    rows: np.ndarray  # [logs.n_rows] bool
    env: LogEnvironment | None = None

    def __post_init__(self) -> None:
        if self.table.num_rows != self.logs.n_rows or self.rows.shape != (self.logs.n_rows,):
            raise ValueError(
                f"logs ({self.logs.n_rows} rows), table ({self.table.num_rows}) and rows {self.rows.shape} must align"
            )


def logged_decisions(part: Evidence, doubly_robust: bool = True) -> tuple[LoggedDecisions, np.ndarray]:
    """The decisions of `part` that are evidence (its rows, less the holdout group's: their action was not the
    policy's), and the mask of those rows."""
    table = part.table
    lam = table.column("lambda").to_numpy(zero_copy_only=False).astype(np.float64)
    probability = table.column("probability").to_numpy(zero_copy_only=False).astype(np.float64)
    scored = part.rows & ~table.column("holdout").to_numpy(zero_copy_only=False).astype(bool)
    expected_reward = expected_cost = None
    if part.env is not None and doubly_robust:
        q_r, q_c = direct_model(part.env, part.logs)
        expected_reward, expected_cost = q_r[scored], q_c[scored]
    logs = part.logs
    decisions = LoggedDecisions(
        action=logs.action[scored],
        probability=probability[scored],
        reward=logs.reward[scored],
        cost=logs.cost[scored],
        lam=lam[scored],
        expected_reward=expected_reward,
        expected_cost=expected_cost,
    )
    return decisions, scored


def _concatenate(parts: list[LoggedDecisions]) -> LoggedDecisions:
    direct = all(p.expected_reward is not None for p in parts)

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    return LoggedDecisions(
        action=cat("action"),
        probability=cat("probability"),
        reward=cat("reward"),
        cost=cat("cost"),
        lam=cat("lam"),
        expected_reward=cat("expected_reward") if direct else None,
        expected_cost=cat("expected_cost") if direct else None,
    )


def off_policy_comparison(
    parts: list[Evidence],
    incumbent: Artifact,
    cfg: GateConfig,
    target_cost: float | None = None,
    table: np.ndarray | None = None,
) -> OffPolicyComparison:
    """`compare_at_equal_spend` of the candidates (each on its own part of the evidence: together, one policy)
    and the incumbent on every part. `table`: for models scoring by features, the training table whose rows the
    logged actions are; both models choose among its rows."""
    if not parts:
        raise ValueError("the gate needs evidence")
    scored_parts = [logged_decisions(p, cfg.doubly_robust) for p in parts]
    decisions = _concatenate([d for d, _ in scored_parts])
    sizes = [d.n for d, _ in scored_parts]
    bounds = np.cumsum([0, *sizes])

    def choices(models: list[ModelChoices]) -> Choices:
        def at(lam: np.ndarray) -> np.ndarray:
            out = []
            for k, (model, (_, scored)) in enumerate(zip(models, scored_parts, strict=True)):
                full = np.zeros(len(scored))
                full[scored] = lam[bounds[k] : bounds[k + 1]]  # rows that are not evidence: context only
                out.append(model(full)[scored])
            return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

        return at

    candidates = choices([ModelChoices(p.candidate, p.logs, table=table) for p in parts])
    incumbents = choices([ModelChoices(incumbent, p.logs, table=table) for p in parts])
    return compare_at_equal_spend(decisions, candidates, incumbents, cfg, target_cost)


def environment_values(
    artifacts: dict[str, Artifact],
    env: LogEnvironment,
    lam: float,
    users: int | None = None,
    seed: int = 0,
    spend_low: float = 0.98,
    table: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Each model's value (revenue - lam * cost), revenue, cost per user and lambda in the learned environment:
    the incumbent at `lam`, the candidate at the lambda whose simulated spend meets the incumbent's (within
    [spend_low, 1]). Each model chooses among the actions the logs hold (the learned environment has no response
    for the others, as a campaign offers only its own coupons): models scoring by features among the rows of
    `table` (the training table, whose rows the environment's actions are) that the logs hold."""
    from offline.calibrate import BudgetUnreachable, search_monotone
    from offline.rollout import SequencePolicy, rollout

    def run(artifact: Artifact) -> Callable[[float], tuple[float, float]]:
        module = load_scripted(artifact.model_path)
        rows = scoring_table(artifact, module, table)
        policy = SequencePolicy.of_artifact(
            artifact, module, offered=env.logged_actions, action_table=None if rows is None else rows.numpy()
        )

        def per_user(at: float) -> tuple[float, float]:
            r = rollout(env, policy, at, n_users=users, seed=seed)
            return r.revenue / r.users, r.cost / r.users

        return per_user

    def entry(revenue: float, cost: float, at: float) -> dict[str, float]:
        return {"value": revenue - lam * cost, "revenue": revenue, "cost": cost, "lambda": at}

    inc_revenue, inc_cost = run(artifacts["incumbent"])(lam)
    candidate = run(artifacts["candidate"])
    first = candidate(lam)
    cand = entry(*first, lam)
    if not spend_low * inc_cost <= first[1] <= inc_cost:
        try:
            found = search_monotone(candidate, inc_cost, target_low=spend_low)
            cand = entry(found.revenue, found.cost, found.lam)
        except BudgetUnreachable as exc:
            cand = entry(*candidate(exc.lam), exc.lam)
    return {"candidate": cand, "incumbent": entry(inc_revenue, inc_cost, lam)}


@dataclass
class GateResult:
    promote: bool
    reasons: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)


def _not_worse(candidate: float, incumbent: float, revenue: float, tolerance: float) -> bool:
    """Whether the candidate's value is at least the incumbent's less `tolerance` of the incumbent's revenue."""
    return candidate >= incumbent - tolerance * abs(revenue)


def decide(comparison: OffPolicyComparison, env: dict[str, dict[str, float]] | None, cfg: GateConfig) -> GateResult:
    """Promote or refuse the candidate, with every reason (see the module docstring)."""
    cand, inc, difference = comparison.candidate, comparison.incumbent, comparison.difference
    lam_ref = comparison.lam_ref
    cand_value, inc_value = cand.estimate.value(lam_ref), inc.value(lam_ref)
    reasons: list[str] = []
    ok = True
    allowed = -cfg.tolerance * abs(inc.revenue)
    if not cand.estimate.ess >= cfg.min_ess:
        ok = False
        reasons.append(
            f"too little evidence: the candidate matches {cand.estimate.matches} logged decisions "
            f"(effective sample size {cand.estimate.ess:.1f} < {cfg.min_ess:g})"
        )
    elif not difference.lower >= allowed:
        ok = False
        reasons.append(
            f"off-policy lower bound of candidate minus incumbent {difference.lower:.4f} per decision at equal "
            f"spend is below the tolerance {allowed:.4f} ({cfg.tolerance:.0%} of the incumbent's revenue "
            f"{inc.revenue:.4f}): the candidate ({cand_value:.4f} against {inc_value:.4f}) may be worse than the "
            "incumbent"
        )
    else:
        reasons.append(
            f"off-policy lower bound of candidate minus incumbent {difference.lower:.4f} per decision at equal "
            f"spend >= {allowed:.4f} ({cfg.tolerance:.0%} of the incumbent's revenue {inc.revenue:.4f})"
        )
    if not cand.matched:
        reasons.append(f"the candidate's spend could not be matched to the incumbent's: {cand.reason}")
    if env is not None:
        c, i, revenue = env["candidate"]["value"], env["incumbent"]["value"], env["incumbent"]["revenue"]
        if _not_worse(c, i, revenue, cfg.tolerance):
            reasons.append(
                f"learned environment at equal spend: value per user {c:.4f} >= incumbent {i:.4f} minus "
                f"{cfg.tolerance:.0%} of its revenue {revenue:.4f}"
            )
        else:
            ok = False
            reasons.append(
                f"learned environment at equal spend: value per user {c:.4f} is below the incumbent's {i:.4f} "
                f"by more than the tolerance, {cfg.tolerance:.0%} of its revenue {revenue:.4f}"
            )
    metrics: dict[str, Any] = {
        "off_policy": {
            "candidate": cand.estimate.to_json(lam_ref, cfg.z),
            "incumbent": inc.to_json(lam_ref, cfg.z),
        },
        "off_policy_difference": {
            **difference.to_json(),
            # relative to the incumbent's revenue per decision: what the tolerance is a share of
            "relative": difference.difference / abs(inc.revenue) if inc.revenue else None,
            "relative_stderr": difference.stderr / abs(inc.revenue) if inc.revenue else None,
        },
        "operating_point": comparison.to_json(cfg.z),
        "tolerance": cfg.tolerance,
    }
    if env is not None:
        metrics["environment"] = env
    return GateResult(ok, reasons, metrics)


def gate_candidate(
    parts: list[Evidence],
    incumbent: Artifact,
    cfg: GateConfig,
    *,
    environment_check: bool = True,
    target_cost: float | None = None,
    seed: int = 0,
    table: np.ndarray | None = None,
) -> GateResult:
    """The gate on the evidence `parts` (see `off_policy_comparison`); the learned environment check runs the
    first part's candidate (the one published) in that part's environment (None: no environment check).
    `table`: for models scoring by features, the training table (the rows the logged actions are)."""
    comparison = off_policy_comparison(parts, incumbent, cfg, target_cost, table)
    env_values = None
    first = parts[0]
    if environment_check and first.env is not None:
        artifacts = {"candidate": first.candidate, "incumbent": incumbent}
        env_values = environment_values(artifacts, first.env, comparison.lam_ref, seed=seed, table=table)
    return decide(comparison, env_values, cfg)
