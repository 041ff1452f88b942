"""Training rows from the exported decision and outcome partitions, with delayed outcomes handled.

The exporter (`loop.logstream`) writes ``decisions/`` and ``outcomes/`` partitions; they are read as
Parquet datasets (one per campaign, so campaigns may differ in feature count), deduplicated by
``decision_id`` (the export is at-least-once) and joined: one row per decision, in the log schema
(``user_id``, ``t``, ``action``, ``cost``, ``reward``, ``f0..``) plus the logging columns.

A conversion may arrive long after its decision, so a decision without an outcome *yet* is not a decision
without a purchase. Three treatments (`DelayConfig.method`):

- ``naive``: every decision without an outcome counts as no purchase (reward 0, cost 0). Biased low:
  recent decisions look like failures.
- ``maturity``: only decisions older than the maturity window ``maturity_ms`` enter training;
  one without an outcome by then counts as no purchase. Each user's trajectory ends at the cutoff.
  Unbiased when the window covers (almost) every delay.
- ``delay-model`` (the default): every decision enters; for one without an outcome yet, the probability that its outcome
  is still to come is estimated with a delay model in the spirit of Chapelle (KDD 2014): per action, an
  outcome probability ``p`` and an exponential delay of rate ``h``, fitted by EM on the converted rows'
  delays and the pending rows' elapsed times. A pending row ``e`` ms old still converts with probability
  ``w = p exp(-h e) / (1 - p + p exp(-h e))``; its reward and cost are ``w`` times the action's mean
  reward and cost given an outcome (their expectation given what is known now).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from contract.catalog import BUNDLE_ACTIONS, dominant
from offline.logs import Logs, LogValidationError, logs_table, validate_table

DELAY_METHODS = ("maturity", "delay-model", "naive")
DAY_MS = 86_400_000
_PARTITIONING = pads.partitioning(pa.schema([("date", pa.string())]), flavor="hive")
_LOGGING_COLUMNS = ("probability", "explored", "holdout", "lambda", "model_version")


@dataclass(frozen=True)
class DelayConfig:
    method: str = "delay-model"
    maturity_ms: int = 7 * DAY_MS  # the maturity window (and what the gate treats as matured traffic)
    em_iterations: int = 200

    def __post_init__(self) -> None:
        if self.method not in DELAY_METHODS:
            raise ValueError(f"delay method must be one of {', '.join(DELAY_METHODS)}, got {self.method!r}")
        if self.maturity_ms < 0:
            raise ValueError("the maturity window must be >= 0")


def is_export_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a directory the exporter wrote (it has a ``decisions/`` partition tree)."""
    return (Path(path) / "decisions").is_dir()


def _campaign_dirs(root: Path, kind: str, campaigns: list[str] | None) -> dict[str, Path]:
    base = root / kind
    found = {p.name.split("=", 1)[1]: p for p in base.glob("campaign=*") if p.is_dir()} if base.is_dir() else {}
    return {c: p for c, p in sorted(found.items()) if campaigns is None or c in campaigns}


def _dedupe(table: pa.Table) -> pa.Table:
    """One row per decision_id (the first; the export repeats a row only identically)."""
    if table.num_rows == 0:
        return table
    ids = np.asarray(table.column("decision_id").to_pylist(), dtype=object).astype(str)
    _, first = np.unique(ids, return_index=True)
    return table.take(pa.array(np.sort(first)))


def read_partitions(root: str | os.PathLike[str], kind: str, campaign: str) -> pa.Table:
    """One campaign's exported `kind` ("decisions" or "outcomes"), read as a dataset, deduplicated."""
    path = Path(root) / kind / f"campaign={campaign}"
    if not path.is_dir():
        return pa.table({})
    dataset = pads.dataset(str(path), format="parquet", partitioning=_PARTITIONING)
    columns = [n for n in dataset.schema.names if n != "date"]
    return _dedupe(dataset.to_table(columns=columns))


