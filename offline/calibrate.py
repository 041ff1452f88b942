"""Lambda calibration (Algorithm 2): find lambda so that the population's spend is close to, and never
above, the budget B.

`simulate(lam)` runs the whole population through the policy at `lam` and returns its revenue and cost.
Three searches:
- `search_monotone` (default): spend never increases with lambda (an argmax of r - lambda c picks a
  cheaper or equal action as lambda grows), so bracket + safeguarded false position (on log spend)
  finds the target in a handful of passes. The answer is always the bracket's feasible end: C <= B by construction.
- `search_slsqp`: the paper's Algorithm 2, SLSQP on lambda (C - B)^+ - R with noise restarts and the
  dynamic adjustment lambda += lr (C - B). Kept for comparison; the spend curve is piecewise constant,
  so SLSQP's finite-difference gradients are often zero and it needs many more passes.
- `search_reserved`: the policy runs behind the service's `strict` ledger, which by itself keeps spend
  under B at every lambda: a low lambda then spends the budget on whoever asks first and refuses later
  users, a high one leaves money unspent. It returns the lambda whose simulated revenue through the
  ledger is highest among those whose spend is not above B: a scan over a factor-of-two span around a
  starting lambda (the spend-matching one), widened while the best point sits at its edge, then golden
  section between the best point's neighbours.

`calibrate_artifact` (`saco calibrate`) runs the exported policy in the environment learned from the
logs, the policy observing sampled outcomes drawn from seeded common random numbers, so the same store,
logs, budget, user count and seed give the same lambda bit for bit.

A model that scores coupons and bundles by their features (its manifest's `action_features`) reads the logs'
actions as the rows of its own action table (what it was trained on: no coupon, each coupon alone, the bundles
of several coupons its training logs held): the environment learns a response for every row the logs hold, and
the policy chooses among those rows, so a model trained on bundle logs is calibrated granting bundles.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize

if TYPE_CHECKING:
    from model_store import Artifact, ModelStore
    from offline.env import LogEnvironment
    from offline.logs import Logs
    from offline.rollout import Environment, SequencePolicy
    from offline.windows import Spread

TARGET_LOW = 0.98  # BARate = C / B target band [0.98, 1.00]
RESERVATIONS = ("strict", "none")


class BudgetUnreachable(RuntimeError):
    """Even the largest lambda tried leaves the policy's spend above the budget."""

    def __init__(self, lam: float, cost: float, budget: float) -> None:
        super().__init__(f"spend is {cost:.2f} at lambda {lam:g}, above the budget {budget:.2f}")
        self.lam, self.cost, self.budget = lam, cost, budget

    def advice(self, policy: str) -> str:
        """One line naming the policy, what it spends at the largest lambda against the budget, and what
        to change."""
        return (
            f"{policy} cannot be brought under the budget: it still spends {self.cost:.2f} at lambda "
            f"{self.lam:g} (the largest tried) against a budget of {self.budget:.2f}; raise the budget, "
            "simulate more users (or train longer), or lower the coupons' costs (a policy that still gives "
            "coupons however high lambda prices them has a spend floor)"
        )


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
            raise BudgetUnreachable(hi.lam, hi.cost, budget)
        lo, hi = hi, f(hi.lam * 4.0)
    # invariant: lo.cost > budget >= hi.cost; answer = hi
    # false position on the log of spend (spend falls roughly exponentially with lambda) toward the
    # middle of the band; Illinois-style: an end kept several times running has its weight halved each
    # time, so the bracket shrinks from both sides
    target = (1.0 + target_low) / 2.0 * budget

    def g(cost: float) -> float:
        return math.log(max(cost, 1e-3 * target, 1e-12))

    weight_lo = weight_hi = 1.0
    while hi.cost < target_low * budget and len(f.history) < max_passes:
        if hi.lam - lo.lam <= 1e-9 * max(1.0, hi.lam):
            break
        dl, dh = (g(lo.cost) - g(target)) * weight_lo, (g(target) - g(hi.cost)) * weight_hi
        lam = lo.lam + (hi.lam - lo.lam) * dl / (dl + dh) if dl + dh > 0 else (lo.lam + hi.lam) / 2
        span = hi.lam - lo.lam
        lam = min(max(lam, lo.lam + 0.02 * span), hi.lam - 0.02 * span)
        mid = f(lam)
        if mid.cost > budget:
            lo, weight_lo, weight_hi = mid, 1.0, weight_hi * 0.5
        else:
            hi, weight_hi, weight_lo = mid, 1.0, weight_lo * 0.5
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


GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def search_reserved(
    simulate: Simulator,
    budget: float,
    start: float,
    *,
    lam_max: float = 1e4,
    refine_passes: int = 8,
    progress: Callable[[Evaluation], None] | None = None,
) -> CalibrationResult:
    """Most revenue at spend <= B when the ledger itself rations coupons (see the module docstring).
    `start` > 0 is where the scan is centred. `converged`: the best lambda is interior to the bracket it
    was refined in (not at 0 or `lam_max`)."""
    if budget < 0 or not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number >= 0, got {budget}")
    f = _Counter(simulate, progress)
    start = min(max(start, 1e-3), lam_max)

    def value(ev: Evaluation) -> float:
        return ev.revenue if ev.cost <= budget else -math.inf

    step = math.sqrt(2.0)
    grid = [f(min(start * step**k, lam_max)) for k in range(-2, 3)]
    while True:
        best = max(range(len(grid)), key=lambda i: (value(grid[i]), grid[i].cost))
        if best == 0 and grid[0].lam > 0:
            lower = grid[0].lam / step
            grid.insert(0, f(lower if lower > 1e-3 else 0.0))
        elif best == len(grid) - 1 and grid[-1].lam < lam_max:
            grid.append(f(min(grid[-1].lam * step, lam_max)))
        else:
            break
    if value(grid[best]) == -math.inf:
        raise BudgetUnreachable(grid[-1].lam, grid[-1].cost, budget)
    lo = grid[max(best - 1, 0)].lam
    hi = grid[min(best + 1, len(grid) - 1)].lam
    champion = grid[best]
    # golden section on [lo, hi] (revenue through the ledger is unimodal there in practice)
    a, b = lo + (1 - GOLDEN) * (hi - lo), lo + GOLDEN * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(refine_passes - 2):
        if value(fa) >= value(fb):
            hi, b, fb = b, a, fa
            a = lo + (1 - GOLDEN) * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + GOLDEN * (hi - lo)
            fb = f(b)
    for ev in (fa, fb):
        if (value(ev), ev.cost) > (value(champion), champion.cost):
            champion = ev
    converged = 0.0 < champion.lam < lam_max
    return CalibrationResult(
        champion.lam,
        champion.revenue,
        champion.cost,
        budget,
        len(f.history),
        "reserved",
        converged,
        f.history,
    )


def spend_table(simulate: Simulator, lams: list[float]) -> list[Evaluation]:
    """Spend and revenue over a lambda grid (the calibration's lambda table, the spend-vs-lambda plot)."""
    out = []
    for lam in lams:
        revenue, cost = simulate(lam)
        out.append(Evaluation(float(lam), float(revenue), float(cost)))
    return out


def own_action_table(module: Any) -> np.ndarray:
    """[T, F] float32: the action table of an exported policy that scores by features (the rows it trained on)."""
    import torch

    return np.asarray(torch.as_tensor(module.model.action_table).numpy(), np.float32).copy()


def policy_in_environment(
    artifact: Artifact, data: Logs, *, seed: int = 0, log: Callable[[str], None] | None = None
) -> tuple[LogEnvironment, SequencePolicy]:
    """The environment learned from `data` and the exported policy of `artifact` that runs in it, as `saco
    calibrate` runs them: a model scoring by features chooses among the rows of its own table that the logs hold
    (the logged actions are its rows; the environment has no response for the others). ValueError for logs the
    model cannot read (other features, an action beyond its table's rows)."""
    from model_store import load_scripted
    from offline.env import LogEnvironment
    from offline.rollout import SequencePolicy

    m = artifact.manifest
    if data.feature_dim != m.feature_dim:
        raise ValueError(f"logs have {data.feature_dim} features, model {artifact.version} expects {m.feature_dim}")
    module = load_scripted(artifact.model_path)
    rows = own_action_table(module) if m.action_features else None
    if rows is not None and data.num_actions > len(rows):
        raise ValueError(
            f"the logs hold action {data.num_actions - 1}, beyond the {len(rows)} rows of model {artifact.version}'s "
            "action table (a model scoring by features reads the logged actions as the rows of the table it "
            "trained on)"
        )
    env = LogEnvironment.fit(data, seed=seed, log=log, num_actions=None if rows is None else len(rows))
    policy = SequencePolicy.of_artifact(
        artifact, module, offered=None if rows is None else env.logged_actions, action_table=rows
    )
    return env, policy


