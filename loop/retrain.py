"""One run of the learning loop (`saco retrain`) and its schedule (`saco scheduler`).

export new logs -> train a candidate on the training users' logs, in the incumbent's action space -> gate it
against the incumbent (`loop.gate`, on held-out users' decisions, labelled as training labels them) ->
recalibrate every active campaign's lambda from its remaining budget and horizon (admin API) -> publish: the
candidate becomes current in the model store (an atomic pointer swap) and is announced on ``<prefix>models``;
then versions that never were current beyond the newest `keep_refused` are deleted.

A run that fails or is killed at any step leaves the incumbent current: the candidate is published as a
version that is not current until the last step, and the logs are only ever read (the export acknowledges
what it has written). Each run returns (and the CLI prints) one JSON object: inputs, metrics, decision,
reasons.
"""

from __future__ import annotations

import datetime as dt
import math
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from loop.data import DAY_MS, DelayConfig, joined_decisions, label_outcomes
from loop.gate import GateConfig, gate_candidate
from model_store import Artifact, ModelStore
from offline.jsonsafe import json_safe
from offline.logs import Logs, LogValidationError, validate_table
from offline.train import TrainConfig, TrainResult, train

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
    environment_check: bool = True
    now_ms: int | None = None  # default: the clock
    seed: int = 0
    campaigns: list[str] | None = None  # train on (and recalibrate) these campaigns only; None: every campaign
    warm_start: bool = False  # the candidate starts from the incumbent's weights (default trainer only)
    keep_refused: int = 5  # versions never current (refused or failed candidates) kept in the store; older ones go

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
            "campaigns": self.campaigns,
            "warm_start": self.warm_start,
            "keep_refused": self.keep_refused,
        }


