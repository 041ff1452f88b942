"""One run of the learning loop (`saco retrain`) and its schedule (`saco scheduler`).

export new logs -> train a candidate on the training users' logs, in the incumbent's action space -> gate it
against the incumbent (`loop.gate`, on held-out users' decisions, labelled as training labels them) ->
recalibrate every active campaign's lambda from its remaining budget and horizon (admin API) -> publish: the
candidate becomes current in the model store (an atomic pointer swap) and is announced on ``<prefix>models``;
then versions that never were current beyond the newest `keep_refused` are deleted.

The candidate is of the incumbent's kind (`RetrainConfig.by_features`): a model that scores coupons by index, or
one that scores coupons and bundles by their features, trained on the action table of the logs (loop/actions.py),
its logged bundles of several coupons learned as bundles. A run never switches kinds (`model_kind`).

A run that fails or is killed at any step leaves the incumbent current: the candidate is published as a
version that is not current until the last step, and the logs are only ever read (the export acknowledges
what it has written). Each run returns (and the CLI prints) one JSON object: inputs, metrics, decision,
reasons.
"""

from __future__ import annotations

import datetime as dt
import math
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from contract.catalog import Catalog, CatalogError
from loop.actions import TrainingTable, logged_width, training_table, with_rows
from loop.data import DAY_MS, DelayConfig, joined_decisions, label_outcomes
from loop.gate import Evidence, GateConfig, gate_candidate
from model_store import Artifact, ModelStore
from offline.jsonsafe import json_safe
from offline.logs import Logs, LogValidationError, validate_table
from offline.train import TrainConfig, TrainResult, train

if TYPE_CHECKING:
    from offline.env import LogEnvironment

Trainer = Callable[[Logs], TrainResult]


@dataclass
class RetrainConfig:
    logs: Path  # the export directory (written by the exporter, or by this run when redis_url is set)
    store: Path  # the model store
    redis_url: str | None = None  # list campaigns, announce (and export, see `export`); None: none of these
    prefix: str = "saco:"
    export: bool = True  # export the logs first (off where an exporter runs on its own)
    admin_url: str | None = None  # the service, for recalibrating campaigns' lambda; None: skip it
    admin_token: str | None = None
    delay: DelayConfig = field(default_factory=DelayConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_fraction: float = 0.2  # users held out of training, on whom the gate evaluates
    cross_fit: bool = True  # decisions new to the incumbent are evidence too, through two cross-fitted candidates
    refit: bool = True  # once the cross-fitted candidates pass, publish one trained on both halves' decisions
    environment_check: bool = True
    now_ms: int | None = None  # default: the clock
    seed: int = 0
    campaigns: list[str] | None = None  # train on (and recalibrate) these campaigns only; None: every campaign
    warm_start: bool = False  # the candidate starts from the incumbent's weights (default trainer only)
    keep_refused: int = 5  # versions never current (refused or failed candidates) kept in the store; older ones go
    # the candidate scores coupons and bundles by their features (True) or coupons by index (False); None: the
    # incumbent's kind (no incumbent: by index). A run that would switch kinds fails (`model_kind`)
    by_features: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "logs": str(self.logs),
            "store": str(self.store),
            "prefix": self.prefix,
            "export": self.export and self.redis_url is not None,
            "recalibrate": self.admin_url is not None,
            "delay": asdict(self.delay),
            "gate": asdict(self.gate),
            "epochs": self.train.epochs,
            "eval_fraction": self.eval_fraction,
            "cross_fit": self.cross_fit,
            "refit": self.refit,
            "campaigns": self.campaigns,
            "warm_start": self.warm_start,
            "keep_refused": self.keep_refused,
            "by_features": self.by_features,
        }