def calibrate_artifact(
    store: ModelStore,
    data: Logs,
    budget: float,
    *,
    version: str | None = None,
    users: int | None = None,
    method: str = "monotone",
    reservation: str = "none",
    request_size: int = 128,
    seed: int = 0,
    progress: Callable[[str, Evaluation], None] | None = None,
    log: Callable[[str], None] | None = None,
    command: str = "calibrate_artifact",
) -> dict[str, Any]:
    """`saco calibrate`: run the exported policy through the environment learned from `data`, find lambda
    for `budget`, and record it (plus a spend-vs-lambda table and the expected-cost ratios) as a new
    calibration of the version, its active one (`model_store.calibrations`; `command` says what made it).
    The version's published files are left as they are.

    `reservation` "none" (the default) returns the lambda whose spend without any ledger matches the
    budget: what a service that paces toward its plan, or reserves expected costs, spends. "strict"
    simulates the service's strict ledger (coupons reserve their face value, the mean logged cost of a
    redeemed coupon of that action, until the outcome settles at the end of the round; users arrive in
    random order in requests of `request_size`) and returns the lambda that earns most through it.
    The lambda table is the spend without a ledger (it does not depend on the budget).
    `progress(phase, evaluation)` is told of every simulation pass as it ends."""
    from model_store import LambdaPoint
    from offline.rollout import StrictReservation, rollout

    if reservation not in RESERVATIONS:
        raise ValueError(f"reservation must be one of {', '.join(RESERVATIONS)}, got {reservation!r}")
    say = log or (lambda _msg: None)
    artifact = store.load(version)
    m = artifact.manifest
    env, policy = policy_in_environment(artifact, data, seed=seed, log=say)
    n_users = users or data.n_users
    prices = face_values(data)
    ledger = StrictReservation(budget, prices, request_size=request_size, seed=seed)

    def simulate_free(lam: float) -> tuple[float, float]:
        r = rollout(env, policy, lam, n_users=n_users, seed=seed)
        return r.revenue, r.cost

    def simulate_strict(lam: float) -> tuple[float, float]:
        r = rollout(env, policy, lam, n_users=n_users, seed=seed, reservation=ledger)
        return r.revenue, r.cost

    def told(phase: str) -> Callable[[Evaluation], None] | None:
        return None if progress is None else (lambda ev: progress(phase, ev))

    say(f"simulating {n_users} users x {env.rounds} rounds per pass; searching lambda for the spend without a ledger")
    search = search_slsqp if method == "slsqp" else search_monotone
    free: CalibrationResult | None
    try:
        free = search(simulate_free, budget, progress=told("no ledger"))
    except BudgetUnreachable as exc:
        if reservation == "none":
            raise RuntimeError(exc.advice(f"model {artifact.version}")) from exc
        free = None  # the ledger alone keeps spend under the budget: search through it from the largest lambda
        start = exc.lam
    result = free
    if reservation == "strict":
        if free is not None:
            start = free.lam if free.lam > 0 else 1.0
        say(
            f"searching the lambda that earns most through the strict ledger "
            f"(coupon face values {', '.join(f'{p:g}' for p in prices[1:])})"
        )
        try:
            result = search_reserved(simulate_strict, budget, start, progress=told("strict ledger"))
        except BudgetUnreachable as exc:
            raise RuntimeError(exc.advice(f"model {artifact.version}")) from exc
    assert result is not None
    grid = sorted({0.0, *(result.lam * f for f in (0.25, 0.5, 1.0, 2.0, 4.0) if result.lam > 0)})
    free_points = {e.lam: e for e in (free.history if free is not None else [])}
    missing = [lam for lam in grid if lam not in free_points]
    say(f"spend-vs-lambda table without a ledger: {len(missing)} more passes")
    for lam in missing:
        ev = spend_table(simulate_free, [lam])[0]
        free_points[lam] = ev
        if progress is not None:
            progress("table", ev)
    table = [LambdaPoint(lam, free_points[lam].cost / n_users, free_points[lam].revenue / n_users) for lam in grid]
    summary = {
        "reservation": reservation,
        "budget": budget,
        "lambda": result.lam,
        "predicted_spend": result.cost,
        "predicted_revenue": result.revenue,
        "lambda_without_ledger": free.lam if free is not None else None,
        "users": n_users,
        "seed": seed,
    }
    cost_ratios: list[float] = []
    if m.score_terms:
        say(f"expected-cost ratios per decision index at lambda {result.lam:.4g}: one more pass")
        cost_ratios = expected_cost_ratios(env, policy, result.lam, n_users, seed)
        say(f"expected-cost ratios: {', '.join(f'{r:.3f}' for r in cost_ratios)}")
    summary["cost_ratios"] = cost_ratios
    calibration = _record(store, artifact.version, command, result, table, {**summary, "env_fit": env.fit_metrics})
    return {
        **result.to_json(),
        "reservation": reservation,
        "lambda_without_ledger": summary["lambda_without_ledger"],
        "users": n_users,
        "seed": seed,
        "version": artifact.version,
        "calibration": calibration,
    }


