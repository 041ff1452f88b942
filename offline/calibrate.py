"""Lambda calibration (Algorithm 2): find lambda so that the population's spend is close to, and never
above, the budget B.

`simulate(lam)` runs the whole population through the policy at `lam` and returns its revenue and cost.
Two searches:
- `search_monotone` (default): spend never increases with lambda (an argmax of r - lambda c picks a
  cheaper or equal action as lambda grows), so bracket + safeguarded false position finds the target in
  a handful of passes. The answer is always the bracket's feasible end: C <= B by construction.
- `search_slsqp`: the paper's Algorithm 2, SLSQP on lambda (C - B)^+ - R with noise restarts and the
  dynamic adjustment lambda += lr (C - B). Kept for comparison; the spend curve is piecewise constant,
  so SLSQP's finite-difference gradients are often zero and it needs many more passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize

if TYPE_CHECKING:
    from model_store import ModelStore
    from offline.logs import Logs

TARGET_LOW = 0.98  # BARate = C / B target band [0.98, 1.00]


@dataclass
class Evaluation:
    lam: float
    revenue: float
    cost: float


@dataclass
class CalibrationResult:
    lam: float
    revenue: float
    cost: float
    budget: float
    passes: int
    method: str
    converged: bool
    history: list[Evaluation] = field(default_factory=list)

    @property
    def barate(self) -> float:
        return self.cost / self.budget if self.budget > 0 else float("nan")

    def to_json(self) -> dict[str, float | int | str | bool | None]:
        return {
            "lambda": self.lam,
            "revenue": self.revenue,
            "cost": self.cost,
            "budget": self.budget,
            "barate": self.barate,
            "roi": self.revenue / self.cost if self.cost > 0 else None,
            "passes": self.passes,
            "method": self.method,
            "converged": self.converged,
        }


Simulator = Callable[[float], tuple[float, float]]


class _Counter:
    def __init__(self, simulate: Simulator, progress: Callable[[Evaluation], None] | None) -> None:
        self.simulate = simulate
        self.progress = progress
        self.history: list[Evaluation] = []
        self.cache: dict[float, Evaluation] = {}

    def __call__(self, lam: float) -> Evaluation:
        lam = float(lam)
        if lam not in self.cache:
            revenue, cost = self.simulate(lam)
            ev = Evaluation(lam, float(revenue), float(cost))
            self.cache[lam] = ev
            self.history.append(ev)
            if self.progress is not None:
                self.progress(ev)
        return self.cache[lam]


def search_monotone(
    simulate: Simulator,
    budget: float,
    *,
    lam_max: float = 1e4,
    max_passes: int = 40,
    target_low: float = TARGET_LOW,
    progress: Callable[[Evaluation], None] | None = None,
) -> CalibrationResult:
    if budget < 0 or not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number >= 0, got {budget}")
    f = _Counter(simulate, progress)

    def done(ev: Evaluation, converged: bool) -> CalibrationResult:
        return CalibrationResult(ev.lam, ev.revenue, ev.cost, budget, len(f.history), "monotone", converged, f.history)

    lo = f(0.0)
    if lo.cost <= budget:  # the budget does not bind: spend everything the policy wants
        return done(lo, lo.cost >= target_low * budget)
    hi = f(1.0)
    while hi.cost > budget:
        if hi.lam >= lam_max or len(f.history) >= max_passes:
            raise RuntimeError(f"no lambda <= {lam_max} brings spend {hi.cost:.2f} under the budget {budget:.2f}")
        lo, hi = hi, f(hi.lam * 4.0)
    # invariant: lo.cost > budget >= hi.cost; answer = hi
    side = 0
    while hi.cost < target_low * budget and len(f.history) < max_passes:
        if hi.lam - lo.lam <= 1e-9 * max(1.0, hi.lam):
            break
        # false position on the target (middle of the band), Illinois-style safeguard against stalling
        target = (1.0 + target_low) / 2.0 * budget
        wl, wh = (0.5 if side == 1 else 1.0), (0.5 if side == -1 else 1.0)
        dl, dh = (lo.cost - target) * wh, (target - hi.cost) * wl
        lam = lo.lam + (hi.lam - lo.lam) * dl / (dl + dh) if dl + dh > 0 else (lo.lam + hi.lam) / 2
        span = hi.lam - lo.lam
        lam = min(max(lam, lo.lam + 0.02 * span), hi.lam - 0.02 * span)
        mid = f(lam)
        if mid.cost > budget:
            lo, side = mid, -1
        else:
            hi, side = mid, 1
    return done(hi, hi.cost >= target_low * budget)


def search_slsqp(
    simulate: Simulator,
    budget: float,
    *,
    max_iterations: int = 30,
    noise: float = 0.1,
    lr: float | None = None,
    lam_max: float = 10.0,
    target_low: float = TARGET_LOW,
    seed: int = 0,
    progress: Callable[[Evaluation], None] | None = None,
) -> CalibrationResult:
    """Algorithm 2 of the paper (SLSQP with noise restarts and dynamic adjustment)."""
    rng = np.random.default_rng(seed)
    f = _Counter(simulate, progress)
    lr = lr if lr is not None else 1.0 / max(budget, 1e-9)  # lambda moves by ~1 per budget overspent

    def objective(x: np.ndarray) -> float:
        ev = f(float(np.clip(x[0], 0.0, lam_max)))
        return ev.lam * max(ev.cost - budget, 0.0) - ev.revenue

    lam = float(rng.uniform(0, 1))
    best: Evaluation | None = None
    for _ in range(max_iterations):
        init = float(np.clip(lam + rng.uniform(-noise, noise), 0.0, lam_max))
        res = minimize(
            objective, np.array([init]), method="SLSQP", bounds=[(0.0, lam_max)], options={"maxiter": 20, "eps": 1e-2}
        )
        lam = float(np.clip(res.x[0], 0.0, lam_max))
        ev = f(lam)
        if ev.cost <= budget and (best is None or ev.revenue > best.revenue):
            best = ev
        if target_low * budget <= ev.cost <= budget:
            break
        lam = float(np.clip(lam + lr * (ev.cost - budget), 0.0, lam_max))
    if best is None:
        feasible = [e for e in f.history if e.cost <= budget]
        if not feasible:
            raise RuntimeError("SLSQP found no lambda within the budget")
        best = max(feasible, key=lambda e: e.revenue)
    return CalibrationResult(
        best.lam, best.revenue, best.cost, budget, len(f.history), "slsqp", best.cost >= target_low * budget, f.history
    )


def spend_table(simulate: Simulator, lams: list[float]) -> list[Evaluation]:
    """Spend and revenue over a lambda grid (the manifest's lambda table, the spend-vs-lambda plot)."""
    out = []
    for lam in lams:
        revenue, cost = simulate(lam)
        out.append(Evaluation(float(lam), float(revenue), float(cost)))
    return out


def calibrate_artifact(
    store: ModelStore,
    data: Logs,
    budget: float,
    *,
    version: str | None = None,
    users: int | None = None,
    method: str = "monotone",
    seed: int = 0,
    progress: Callable[[Evaluation], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`saco calibrate`: run the exported policy through the environment learned from `data`, find lambda
    for `budget`, and record it (plus a spend-vs-lambda table) in the version's manifest."""
    from model_store import LambdaPoint, load_scripted
    from offline.env import LogEnvironment
    from offline.policy import SequencePolicy, rollout

    artifact = store.load(version)
    m = artifact.manifest
    if data.feature_dim != m.feature_dim:
        raise ValueError(f"logs have {data.feature_dim} features, model {artifact.version} expects {m.feature_dim}")
    if log is not None:
        log("fitting the offline environment on the logs...")
    env = LogEnvironment.fit(data)
    policy = SequencePolicy(
        load_scripted(artifact.model_path), m.context_length, m.initial_rtg, m.initial_ctg, m.feature_dim
    )

    def simulate_at(lam: float) -> tuple[float, float]:
        r = rollout(env, policy, lam, n_users=users, seed=seed)
        return r.revenue, r.cost

    search = search_slsqp if method == "slsqp" else search_monotone
    result = search(simulate_at, budget, progress=progress)
    n_users = users or data.n_users
    grid = sorted({0.0, *(result.lam * f for f in (0.25, 0.5, 2.0, 4.0) if result.lam > 0)})
    table = [LambdaPoint(result.lam, result.cost / n_users, result.revenue / n_users)]
    table += [LambdaPoint(e.lam, e.cost / n_users, e.revenue / n_users) for e in spend_table(simulate_at, grid)]
    table.sort(key=lambda p: p.lam)
    store.update_manifest(
        artifact.version,
        lambda_table=table,
        default_lambda=result.lam,
        metrics={**m.metrics, "env_fit": env.fit_metrics},
    )
    return {**result.to_json(), "users": n_users, "version": artifact.version}