def is_eval_user(user_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Stable held-out users: the same user is held out in every run (a hash of the id)."""
    cut = round(fraction * 10_000)
    return np.array([zlib.crc32(u.encode()) % 10_000 < cut for u in user_ids], dtype=bool)


def _split(logs: Logs, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    held = is_eval_user(logs.user_ids, fraction)
    return np.flatnonzero(~held), np.flatnonzero(held)


def _rows_of(logs: Logs, users: np.ndarray) -> np.ndarray:
    return np.isin(logs.user, users)


def default_trainer(cfg: TrainConfig, initial: dict[str, Any] | None = None) -> Trainer:
    return lambda logs: train(logs, cfg, progress=False, initial=initial)


def incumbent_weights(artifact: Artifact, cfg: TrainConfig) -> dict[str, Any]:
    """The trainable model's state dict inside an exported policy (its ``model.`` entries), for a warm start.
    Raises ValueError when the incumbent's architecture is not the one `cfg` trains."""
    import torch

    from model_store import load_scripted

    m = artifact.manifest
    wanted = cfg.model_config(m.feature_dim, m.num_actions).to_dict()
    have = {k: v for k, v in (artifact.manifest.model_config or {}).items() if k in wanted}
    differs = {k: (have.get(k), v) for k, v in wanted.items() if k != "train" and _plain(have.get(k)) != _plain(v)}
    if differs:
        raise ValueError(f"cannot warm start from {artifact.version}: its model differs in {differs}")
    from offline.model import SacoTransformer

    own = SacoTransformer(cfg.model_config(m.feature_dim, m.num_actions)).state_dict()
    state = load_scripted(artifact.model_path).state_dict()
    # the export adds buffers of its own under the model (folded weights): only the model's entries
    return {k: torch.as_tensor(state[f"model.{k}"]).clone() for k in own}


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
) -> list[Recalibration]:
    """For each campaign with money left and a horizon, the lambda whose simulated spend over its remaining
    decisions meets its remaining budget (the learned environment, the serving model), set by PATCH."""
    import httpx

    from model_store import load_scripted
    from offline.calibrate import BudgetUnreachable, search_monotone
    from offline.env import LogEnvironment
    from offline.rollout import SequencePolicy, rollout

    say = log or (lambda _m: None)
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    out: list[Recalibration] = []
    env: LogEnvironment | None = None
    m = artifact.manifest
    module = load_scripted(artifact.model_path)
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
                env = LogEnvironment.fit(env_logs, seed=seed, num_actions=max(m.num_actions, env_logs.num_actions))
            # the campaign's coupons, those the learned environment can price (the logs hold them), and no coupon
            offered = np.zeros(env.num_actions, dtype=bool)
            offered[[int(c["action"]) for c in view.get("coupons", []) if 0 < int(c["action"]) < env.num_actions]] = (
                True
            )
            offered &= env.logged_actions
            offered[0] = True
            policy = SequencePolicy(
                module, m.context_length, m.initial_rtg, m.initial_ctg, m.feature_dim, offered=offered
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


def _campaign_coupons(admin_url: str, admin_token: str | None, campaign_ids: list[str]) -> dict[str, list[int]]:
    """Each campaign's coupon actions, from the admin API (campaigns the service does not know are left out)."""
    import httpx

    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    out: dict[str, list[int]] = {}
    with httpx.Client(base_url=admin_url, headers=headers, timeout=30) as client:
        for campaign_id in campaign_ids:
            response = client.get(f"/v1/admin/campaigns/{campaign_id}")
            if response.status_code == 404:
                continue
            response.raise_for_status()
            out[campaign_id] = sorted(int(c["action"]) for c in response.json().get("coupons", []))
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
    try:
        if cfg.export and cfg.redis_url is not None:
            from loop.logstream import export_logs

            say("exporting the logs")
            exported = export_logs(cfg.redis_url, cfg.logs, prefix=cfg.prefix)
            report["metrics"]["export"] = exported.to_json()
            if exported.trimmed:
                say(f"warning: {exported.trimmed} log entries were trimmed before they were exported")
        step = "data"
        joined, counts = joined_decisions(cfg.logs, campaigns=cfg.campaigns)
        # training and the gate see the same labels: under the delay model every decision, a pending one at
        # its expected outcome; under the maturity window the matured decisions only
        labelled, delay_metrics = label_outcomes(joined, now_ms, cfg.delay)
        if labelled.num_rows == 0:
            raise LogValidationError(
                f"no decision is older than the maturity window ({cfg.delay.maturity_ms / DAY_MS:g} days) of "
                "--delay-method maturity; the delay model (--delay-method delay-model) labels young decisions too"
            )
        all_logs = validate_table(labelled)
        train_users, eval_users = _split(all_logs, cfg.eval_fraction)
        train_logs = all_logs.subset_users(train_users)
        incumbent_artifact = store.load(incumbent) if incumbent is not None else None
        coupons: dict[str, list[int]] = {}
        if incumbent_artifact is None and cfg.admin_url is not None:
            logged_campaigns = sorted(set(labelled.column("campaign_id").to_pylist()))
            coupons = _campaign_coupons(cfg.admin_url, cfg.admin_token, logged_campaigns)
        num_actions, space_from = action_space(incumbent_artifact, coupons, all_logs.num_actions)
        report["metrics"]["data"] = {
            **counts,
            **delay_metrics,
            "train_users": len(train_users),
            "num_actions": num_actions,
            "action_space_from": space_from,
        }

        step = "train"
        say(f"training a candidate on {train_logs.n_rows} decisions of {train_logs.n_users} users")
        train_cfg = replace(cfg.train, num_actions=num_actions)
        if trainer is None and cfg.warm_start and incumbent_artifact is not None:
            say(f"warm start from the incumbent {incumbent}")
            trainer = default_trainer(train_cfg, incumbent_weights(incumbent_artifact, train_cfg))
        result = (trainer or default_trainer(train_cfg))(train_logs)
        got = result.model.cfg
        if incumbent_artifact is not None:
            m = incumbent_artifact.manifest
            for name, have, want in (
                ("actions", got.num_actions, m.num_actions),
                ("features", got.feature_dim, m.feature_dim),
            ):
                if have != want:
                    raise ValueError(
                        f"the candidate has {have} {name}, the incumbent {want}: every replica would refuse it"
                    )
        from offline.export import export_and_publish

        extra = {"trained_on": {"decisions": train_logs.n_rows, "users": train_logs.n_users, "now_ms": now_ms}}
        candidate = export_and_publish(result, train_logs, store, extra_metrics=extra, make_current=False)
        if incumbent_artifact is not None and (prior := incumbent_artifact.manifest.default_lambda) is not None:
            # the candidate starts from the incumbent's lambda: a calibration record of its own, naming its source
            source = incumbent_artifact.calibration
            candidate = store.calibrate(
                candidate.version,
                command="saco retrain: the incumbent's lambda",
                lam=prior,
                details={"from_version": incumbent, "from_calibration": None if source is None else source.id},
            )
        report["candidate"] = candidate.version
        report["metrics"]["train"] = {k: round(float(v), 6) for k, v in result.metrics.items()}

        step = "gate"
        if incumbent_artifact is None:
            promote, reasons = True, ["no incumbent: the first model is promoted"]
        else:
            rows = _rows_of(all_logs, eval_users)
            eval_logs = all_logs.subset_users(eval_users)
            eval_table = labelled.filter(rows)  # aligned: both are sorted by (user, t) in the same order
            artifacts = {"candidate": candidate, "incumbent": incumbent_artifact}
            say(f"gate: {eval_logs.n_rows} decisions of {eval_logs.n_users} held-out users ({cfg.delay.method})")
            env = None
            if cfg.environment_check or cfg.gate.doubly_robust:
                from offline.env import LogEnvironment

                say("gate: fitting the learned environment on the training users' logs")
                env = LogEnvironment.fit(
                    train_logs, seed=cfg.seed, num_actions=max(num_actions, train_logs.num_actions)
                )
            gate = gate_candidate(
                artifacts, eval_logs, eval_table, env, cfg.gate, environment_check=cfg.environment_check, seed=cfg.seed
            )
            promote, reasons = gate.promote, gate.reasons
            report["metrics"]["gate"] = {
                **gate.metrics,
                "eval_decisions": eval_logs.n_rows,
                "labelling": cfg.delay.method,
            }
        report["reasons"] = reasons
        serving = candidate if promote else incumbent_artifact
        assert serving is not None

        step = "recalibrate"
        if cfg.admin_url is not None and cfg.redis_url is not None:
            recal = recalibrate_campaigns(
                cfg.admin_url,
                cfg.admin_token,
                [c for c in _campaign_ids(cfg.redis_url, cfg.prefix) if cfg.campaigns is None or c in cfg.campaigns],
                serving,
                all_logs,
                seed=cfg.seed,
                log=say,
            )
            report["recalibrated"] = [asdict(r) for r in recal]

        step = "publish"
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
    try:
        report["pruned"] = store.prune(cfg.keep_refused)
    except (OSError, ValueError) as exc:  # the run's outcome stands; the next run prunes again
        report["prune_error"] = f"{type(exc).__name__}: {exc}"
    report["current"] = store.current_version()
    report["seconds"] = round(time.time() - started, 1)
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