def _record(
    store: ModelStore,
    version: str,
    command: str,
    result: CalibrationResult,
    table: list[Any],
    details: dict[str, Any],
) -> str:
    """The calibration recorded as the version's active one (`details` with the budget, users and cost ratios);
    its id."""
    calibrated = store.calibrate(
        version,
        command=command,
        lam=result.lam,
        budget=details["budget"],
        users=details["users"],
        lambda_table=table,
        cost_ratios=details["cost_ratios"],
        details={**details, "method": result.method},
    )
    assert calibrated.calibration is not None
    return calibrated.calibration.id


COST_RATIO_BOUNDS = (0.5, 2.0)  # a correction beyond these says the environment, not the policy, is off


def expected_cost_ratios(env: Environment, policy: SequencePolicy, lam: float, n_users: int, seed: int) -> list[float]:
    """Per round of the environment: its expected cost of the coupons `policy` chooses at `lam` over the
    policy's own expected cost now of them. The policy's expected costs are off by round (how much history a
    user has) and, being the ones its argmax favours, low where it under-predicts; the service corrects the
    expected costs it reserves and paces with by these ratios before any outcome has settled."""
    return cost_ratios(*round_costs(env, policy, lam, n_users, seed))


def round_costs(
    env: Environment, policy: SequencePolicy, lam: float, n_users: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per round: the policy's expected cost now of the coupons it chooses at `lam`, and the environment's."""
    from offline.rollout import SequencePolicy, rollout

    class Tracking(SequencePolicy):
        def act(
            self, features: np.ndarray, t: int, lam: float, expected: tuple[np.ndarray, np.ndarray] | None = None
        ) -> np.ndarray:
            actions = super().act(features, t, lam, expected)
            predicted[t] = float(self.expected_costs_now(lam)[np.arange(len(actions)), actions].sum())
            return actions

    predicted = np.zeros(env.rounds)
    table = None if policy.action_table is None else policy.action_table.numpy()
    tracking = Tracking(
        policy.module,
        policy.L,
        policy.initial_rtg,
        policy.initial_ctg,
        policy.d,
        offered=policy.offered,
        action_table=table,
    )
    result = rollout(env, tracking, lam, n_users=n_users, seed=seed)
    return predicted, result.cost_by_round


def cost_ratios(predicted: np.ndarray, actual: np.ndarray) -> list[float]:
    """`expected_cost_ratios` of per-round predicted and actual costs, clipped to COST_RATIO_BOUNDS."""
    low, high = COST_RATIO_BOUNDS
    ratios = np.where(predicted > 0, actual / np.maximum(predicted, 1e-12), 1.0)
    return [round(float(r), 6) for r in np.clip(ratios, low, high)]


def face_values(data: Logs) -> list[float]:
    """Each action's face value as the logs show it: the mean cost of its rows that cost anything (a
    redeemed coupon costs its face value); 0 for no coupon or an action never seen redeemed."""
    num_actions = max(data.num_actions, 2)
    out = [0.0]
    for a in range(1, num_actions):
        paid = data.cost[(data.action == a) & (data.cost > 0)]
        out.append(float(paid.mean()) if len(paid) else 0.0)
    return out


# ---- calibration over window shards ------------------------------------------------------------------------
# `calibrate_shards` (`saco calibrate --windows DIR`) reads the user-sharded windows of offline/windows.py
# instead of a whole log. Every step is a map over shards, in worker processes, and a reduce in shard order:
#
# 1. each shard gives the rows of a seeded sample of its users for the response model (about `fit_rows` rows
#    over all shards), and writes the replay (features by user and step) of the users it simulates to a
#    scratch file; the environment is fitted once on the reduced sample (offline/env.py);
# 2. every simulation pass at a lambda runs each shard's simulated users (in chunks of SHARD_CHUNK_USERS,
#    each seeded by (seed, shard, chunk)) and sums revenue and spend, shard by shard in shard order.
#
# What a worker computes depends on its shard alone (one torch thread per worker), so the lambda is the same
# bits whatever the number of workers. Memory: a worker holds one shard's arrays, then one chunk's rollout.

SHARD_CHUNK_USERS = 65_536
FIT_ROWS = 100_000  # rows of the seeded sample of users the response model is fitted on


@dataclass(frozen=True)
class _Policy:
    """What a worker needs to load the exported policy."""

    model_path: str
    context_length: int
    initial_rtg: float
    initial_ctg: float
    feature_dim: int
    offered: tuple[bool, ...] | None = None  # by features: the rows of its own table it chooses among


@dataclass(frozen=True)
class _ShardTask:
    shard: int
    path: str
    simulate: int  # users of the shard simulated (drawn with replacement where `replace`)
    fit: int  # users whose rows go into the response model's sample
    replace: bool
    seed: int
    replay: str  # the scratch file of the simulated users' replay


@dataclass(frozen=True)
class _Prepared:
    shard: int
    fit_logs: Logs | None
    max_length: int
    max_action: int
    users: int


@dataclass(frozen=True)
class _PassTask:
    shard: int
    replay: str
    lam: float
    seed: int
    environment: str  # the pickled environment's file
    policy: _Policy
    ratios: bool = False


@dataclass
class _Pass:
    """One shard's simulation at one lambda (or the reduce of several, in shard order)."""

    revenue: float = 0.0
    cost: float = 0.0
    user_revenue: Spread | None = None  # of the simulated users' revenue (and cost) over the rounds
    user_cost: Spread | None = None
    predicted_by_round: np.ndarray | None = None
    cost_by_round: np.ndarray | None = None

    def add(self, other: _Pass) -> None:
        from offline.windows import Spread

        self.revenue += other.revenue
        self.cost += other.cost
        for name in ("user_revenue", "user_cost"):
            mine = getattr(self, name) or Spread()
            mine.merge(getattr(other, name) or Spread())
            setattr(self, name, mine)
        for name in ("predicted_by_round", "cost_by_round"):
            theirs = getattr(other, name)
            if theirs is not None:
                mine = getattr(self, name)
                setattr(self, name, theirs.copy() if mine is None else mine + theirs)