def model_actions(decisions: pa.Table, campaign: str) -> np.ndarray:
    """Each exported decision's action as a model that scores single coupons learns it: a bundle of several
    coupons is its dearest coupon (contract/catalog.py `dominant`), as the service's user contexts hold it."""
    action = decisions.column("action").to_numpy().astype(np.int64)
    bundled = np.flatnonzero(action > BUNDLE_ACTIONS)
    if not len(bundled):
        return action
    if "coupons" not in decisions.column_names:
        raise LogValidationError(
            f"campaign {campaign!r}: {len(bundled)} decisions granted bundles, and their partitions lack the "
            "`coupons` column that names their coupons"
        )
    coupons = decisions.column("coupons").to_pylist()
    costs = decisions.column("coupon_costs").to_pylist()
    action = action.copy()
    for i in bundled.tolist():
        action[i] = dominant(list(zip(coupons[i] or [], costs[i] or [], strict=True)))
    return action


def decision_coupons(decisions: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Each exported decision's coupons (list<int64>: [] no coupon, [a] one coupon, several for a bundle of
    several) and their reserved costs (list<float64>, currency units), as its partition holds them; a partition
    without the columns (written before decisions named their coupons) holds single coupons only: its action
    alone at the decision's cost."""
    if "coupons" in decisions.column_names:
        coupons = decisions.column("coupons").combine_chunks().cast(pa.list_(pa.int64()))
        costs = decisions.column("coupon_costs").combine_chunks().cast(pa.list_(pa.float64()))
        return coupons, costs
    action = decisions.column("action").to_numpy().astype(np.int64)
    cost = decisions.column("cost").to_numpy().astype(np.float64)
    given = action > 0
    return (
        pa.array([[int(a)] if g else [] for a, g in zip(action, given, strict=True)], pa.list_(pa.int64())),
        pa.array([[float(c)] if g else [] for c, g in zip(cost, given, strict=True)], pa.list_(pa.float64())),
    )


@dataclass
class LoggedData:
    """Joined decisions of the export: the log-schema table plus what the loop needs to know."""

    table: pa.Table  # one row per decision (see `joined_decisions`)
    now_ms: int
    delay: DelayConfig
    metrics: dict[str, float] = field(default_factory=dict)