def is_eval_user(user_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Stable held-out users: the same user is held out in every run (a hash of the id)."""
    cut = round(fraction * 10_000)
    return np.array([zlib.crc32(u.encode()) % 10_000 < cut for u in user_ids], dtype=bool)


def half_of(user_ids: np.ndarray) -> np.ndarray:
    """Each user's half (0 or 1) for cross-fitting: a stable hash of the id, independent of `is_eval_user`'s."""
    return np.array([zlib.crc32(b"half:" + u.encode()) & 1 for u in user_ids], dtype=np.int64)


def trained_until_ms(artifact: Artifact) -> int:
    """When the newest decision the model trained on was made (`saco retrain` records it), else when the model was
    created: decisions made after it are new to the model."""
    until = (artifact.manifest.metrics.get("trained_on") or {}).get("until_ms")
    if until is not None:
        return int(until)
    created = dt.datetime.fromisoformat(artifact.manifest.created_at)
    if created.tzinfo is None:
        created = created.replace(tzinfo=dt.UTC)
    return int(created.timestamp() * 1000)


@dataclass
class EvidencePlan:
    """Which decisions train which candidate, and which are the gate's evidence (docs/learning_loop.md, "The gate").

    Held-out users (`is_eval_user`) never train a candidate: all their decisions are evidence. The decisions of
    the other users made after the newest one the incumbent trained on are new to it; when there are any (and
    cross-fitting is on), the run trains two candidates, each on every other decision less the new ones of one
    half of the users (`half_of`), and each half's new decisions are evidence against the candidate that never
    saw them. The first candidate (trained on the second half's new decisions) is the one published."""

    held: np.ndarray  # [rows] bool: a held-out user's decision
    new: np.ndarray  # [rows] bool: made after the newest decision the incumbent trained on (not held out)
    half: np.ndarray  # [rows] the user's half
    decided: np.ndarray  # [rows] decided_at_ms
    cutoff_ms: int | None  # the incumbent's newest training decision; None: no incumbent

    @property
    def cross_fit(self) -> bool:
        return bool(self.new.any())

    @property
    def train_rows(self) -> list[np.ndarray]:
        if not self.cross_fit:
            return [~self.held]
        return [~self.held & ~(self.new & (self.half == k)) for k in (0, 1)]

    def evidence_rows(self, k: int) -> np.ndarray:
        rows = self.new & (self.half == k)
        return rows | self.held if k == 0 else rows

    @property
    def held_out_decisions(self) -> int:
        return int(self.held.sum())

    @property
    def new_decisions(self) -> int:
        return int(self.new.sum())

    @property
    def evidence_decisions(self) -> int:
        return self.held_out_decisions + self.new_decisions

    def evidence(
        self, k: int, logs: Logs, table: pa.Table, candidate: Artifact, env: LogEnvironment | None
    ) -> Evidence:
        """Part `k` of the evidence: the users with an evidence decision, their whole trajectories as context."""
        rows = self.evidence_rows(k)
        users = np.unique(logs.user[rows])
        of_users = np.isin(logs.user, users)
        # aligned: the table and the logs are both sorted by (user, t) in the same order
        return Evidence(candidate, logs.subset_users(users), table.filter(pa.array(of_users)), rows[of_users], env)

    def to_json(self) -> dict[str, Any]:
        return {
            "train_decisions": [int(r.sum()) for r in self.train_rows],
            "held_out_decisions": self.held_out_decisions,
            "new_decisions": self.new_decisions,
            "incumbent_trained_until": None
            if self.cutoff_ms is None
            else dt.datetime.fromtimestamp(self.cutoff_ms / 1000, dt.UTC).isoformat(),
            "cross_fit": self.cross_fit,
        }


def evidence_plan(
    logs: Logs, table: pa.Table, cutoff_ms: int | None, eval_fraction: float, cross_fit: bool = True
) -> EvidencePlan:
    """The plan for `logs` (rows aligned with `table`'s: its ``decided_at_ms``), `cutoff_ms` the incumbent's
    `trained_until_ms` (None: no incumbent, nothing is new)."""
    held = is_eval_user(logs.user_ids, eval_fraction)[logs.user]
    decided = table.column("decided_at_ms").to_numpy(zero_copy_only=False).astype(np.int64)
    new = np.zeros(logs.n_rows, dtype=bool)
    if cutoff_ms is not None and cross_fit:
        new = (decided > cutoff_ms) & ~held
    return EvidencePlan(held, new, half_of(logs.user_ids)[logs.user], decided, cutoff_ms)


def _check_candidate(result: TrainResult, incumbent: Artifact | None) -> None:
    if incumbent is None:
        return
    got, m = result.model.cfg, incumbent.manifest
    for name, have, want in (
        ("actions", got.num_actions, m.num_actions),
        ("features", got.feature_dim, m.feature_dim),
        ("action features", got.action_features, len(m.action_features)),
    ):
        if have != want:
            raise ValueError(f"the candidate has {have} {name}, the incumbent {want}: every replica would refuse it")


def model_kind(requested: bool | None, incumbent: Artifact | None) -> bool:
    """Whether the candidate scores by features: `requested`, else the incumbent's kind (no incumbent: by index).
    ValueError where `requested` would switch the incumbent's kind: the gate judges a candidate against the
    incumbent on the logged decisions as the candidate's kind names them, which an incumbent of the other kind
    did not serve by (a model by index ranks bundles by the additive rule), and no weights carry over; a model of
    the other kind is a new deployment (its own model store: its first retrain names the kind)."""
    if incumbent is None:
        return bool(requested)
    current = bool(incumbent.manifest.action_features)
    if requested is None or requested == current:
        return current
    kinds = {True: "by features (--by-features)", False: "by index (--by-index)"}
    raise ValueError(
        f"the incumbent {incumbent.version} scores coupons {kinds[current]}: a candidate {kinds[requested]} would "
        "switch kinds, which the gate cannot judge against it (the logged decisions name bundles as one kind does) "
        "and a warm start cannot carry over; deploy a model of the other kind as a new deployment (its own model "
        f"store), or retrain {kinds[current].split(' (')[0]}"
    )


def default_trainer(
    cfg: TrainConfig, initial: dict[str, Any] | None = None, action_table: np.ndarray | None = None
) -> Trainer:
    return lambda logs: train(logs, cfg, progress=False, initial=initial, action_table=action_table)


def incumbent_weights(artifact: Artifact, cfg: TrainConfig, action_table: np.ndarray | None = None) -> dict[str, Any]:
    """The trainable model's state dict inside an exported policy (its ``model.`` entries), for a warm start.
    `action_table` [T, F]: for a model scoring by features, the candidate's table (its rows may differ from the
    incumbent's: new bundles logged), read at the incumbent's scale (`action_scale`: the weights' meaning of the
    columns). Raises ValueError when the incumbent's architecture is not the one `cfg` trains."""
    import torch

    from model_store import load_scripted

    m = artifact.manifest
    features = len(m.action_features)
    if (action_table is not None) != bool(features):
        raise ValueError(
            f"cannot warm start from {artifact.version}: it scores coupons "
            f"{'by features' if features else 'by index'}, the candidate "
            f"{'by features' if action_table is not None else 'by index'}"
        )
    rows = 0 if action_table is None else len(action_table)
    model_cfg = cfg.model_config(m.feature_dim, m.num_actions, features, rows)
    wanted = model_cfg.to_dict()
    have = {k: v for k, v in (artifact.manifest.model_config or {}).items() if k in wanted}
    # the table's rows are data (the logs' bundles), not the architecture
    differs = {
        k: (have.get(k), v)
        for k, v in wanted.items()
        if k not in ("train", "table_rows") and _plain(have.get(k)) != _plain(v)
    }
    if differs:
        raise ValueError(f"cannot warm start from {artifact.version}: its model differs in {differs}")
    from offline.model import SacoTransformer

    model = SacoTransformer(model_cfg)
    state = load_scripted(artifact.model_path).state_dict()
    # the export adds buffers of its own under the model (folded weights): only the model's entries
    weights = {k: torch.as_tensor(state[f"model.{k}"]).clone() for k in model.state_dict()}
    if action_table is not None:
        scale = weights.pop("action_scale")
        weights.pop("action_table")
        model.load_state_dict(weights, strict=False)
        model.set_action_table(torch.from_numpy(np.asarray(action_table, np.float32)), scale)
        return {k: v.clone() for k, v in model.state_dict().items()}
    return weights


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


@dataclass
class Recalibration:
    campaign_id: str
    action: str  # "patched" | "skipped"
    reason: str
    lam: float | None = None
    remaining: float | None = None
    remaining_decisions: int | None = None
    predicted_spend: float | None = None  # over the remaining decisions, at `lam`, in the learned environment


def remaining_decisions(view: dict[str, Any], now: dt.datetime) -> int | None:
    """Decisions the campaign still expects: its plan's expected_decisions minus those made, or its past
    decision rate over the time left until ends_at; None without a horizon."""
    made = int(view.get("decisions") or 0)
    if view.get("expected_decisions"):
        return max(int(view["expected_decisions"]) - made, 0)
    ends, starts = view.get("ends_at"), view.get("starts_at")
    if ends and starts:
        ends_at, starts_at = dt.datetime.fromisoformat(ends), dt.datetime.fromisoformat(starts)
        if ends_at <= now:
            return 0
        elapsed = (now - starts_at).total_seconds()
        if elapsed <= 0 or made == 0:
            return None
        return math.ceil(made / elapsed * (ends_at - now).total_seconds())
    return None


def recalibrate_campaigns(
    admin_url: str,
    admin_token: str | None,
    campaign_ids: list[str],
    artifact: Artifact,
    env_logs: Logs,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    env: LogEnvironment | None = None,
    table: TrainingTable | None = None,
) -> list[Recalibration]:
    """For each campaign with money left and a horizon, the lambda whose simulated spend over its remaining
    decisions meets its remaining budget (the learned environment, the serving model), set by PATCH. `env`: the
    environment the gate learned, if any (else one is learned from `env_logs`). A model scoring by features needs
    `table`, the training table whose rows `env_logs`' actions are: it is offered the campaign's coupons alone and
    its bundles' rows (contract/catalog.py `Catalog.from_view` of the campaign's view)."""
    import httpx

    from model_store import load_scripted
    from offline.calibrate import BudgetUnreachable, search_monotone
    from offline.env import LogEnvironment
    from offline.rollout import SequencePolicy, rollout

    say = log or (lambda _m: None)
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    out: list[Recalibration] = []
    m = artifact.manifest
    if m.action_features and table is None:
        raise ValueError(
            f"model {artifact.version} scores coupons by features: recalibrating it needs the training table (whose "
            "rows the logged actions are)"
        )
    if not m.action_features and table is not None:
        raise ValueError(f"model {artifact.version} scores coupons by index: it takes no training table")
    module = load_scripted(artifact.model_path)
    space = m.num_actions if table is None else table.rows
    now = dt.datetime.now(dt.UTC)
    with httpx.Client(base_url=admin_url, headers=headers, timeout=30) as client:
        for campaign_id in campaign_ids:
            response = client.get(f"/v1/admin/campaigns/{campaign_id}")
            if response.status_code == 404:
                out.append(Recalibration(campaign_id, "skipped", "unknown to the service"))
                continue
            response.raise_for_status()
            view = response.json()
            remaining = float(view["remaining"])
            decisions = remaining_decisions(view, now)
            if remaining <= 0:
                out.append(Recalibration(campaign_id, "skipped", "no budget left", remaining=remaining))
                continue
            if not decisions:
                reason = "no horizon (expected_decisions, or starts_at and ends_at)" if decisions is None else "ended"
                out.append(Recalibration(campaign_id, "skipped", reason, remaining=remaining))
                continue
            if env is None:
                env = LogEnvironment.fit(env_logs, seed=seed, num_actions=max(space, env_logs.num_actions))
            # the campaign's coupons (by features: and its bundles), those the learned environment can price (the
            # logs hold them), and no coupon
            offered = np.zeros(env.num_actions, dtype=bool)
            if table is None:
                coupons = [int(c["action"]) for c in view.get("coupons", [])]
                offered[[a for a in coupons if 0 < a < env.num_actions]] = True
            else:
                offered[: table.rows] = table.offered(Catalog.from_view(view))
            offered &= env.logged_actions
            offered[0] = True
            policy = SequencePolicy.of_artifact(
                artifact, module, offered=offered, action_table=None if table is None else table.table
            )
            users = max(1, math.ceil(decisions / env.rounds))
            scale = decisions / (users * env.rounds)  # simulated users come in whole trajectories

            def simulate(
                lam: float,
                users: int = users,
                scale: float = scale,
                env: LogEnvironment = env,
                policy: SequencePolicy = policy,
            ) -> tuple[float, float]:
                r = rollout(env, policy, lam, n_users=users, seed=seed)
                return r.revenue * scale, r.cost * scale

            try:
                found = search_monotone(simulate, remaining)
            except BudgetUnreachable as exc:
                out.append(
                    Recalibration(campaign_id, "skipped", str(exc), remaining=remaining, remaining_decisions=decisions)
                )
                continue
            patched = client.patch(f"/v1/admin/campaigns/{campaign_id}", json={"lambda": found.lam})
            patched.raise_for_status()
            say(f"campaign {campaign_id}: lambda {found.lam:.5g} for {remaining:.2f} over {decisions} decisions")
            out.append(
                Recalibration(
                    campaign_id,
                    "patched",
                    "spend meets the remaining budget",
                    found.lam,
                    remaining,
                    decisions,
                    round(found.cost, 2),
                )
            )
    return out


def _campaign_ids(redis_url: str, prefix: str) -> list[str]:
    import redis

    from contract.keys import Keys

    client = redis.Redis.from_url(redis_url)
    try:
        return sorted(c.decode() for c in client.smembers(Keys(prefix).campaigns_key))  # type: ignore[union-attr]
    finally:
        client.close()


def _campaign_views(admin_url: str, admin_token: str | None, campaign_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each campaign's view from the admin API (campaigns the service does not know are left out)."""
    import httpx

    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    out: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=admin_url, headers=headers, timeout=30) as client:
        for campaign_id in campaign_ids:
            response = client.get(f"/v1/admin/campaigns/{campaign_id}")
            if response.status_code == 404:
                continue
            response.raise_for_status()
            out[campaign_id] = response.json()
    return out


def _campaign_coupons(views: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """Each campaign's coupon actions."""
    return {c: sorted(int(x["action"]) for x in view.get("coupons", [])) for c, view in views.items()}


def _campaign_catalogs(views: dict[str, dict[str, Any]]) -> dict[str, Catalog]:
    """Each campaign's catalog (contract/catalog.py `Catalog.from_view`); ValueError naming the campaign whose
    view breaks a catalog rule."""
    out = {}
    for campaign, view in views.items():
        try:
            out[campaign] = Catalog.from_view(view)
        except CatalogError as exc:
            raise ValueError(f"campaign {campaign!r}: its catalog: {exc}") from exc
    return out


def action_space(incumbent: Artifact | None, coupons: dict[str, list[int]], logged: int) -> tuple[int, str]:
    """The candidate's number of actions and where it comes from: the incumbent's (replicas refuse a model with
    another; the service keeps every campaign's coupons within it), else the largest of the campaigns' coupons
    and the logged actions. ValueError when a logged action lies outside the incumbent's."""
    if incumbent is not None:
        k = incumbent.manifest.num_actions
        if logged > k:
            raise ValueError(f"the logs hold action {logged - 1}, beyond the incumbent's {k} actions")
        return k, f"the incumbent {incumbent.version}"
    widest = max((max(c) + 1 for c in coupons.values() if c), default=0)
    if widest:
        return max(widest, logged, 2), "the campaigns' coupons"
    return max(logged, 2), "the logged actions (no incumbent, no campaign's coupons)"


def retrain_once(
    cfg: RetrainConfig, trainer: Trainer | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """One run of the loop; returns its report (``decision``: promoted | refused | failed), JSON-safe (no
    NaN). Never raises for a failed step: the report names it (``failed_step``, the last reason), and the
    incumbent stays current."""
    say = log or (lambda _m: None)
    started = time.time()
    now_ms = cfg.now_ms if cfg.now_ms is not None else int(started * 1000)
    store = ModelStore(cfg.store)
    incumbent = store.current_version()
    report: dict[str, Any] = {
        "run_at": dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).isoformat(),
        "inputs": cfg.to_json(),
        "incumbent": incumbent,
        "candidate": None,
        "decision": "failed",
        "reasons": [],
        "metrics": {},
    }
    step = "export"
    seconds: dict[str, float] = {}  # each step's wall time
    clock = time.perf_counter()

    def enter(name: str) -> str:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = round(now - clock, 1)
        clock = now
        return name

    try:
        if cfg.export and cfg.redis_url is not None:
            from loop.logstream import export_logs

            say("exporting the logs")
            exported = export_logs(cfg.redis_url, cfg.logs, prefix=cfg.prefix)
            report["metrics"]["export"] = exported.to_json()
            if exported.trimmed:
                say(f"warning: {exported.trimmed} log entries were trimmed before they were exported")
        step = enter("data")
        incumbent_artifact = store.load(incumbent) if incumbent is not None else None
        by_features = model_kind(cfg.by_features, incumbent_artifact)
        joined, counts = joined_decisions(cfg.logs, campaigns=cfg.campaigns)
        views: dict[str, dict[str, Any]] = {}
        if cfg.admin_url is not None and (incumbent_artifact is None or by_features):
            logged_campaigns = sorted(set(joined.column("campaign_id").to_pylist()))
            views = _campaign_views(cfg.admin_url, cfg.admin_token, logged_campaigns)
        coupons = _campaign_coupons(views) if incumbent_artifact is None else {}
        table: TrainingTable | None = None
        if by_features:  # each decision's action is its row of the training table (loop/actions.py)
            num_actions, space_from = action_space(incumbent_artifact, coupons, logged_width(joined))
            table = training_table(joined, num_actions, _campaign_catalogs(views))
            joined = with_rows(joined, table)
        # training and the gate see the same labels: under the delay model every decision, a pending one at
        # its expected outcome; under the maturity window the matured decisions only
        labelled, delay_metrics = label_outcomes(joined, now_ms, cfg.delay)
        if labelled.num_rows == 0:
            raise LogValidationError(
                f"no decision is older than the maturity window ({cfg.delay.maturity_ms / DAY_MS:g} days) of "
                "--delay-method maturity; the delay model (--delay-method delay-model) labels young decisions too"
            )
        all_logs = validate_table(labelled)
        cutoff = trained_until_ms(incumbent_artifact) if incumbent_artifact is not None else None
        plan = evidence_plan(all_logs, labelled, cutoff, cfg.eval_fraction, cfg.cross_fit)
        if table is None:
            num_actions, space_from = action_space(incumbent_artifact, coupons, all_logs.num_actions)
        report["metrics"]["data"] = {
            **counts,
            **delay_metrics,
            **plan.to_json(),
            "num_actions": num_actions,
            "action_space_from": space_from,
            "by_features": by_features,
            **({} if table is None else {"action_table": table.to_json()}),
        }
        # the learned environment's actions: the training table's rows (by features), else the K actions
        space = num_actions if table is None else table.rows
        rows_table = None if table is None else table.table

        step = enter("train")
        train_cfg = replace(cfg.train, num_actions=num_actions)
        if trainer is None and cfg.warm_start and incumbent_artifact is not None:
            say(f"warm start from the incumbent {incumbent}")
            initial = incumbent_weights(incumbent_artifact, train_cfg, rows_table)
            trainer = default_trainer(train_cfg, initial, rows_table)
        fit = trainer or default_trainer(train_cfg, action_table=rows_table)
        train_logs = [all_logs.subset_rows(rows) for rows in plan.train_rows]
        results = []
        for k, logs_k in enumerate(train_logs):
            which = f" (half {k + 1} of {len(train_logs)})" if len(train_logs) > 1 else ""
            say(f"training a candidate{which} on {logs_k.n_rows} decisions of {logs_k.n_users} users")
            results.append(fit(logs_k))
            _check_candidate(results[-1], incumbent_artifact)
        from offline.export import export_and_publish

        def publish(result: TrainResult, logs_k: Logs, rows: np.ndarray) -> Artifact:
            """The candidate into the store (not current), with the incumbent's lambda as its calibration."""
            until = int(plan.decided[rows].max()) if rows.any() else None
            extra = {
                "trained_on": {
                    "decisions": logs_k.n_rows,
                    "users": logs_k.n_users,
                    "now_ms": now_ms,
                    "until_ms": until,  # the newest decision it trained on: later ones are new to it
                }
            }
            published = export_and_publish(result, logs_k, store, extra_metrics=extra, make_current=False)
            if incumbent_artifact is not None and (prior := incumbent_artifact.manifest.default_lambda) is not None:
                # it starts from the incumbent's lambda: a calibration record of its own, naming its source
                source = incumbent_artifact.calibration
                published = store.calibrate(
                    published.version,
                    command="saco retrain: the incumbent's lambda",
                    lam=prior,
                    details={"from_version": incumbent, "from_calibration": None if source is None else source.id},
                )
            return published

        candidate = publish(results[0], train_logs[0], plan.train_rows[0])
        report["candidate"] = candidate.version
        report["metrics"]["train"] = {k: round(float(v), 6) for k, v in results[0].metrics.items()}

        step = enter("gate")
        env = None
        if incumbent_artifact is None:
            promote, reasons = True, ["no incumbent: the first model is promoted"]
        else:
            with tempfile.TemporaryDirectory(prefix="saco-retrain-") as tmp:
                # the other half's candidate is evidence only: exported beside the store, never published
                others = [
                    export_and_publish(r, logs_k, ModelStore(Path(tmp)), make_current=False)
                    for r, logs_k in zip(results[1:], train_logs[1:], strict=True)
                ]
                parts = []
                for k, artifact in enumerate([candidate, *others]):
                    env_k = None
                    if cfg.environment_check or cfg.gate.doubly_robust:
                        from offline.env import LogEnvironment

                        say(f"gate: fitting the learned environment on candidate {k + 1}'s training decisions")
                        logs_k = train_logs[k]
                        env_k = LogEnvironment.fit(logs_k, seed=cfg.seed, num_actions=max(space, logs_k.num_actions))
                    parts.append(plan.evidence(k, all_logs, labelled, artifact, env_k))
                env = parts[0].env
                say(
                    f"gate: {plan.evidence_decisions:,} decisions ({plan.held_out_decisions:,} of held-out users, "
                    f"{plan.new_decisions:,} new to the incumbent) ({cfg.delay.method})"
                )
                gate = gate_candidate(
                    parts,
                    incumbent_artifact,
                    cfg.gate,
                    environment_check=cfg.environment_check,
                    seed=cfg.seed,
                    table=rows_table,
                )
            promote, reasons = gate.promote, gate.reasons
            report["metrics"]["gate"] = {
                **gate.metrics,
                "eval_decisions": plan.evidence_decisions,
                "labelling": cfg.delay.method,
            }
        report["reasons"] = reasons
        if promote and plan.cross_fit and cfg.refit:
            step = enter("refit")
            rows = ~plan.held
            logs_all = all_logs.subset_rows(rows)
            say(f"refit: the candidate on both halves' {logs_all.n_rows} decisions ({logs_all.n_users} users)")
            refitted = fit(logs_all)
            _check_candidate(refitted, incumbent_artifact)
            report["gated_candidate"] = candidate.version
            candidate = publish(refitted, logs_all, rows)
            report["candidate"] = candidate.version
        serving = candidate if promote else incumbent_artifact
        assert serving is not None

        step = enter("recalibrate")
        if cfg.admin_url is not None and cfg.redis_url is not None:
            recal = recalibrate_campaigns(
                cfg.admin_url,
                cfg.admin_token,
                [c for c in _campaign_ids(cfg.redis_url, cfg.prefix) if cfg.campaigns is None or c in cfg.campaigns],
                serving,
                all_logs,
                seed=cfg.seed,
                log=say,
                env=env,
                table=table,
            )
            report["recalibrated"] = [asdict(r) for r in recal]

        step = enter("publish")
        if promote:
            store.promote(candidate.version)
            report["decision"] = "promoted"
            if cfg.redis_url is not None:
                from model_store.notify import announce

                report["announced_to"] = announce(cfg.redis_url, cfg.prefix, candidate.version)
        else:
            report["decision"] = "refused"
    except Exception as exc:
        report["decision"] = "failed"
        report["failed_step"] = step
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        report["reasons"] = [*report["reasons"], f"{step} failed: {type(exc).__name__}: {message}".rstrip(": ")]
        report["traceback"] = traceback.format_exc()
    step = enter("prune")
    try:
        report["pruned"] = store.prune(cfg.keep_refused)
    except (OSError, ValueError) as exc:  # the run's outcome stands; the next run prunes again
        report["prune_error"] = f"{type(exc).__name__}: {exc}"
    enter("")
    report["current"] = store.current_version()
    report["seconds"] = round(time.time() - started, 1)
    report["seconds_by_step"] = seconds
    return dict(json_safe(report))


def next_run_in(every_s: float | None, cron: str | None, now: dt.datetime) -> float:
    """Seconds until the next scheduled run."""
    if cron is not None:
        from croniter import croniter

        nxt = croniter(cron, now).get_next(dt.datetime)
        return max(0.0, (nxt - now).total_seconds())
    assert every_s is not None
    return every_s


def run_scheduler(
    cfg: RetrainConfig,
    *,
    every_s: float | None = None,
    cron: str | None = None,
    runs: int | None = None,
    emit: Callable[[dict[str, Any]], None],
    stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] | None = None,
) -> int:
    """Run `retrain_once` on a schedule (every `every_s` seconds, or at a cron expression's times), `runs`
    times (None: until `stop()`); each report goes to `emit`. Returns the number of runs."""
    if (every_s is None) == (cron is None):
        raise ValueError("give exactly one of --every and --cron")
    if cron is not None:
        from croniter import croniter

        if not croniter.is_valid(cron):
            raise ValueError(f"--cron {cron!r} is not a valid cron expression")
    done = 0
    while not stop() and (runs is None or done < runs):
        wait = next_run_in(every_s, cron, dt.datetime.now(dt.UTC)) if (done or cron is not None) else 0.0
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not stop():
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
        if stop():
            break
        emit(retrain_once(cfg, log=log))
        done += 1
    return done