def _apportion(total: int, weights: list[int]) -> list[int]:
    """`total` split over parts in proportion to `weights` (largest remainders; ties to the earlier part)."""
    w = np.asarray(weights, dtype=np.float64)
    if total <= 0 or w.sum() <= 0:
        return [0] * len(weights)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    extra = np.argsort(-(exact - out), kind="stable")[: total - int(out.sum())]
    out[extra] += 1
    return [int(x) for x in out]


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _shard_logs(path: str) -> Logs:
    """A shard's logged rows, read back from its windows: each logged step is in exactly one window's loss,
    in user and step order; rewards and costs in the cents the history holds."""
    from offline.logs import Logs

    with np.load(path, allow_pickle=False) as data:
        owned = data["loss_mask"]
        user = np.repeat(data["window_user"], owned.sum(axis=1))
        user_ids = data["user_ids"]
        return Logs(
            user=user.astype(np.int64),
            user_ids=user_ids,
            t=data["timesteps"][owned],
            action=data["actions"][owned],
            cost=data["cost"][owned] / 100.0,
            reward=data["reward"][owned] / 100.0,
            features=data["states"][owned],
            feature_names=tuple(f"f{i}" for i in range(data["states"].shape[-1])),
            sha256="",
        )


def _prepare_shard(task: _ShardTask) -> _Prepared:
    """Map, step 1: the shard's sample of rows for the response model; its simulated users' replay written."""
    logs = _shard_logs(task.path)
    rng = np.random.default_rng([task.seed, task.shard])
    users = logs.n_users
    if task.simulate == users and not task.replace:
        chosen = np.arange(users)
    else:
        chosen = np.sort(rng.choice(users, size=task.simulate, replace=task.replace))
    replay = logs.subset_users(chosen)
    np.savez(task.replay, user=replay.user, features=replay.features)
    fit_rng = np.random.default_rng([task.seed, task.shard, 1])
    fit = np.sort(fit_rng.choice(users, size=task.fit, replace=False)) if task.fit < users else np.arange(users)
    lengths = np.diff(logs.user_slices()) if logs.n_rows else np.zeros(1, np.int64)
    return _Prepared(
        task.shard,
        logs.subset_users(fit) if task.fit else None,
        int(lengths.max()),
        int(logs.action.max()) if logs.n_rows else 0,
        users,
    )