def joined_decisions(
    root: str | os.PathLike[str], *, campaigns: list[str] | None = None
) -> tuple[pa.Table, dict[str, int]]:
    """Every exported decision joined with its outcome, if one arrived: the log schema's columns with
    ``reward``/``cost`` the outcome's (NaN when none has arrived), ``face_cost`` the decision's reserved
    cost, ``user_id`` = "<campaign>/<user>" (the service keeps one context per campaign and user), ``t`` the
    decision's rank in its user's trajectory, plus ``decision_id``, ``campaign_id``, ``probability``,
    ``explored``, ``holdout``, ``lambda``, ``model_version``, ``decided_at_ms``, ``outcome_at_ms`` (-1: none),
    ``coupons`` and ``coupon_costs`` (`decision_coupons`). ``action`` is the action of a model that scores coupons
    by index (`model_actions`); a model scoring by features reads ``coupons`` (loop/actions.py)."""
    root = Path(root)
    decision_dirs = _campaign_dirs(root, "decisions", campaigns)
    if not decision_dirs:
        raise LogValidationError(f"no exported decisions under {root / 'decisions'}")
    parts: list[pa.Table] = []
    counts = {"decisions": 0, "outcomes": 0, "orphan_outcomes": 0}
    feature_dim: int | None = None
    for campaign in decision_dirs:
        decisions = read_partitions(root, "decisions", campaign)
        outcomes = read_partitions(root, "outcomes", campaign)
        dim = sum(1 for n in decisions.column_names if n.startswith("f") and n[1:].isdigit())
        if feature_dim is not None and dim != feature_dim:
            raise LogValidationError(f"campaign {campaign!r} has {dim} features, the others {feature_dim}")
        feature_dim = dim
        ids = np.asarray(decisions.column("decision_id").to_pylist(), dtype=object).astype(str)
        n = len(ids)
        reward = np.full(n, np.nan)
        cost = np.full(n, np.nan)
        outcome_at = np.full(n, -1, dtype=np.int64)
        if outcomes.num_rows:
            out_ids = np.asarray(outcomes.column("decision_id").to_pylist(), dtype=object).astype(str)
            order = np.argsort(ids)
            pos = np.searchsorted(ids[order], out_ids)
            pos = np.minimum(pos, n - 1)
            hit = ids[order][pos] == out_ids
            rows = order[pos[hit]]
            reward[rows] = outcomes.column("reward").to_numpy()[hit]
            cost[rows] = outcomes.column("cost").to_numpy()[hit]
            outcome_at[rows] = outcomes.column("outcome_at_ms").to_numpy()[hit]
            counts["outcomes"] += int(hit.sum())
            counts["orphan_outcomes"] += int((~hit).sum())
        counts["decisions"] += n
        users = np.char.add(f"{campaign}/", np.asarray(decisions.column("user_id").to_pylist(), dtype=str))
        features = np.stack([decisions.column(f"f{j}").to_numpy() for j in range(dim)], axis=1)
        extra: dict[str, np.ndarray] = {
            "decision_id": ids,
            "campaign_id": np.full(n, campaign),
            "face_cost": decisions.column("cost").to_numpy(),
            "decided_at_ms": decisions.column("decided_at_ms").to_numpy(),
            "outcome_at_ms": outcome_at,
        }
        for name in _LOGGING_COLUMNS:
            extra[name] = decisions.column(name).to_numpy(zero_copy_only=False)
        part = logs_table(
            users,
            decisions.column("decided_at_ms").to_numpy(),
            model_actions(decisions, campaign),
            cost,
            reward,
            features,
            extra,
        )
        coupons, coupon_costs = decision_coupons(decisions)
        parts.append(part.append_column("coupons", coupons).append_column("coupon_costs", coupon_costs))
    table = pa.concat_tables(parts)
    # t: the decision's rank in its user's trajectory (two decisions may share a millisecond)
    user = np.asarray(table.column("user_id").to_pylist(), dtype=str)
    at = table.column("decided_at_ms").to_numpy()
    ids = np.asarray(table.column("decision_id").to_pylist(), dtype=str)
    order = np.lexsort((ids, at, user))
    table = table.take(pa.array(order))
    user = user[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    rank = np.arange(len(user)) - np.repeat(starts, np.diff(np.r_[starts, len(user)]))
    table = table.set_column(table.column_names.index("t"), "t", pa.array(rank.astype(np.int64)))
    return table, counts


@dataclass(frozen=True)
class DelayFit:
    """Per action: outcome probability and exponential delay rate (per ms)."""

    probability: np.ndarray
    rate_per_ms: np.ndarray

    def pending_probability(self, action: np.ndarray, elapsed_ms: np.ndarray) -> np.ndarray:
        """P(an outcome is still to come | none by `elapsed_ms`)."""
        p, h = self.probability[action], self.rate_per_ms[action]
        survive = p * np.exp(-h * np.maximum(elapsed_ms, 0))
        return survive / np.maximum(1 - p + survive, 1e-12)


def fit_delay_model(
    action: np.ndarray, converted: np.ndarray, delay_ms: np.ndarray, elapsed_ms: np.ndarray, iterations: int = 200
) -> DelayFit:
    """EM for Chapelle's model without features, per action: converted rows contribute their delay,
    pending rows the probability (E-step) that they convert later than their elapsed time."""
    num_actions = int(action.max()) + 1 if len(action) else 1
    p_out, h_out = np.zeros(num_actions), np.zeros(num_actions)
    for a in range(num_actions):
        sel = action == a
        conv, pend = converted[sel], ~converted[sel]
        n, n_conv = int(sel.sum()), int(conv.sum())
        if n == 0 or n_conv == 0:
            continue
        delays, elapsed = delay_ms[sel][conv].astype(np.float64), elapsed_ms[sel][pend].astype(np.float64)
        p, h = n_conv / n, 1.0 / max(float(delays.mean()), 1.0)
        for _ in range(iterations):
            survive = p * np.exp(-h * elapsed)
            w = survive / np.maximum(1 - p + survive, 1e-12)
            p_new = (n_conv + w.sum()) / n
            # the delays of the w rows still pending are longer than `elapsed` by 1/h on average (memoryless)
            h_new = (n_conv + w.sum()) / max(float(delays.sum() + (w * (elapsed + 1.0 / h)).sum()), 1.0)
            done = abs(p_new - p) < 1e-9 and abs(h_new - h) < 1e-15
            p, h = p_new, h_new
            if done:
                break
        p_out[a], h_out[a] = min(p, 1.0), h
    return DelayFit(p_out, h_out)


def label_outcomes(table: pa.Table, now_ms: int, delay: DelayConfig) -> tuple[pa.Table, dict[str, float]]:
    """Rewards and costs for training under `delay`'s treatment of decisions without an outcome yet."""
    reward = table.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
    cost = table.column("cost").to_numpy(zero_copy_only=False).astype(np.float64)
    decided = table.column("decided_at_ms").to_numpy()
    outcome_at = table.column("outcome_at_ms").to_numpy()
    action = table.column("action").to_numpy()
    # an outcome that arrived after `now` is not known yet (a replay of the past at `now`)
    arrived = (outcome_at >= 0) & (outcome_at <= now_ms)
    known_reward, known_cost = np.where(arrived, reward, 0.0), np.where(arrived, cost, 0.0)
    keep = decided <= now_ms
    metrics: dict[str, float] = {"pending": float((~arrived & keep).sum())}
    if delay.method == "maturity":
        keep &= decided <= now_ms - delay.maturity_ms
        metrics["immature_dropped"] = float(((decided <= now_ms) & ~keep).sum())
    elif delay.method == "delay-model":
        elapsed = now_ms - decided
        fit = fit_delay_model(
            action[keep], arrived[keep], (outcome_at - decided)[keep], elapsed[keep], delay.em_iterations
        )
        w = np.where(arrived | ~keep, 0.0, fit.pending_probability(action, elapsed))
        num_actions = len(fit.probability)
        mean_reward, mean_cost = np.zeros(num_actions), np.zeros(num_actions)
        for a in range(num_actions):
            sel = arrived & keep & (action == a)
            if sel.any():
                mean_reward[a], mean_cost[a] = reward[sel].mean(), cost[sel].mean()
        known_reward = known_reward + w * mean_reward[action]
        known_cost = known_cost + w * mean_cost[action]
        metrics["imputed_outcomes"] = float(w.sum())
        for a in range(num_actions):
            metrics[f"delay_mean_days_a{a}"] = float(1 / fit.rate_per_ms[a] / DAY_MS) if fit.rate_per_ms[a] else 0.0
    idx = pa.array(np.flatnonzero(keep))
    out = table.take(idx)
    out = out.set_column(out.column_names.index("reward"), "reward", pa.array(known_reward[keep]))
    out = out.set_column(out.column_names.index("cost"), "cost", pa.array(known_cost[keep]))
    metrics["rows"] = float(out.num_rows)
    return out, metrics


def training_logs(
    root: str | os.PathLike[str],
    *,
    now_ms: int,
    delay: DelayConfig | None = None,
    campaigns: list[str] | None = None,
) -> tuple[Logs, LoggedData]:
    """The exported logs as validated training `Logs` (decisions joined with outcomes, delayed outcomes
    treated by `delay`), and the labelled table with its logging columns (for off-policy evaluation)."""
    delay = delay or DelayConfig()
    joined, counts = joined_decisions(root, campaigns=campaigns)
    labelled, metrics = label_outcomes(joined, now_ms, delay)
    if labelled.num_rows == 0:
        raise LogValidationError(
            f"no decision under {root} is old enough to train on (maturity window {delay.maturity_ms / DAY_MS:g} days)"
        )
    metrics.update({k: float(v) for k, v in counts.items()})
    return validate_table(labelled), LoggedData(labelled, now_ms, delay, metrics)