_WORKER: dict[str, Any] = {}


def _worker_start(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _loaded(task: _PassTask) -> tuple[Any, SequencePolicy]:
    """The worker's environment parts and policy (loaded once per worker)."""
    import pickle

    from model_store import load_scripted
    from offline.rollout import SequencePolicy

    if _WORKER.get("environment_file") != task.environment:
        with open(task.environment, "rb") as fh:
            _WORKER["environment"] = pickle.load(fh)
        _WORKER["environment_file"] = task.environment
    if _WORKER.get("policy_spec") != task.policy:
        p = task.policy
        module = load_scripted(p.model_path)
        offered = None if p.offered is None else np.array(p.offered, bool)
        table = None if p.offered is None else own_action_table(module)
        _WORKER["policy"] = SequencePolicy(
            module,
            p.context_length,
            p.initial_rtg,
            p.initial_ctg,
            p.feature_dim,
            offered=offered,
            action_table=table,
        )
        _WORKER["policy_spec"] = p
    return _WORKER["environment"], _WORKER["policy"]


def _simulate_shard(task: _PassTask) -> _Pass:
    """Map, step 2: one shard's simulated users at one lambda, a chunk of users at a time."""
    from offline.env import LogEnvironment
    from offline.logs import Logs
    from offline.rollout import rollout
    from offline.windows import Spread

    parts, policy = _loaded(task)
    out = _Pass(user_revenue=Spread(), user_cost=Spread())
    with np.load(task.replay, allow_pickle=False) as data:
        user, features = data["user"], data["features"]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(user)) + 1, [len(user)]])
    n_users = len(starts) - 1
    for chunk, first in enumerate(range(0, n_users, SHARD_CHUNK_USERS)):
        last = min(first + SHARD_CHUNK_USERS, n_users)
        rows = slice(int(starts[first]), int(starts[last]))
        n_rows = rows.stop - rows.start
        logs = Logs(  # what the environment replays: the users' features, step by step
            user=user[rows] - user[starts[first]],
            user_ids=np.arange(last - first).astype(str),
            t=np.zeros(n_rows, np.int64),
            action=np.zeros(n_rows, np.int64),
            cost=np.zeros(n_rows),
            reward=np.zeros(n_rows),
            features=features[rows],
            feature_names=(),
            sha256="",
        )
        env = LogEnvironment(logs, parts["response"], parts["relative_face"], parts["rounds"], parts["mean_positive"])
        seed = _seed_of(task.seed, task.shard, chunk)
        part = _Pass()
        if task.ratios:
            part.predicted_by_round, part.cost_by_round = round_costs(env, policy, task.lam, None, seed)
        else:
            r = rollout(env, policy, task.lam, seed=seed)
            part = _Pass(r.revenue, r.cost, Spread.of(r.revenue_by_user), Spread.of(r.cost_by_user))
        out.add(part)
    return out


def calibrate_shards(
    store: ModelStore,
    windows: str | os.PathLike[str],
    budget: float,
    *,
    version: str | None = None,
    users: int | None = None,
    sample: int | None = None,
    fit_rows: int = FIT_ROWS,
    method: str = "monotone",
    workers: int = 1,
    seed: int = 0,
    progress: Callable[[str, Evaluation], None] | None = None,
    log: Callable[[str], None] | None = None,
    command: str = "calibrate_shards",
) -> dict[str, Any]:
    """`saco calibrate --windows DIR`: as `calibrate_artifact` (without a ledger), the environment and the
    simulated users read from the window shards of offline/windows.py, as a map over shards in `workers`
    processes and a reduce.

    `budget` is for `users` users drawn like the windows' users (default: all of them). `sample` users are
    simulated (default: `users`; drawn without replacement where they are no more than the windows' users,
    spread over the shards by their user counts) and their spend and revenue scaled to `users`; the result
    states the sample's size and the standard error of the scaled spend and revenue at the lambda found
    (0 when every user is simulated). The response model is fitted on a seeded sample of about `fit_rows`
    rows. The same windows, options and seed give the same lambda bit for bit, whatever `workers`."""
    import concurrent.futures
    import multiprocessing
    import pickle
    import tempfile

    from model_store import LambdaPoint
    from offline.env import LogEnvironment
    from offline.windows import read_manifest

    say = log or (lambda _msg: None)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if fit_rows < 1:
        raise ValueError(f"fit_rows must be >= 1, got {fit_rows}")
    directory = Path(windows)
    if not (directory / "manifest.json").exists():
        raise ValueError(f"{directory} holds no manifest.json: build the windows with `saco windows` first")
    manifest = read_manifest(directory)
    artifact = store.load(version)
    m = artifact.manifest
    if len(manifest["feature_names"]) != m.feature_dim:
        raise ValueError(
            f"windows have {len(manifest['feature_names'])} features, model {artifact.version} expects {m.feature_dim}"
        )
    shard_users = [int(f["users"]) for f in manifest["files"]]
    logged_users, logged_rows = sum(shard_users), int(manifest["rows"])
    n_users = users or logged_users
    simulated = sample or n_users
    if simulated < 1 or n_users < 1:
        raise ValueError("users and sample must be >= 1")
    replace = simulated > logged_users
    fit_users = min(logged_users, math.ceil(logged_users * min(1.0, fit_rows / max(logged_rows, 1))))
    per_shard = _apportion(simulated, shard_users)
    fit_per_shard = _apportion(fit_users, shard_users)
    scale = n_users / simulated
    from model_store import load_scripted

    rows = len(own_action_table(load_scripted(artifact.model_path))) if m.action_features else None
    context = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="saco-calibrate-") as scratch,
        concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_start, initargs=(1,)
        ) as pool,
    ):
        tasks = [
            _ShardTask(
                k,
                str(directory / f["file"]),
                per_shard[k],
                fit_per_shard[k],
                replace,
                seed,
                f"{scratch}/replay-{k}.npz",
            )
            for k, f in enumerate(manifest["files"])
        ]
        say(
            f"reading {len(tasks)} shards ({logged_rows} rows, {logged_users} users) in {workers} worker(s): "
            f"{simulated} users to simulate, {fit_users} users' rows for the response model"
        )
        prepared = list(pool.map(_prepare_shard, tasks))
        fit_parts = [p.fit_logs for p in prepared if p.fit_logs is not None and p.fit_logs.n_rows]
        fit_logs = _concatenate_logs(fit_parts)
        num_actions = max(max(p.max_action for p in prepared) + 1, 2)
        if rows is not None:  # by features: the rows of the model's own table
            if num_actions > rows:
                raise ValueError(
                    f"the windows hold action {num_actions - 1}, beyond the {rows} rows of model "
                    f"{artifact.version}'s action table"
                )
            num_actions = rows
        env = LogEnvironment.fit(fit_logs, seed=seed, log=say, num_actions=num_actions)
        offered = None if rows is None else tuple(bool(x) for x in env.logged_actions)
        policy = _Policy(
            str(artifact.model_path), m.context_length, m.initial_rtg, m.initial_ctg, m.feature_dim, offered
        )
        rounds = int(min(max(p.max_length for p in prepared), 64))
        parts = {
            "response": env.response,
            "relative_face": env.relative_face,
            "rounds": rounds,
            "mean_positive": env.mean_positive_reward,
        }
        environment = f"{scratch}/environment.pkl"
        with open(environment, "wb") as fh:
            pickle.dump(parts, fh)
        del fit_parts, fit_logs, prepared
        passes: dict[float, _Pass] = {}

        def run(lam: float, ratios: bool = False) -> _Pass:
            shard_tasks = [_PassTask(t.shard, t.replay, lam, seed, environment, policy, ratios) for t in tasks]
            total = _Pass()
            for part in pool.map(_simulate_shard, shard_tasks):  # reduced in shard order
                total.add(part)
            return total

        def simulate_free(lam: float) -> tuple[float, float]:
            passes[lam] = run(lam)
            return passes[lam].revenue * scale, passes[lam].cost * scale

        def told(phase: str) -> Callable[[Evaluation], None] | None:
            return None if progress is None else (lambda ev: progress(phase, ev))

        say(f"simulating {simulated} users x {rounds} rounds per pass, for {n_users} users; searching lambda")
        search = search_slsqp if method == "slsqp" else search_monotone
        try:
            result = search(simulate_free, budget, progress=told("no ledger"))
        except BudgetUnreachable as exc:
            raise RuntimeError(exc.advice(f"model {artifact.version}")) from exc
        grid = sorted({0.0, *(result.lam * f for f in (0.25, 0.5, 1.0, 2.0, 4.0) if result.lam > 0)})
        points = {e.lam: e for e in result.history}
        missing = [lam for lam in grid if lam not in points]
        say(f"spend-vs-lambda table: {len(missing)} more passes")
        for lam in missing:
            points[lam] = spend_table(simulate_free, [lam])[0]
            if progress is not None:
                progress("table", points[lam])
        table = [LambdaPoint(lam, points[lam].cost / n_users, points[lam].revenue / n_users) for lam in grid]
        ratios: list[float] = []
        if m.score_terms:
            say(f"expected-cost ratios per decision index at lambda {result.lam:.4g}: one more pass")
            by_round = run(result.lam, ratios=True)
            assert by_round.predicted_by_round is not None and by_round.cost_by_round is not None
            ratios = cost_ratios(by_round.predicted_by_round, by_round.cost_by_round)
            say(f"expected-cost ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
    chosen = passes[result.lam]
    errors = {
        name: _standard_error(getattr(chosen, f"user_{name}"), n_users, simulated, logged_users, replace)
        for name in ("cost", "revenue")
    }
    summary = {
        "reservation": "none",
        "budget": budget,
        "lambda": result.lam,
        "predicted_spend": result.cost,
        "predicted_revenue": result.revenue,
        "users": n_users,
        "sample_users": simulated,
        "spend_standard_error": errors["cost"],
        "revenue_standard_error": errors["revenue"],
        "fit_rows": env.logs.n_rows,
        "windows": str(directory),
        "seed": seed,
        "cost_ratios": ratios,
    }
    calibration = _record(store, artifact.version, command, result, table, {**summary, "env_fit": env.fit_metrics})
    return {
        **result.to_json(),
        "reservation": "none",
        "users": n_users,
        "sample_users": simulated,
        "spend_standard_error": errors["cost"],
        "revenue_standard_error": errors["revenue"],
        "fit_rows": env.logs.n_rows,
        "workers": workers,
        "seed": seed,
        "version": artifact.version,
        "calibration": calibration,
    }


def _standard_error(spread: Spread | None, n_users: int, simulated: int, logged_users: int, replace: bool) -> float:
    """Standard error of `n_users` x the sample's mean per user: the sample's spread, less the finite
    population's correction where the sample is drawn without replacement (0 when it is every user)."""
    if spread is None or spread.n < 2:
        return 0.0
    sd = math.sqrt(spread.m2 / (spread.n - 1))
    fpc = 1.0 if replace or logged_users < 2 else math.sqrt(max(logged_users - simulated, 0) / (logged_users - 1))
    return float(n_users * sd / math.sqrt(simulated) * fpc)


def _concatenate_logs(parts: list[Logs]) -> Logs:
    """Logs of several groups of users, one after the other (users re-indexed in order)."""
    from offline.logs import Logs

    if not parts:
        raise ValueError("the windows hold no rows")
    offsets = np.cumsum([0] + [p.n_users for p in parts])
    return Logs(
        user=np.concatenate([p.user + offset for p, offset in zip(parts, offsets[:-1], strict=True)]),
        user_ids=np.concatenate([p.user_ids for p in parts]),
        t=np.concatenate([p.t for p in parts]),
        action=np.concatenate([p.action for p in parts]),
        cost=np.concatenate([p.cost for p in parts]),
        reward=np.concatenate([p.reward for p in parts]),
        features=np.concatenate([p.features for p in parts]),
        feature_names=parts[0].feature_names,
        sha256="",
    )
