"""The learning loop end to end: the sequential world served for several periods, a retrained model after each.

The project's sequential world (research/world.py) is served through two real `saco serve` replicas that share
one Redis and one model store:

1. The first model: `saco simulate`'s random logging policy on `--log-users` users of the world, `saco train`,
   `saco calibrate` to `--budget-fraction` of the random policy's spend.
2. One campaign with a budget (that fraction of the random policy's spend per decision, times the decisions
   it plans), a horizon (`expected_decisions` = (periods + 1) x users x rounds), exploration on
   (`--exploration-rate`) and optionally a holdout group; pacing off, so its lambda is the one the loop sets.
3. Every period a fresh cohort of the world's users (`--users` x `--rounds`) is served: each round, the
   users' current features go in `--request-users`-user decision requests spread over both replicas, the
   world answers the issued coupons, and the realised outcomes are posted through the API. Any non-200
   answer or dropped connection counts as a failed request (nothing is retried).
4. After each period: `saco export`, then one `saco scheduler ... --runs 1` that trains a candidate on
   everything exported so far, gates it against the serving model, recalibrates the campaign's lambda
   through the admin API and publishes and announces a promoted candidate. While it runs, a probe sends
   decision requests to both replicas (a separate campaign the scheduler does not train on), so the reload
   happens under traffic; the period ends when both replicas serve the current version.
5. The model now serving and the first model are scored offline in the world on a fresh population
   (`--eval-users`, a seed never served), each at its own lambda found so that its exact expected spend
   matches a common target (the campaign's budget per user; BARate in [0.995, 1], then the revenue is
   interpolated to the target itself). One row per period:
   the gate's decision, the served version, lambda before and after, failed requests, the ratio of
   the two revenues at that equal spend, and the run's candidate against the incumbent it was gated against
   (both so scored) beside the gate's own estimate of that ratio and its standard error.

    .venv/bin/python benchmarks/learning_loop.py                        # 4 periods, ~2 min on 2 cores
    .venv/bin/python benchmarks/learning_loop.py --png docs/learning_loop.png --json var/learning_loop.json

Progress goes to stderr; the table (and the PNG / JSON when asked) is the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from model_store import Artifact, ModelStore  # noqa: E402
from offline.calibrate import search_monotone  # noqa: E402
from offline.logs import load_logs, write_logs  # noqa: E402
from offline.rollout import Policy, SequencePolicy, rollout  # noqa: E402
from research.simulate import simulate_logs  # noqa: E402
from research.world import SyntheticWorld, WorldConfig  # noqa: E402
from service.replicas import replicas as start_replicas  # noqa: E402
from service.state.servers import start_redis  # noqa: E402

TOKEN = "learning-loop-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
CAMPAIGN = "loop"
PROBE = "probe"  # the campaign of the probe traffic during the scheduler runs (never trained on)
EQUAL_SPEND_LOW = 0.995  # equal spend: each model's expected spend within [0.995, 1] x the target


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class LoopConfig:
    periods: int = 3
    users: int = 4000  # a fresh cohort of the world's users served each period
    rounds: int = 8
    log_users: int = 2000  # users in the random logs the first model trains on
    epochs: int = 12
    eval_users: int = 4000  # the fresh population both models are scored on
    budget_fraction: float = 0.5  # budget per decision: this fraction of the random policy's spend
    exploration_rate: float = 0.2
    holdout_rate: float = 0.0
    request_users: int = 128
    concurrency: int = 4  # decision requests in flight within a round
    warm_start: bool = True  # `saco scheduler --warm-start`: the candidate starts from the incumbent's weights
    tolerance: float = 0.02  # the gate's: the candidate may earn at most this much less (95% lower bound)
    eval_fraction: float = 0.2  # `saco retrain --eval-fraction`: users held out of training
    cross_fit: bool = True  # `saco retrain --cross-fit`: decisions new to the incumbent are evidence too
    refit: bool = True  # `saco retrain --refit`: a passing candidate is retrained on both halves' decisions
    seed: int = 0
    probe_gap_s: float = 0.05  # between the probe's requests


@dataclass
class Evaluation:
    """A model in the world on the fresh population, at the lambda whose spend meets the target."""

    version: str
    lam: float
    revenue: float  # exact expected revenue over the population
    cost: float
    target: float
    passes: int


@dataclass
class PeriodResult:
    period: int
    decisions: int  # served in the period
    explored: int  # the campaign's explored decisions so far
    traffic_requests: int
    traffic_failed: int
    probe_requests: int
    probe_failed: int
    exported: dict[str, Any]
    decision: str  # the scheduler run's: promoted | refused | failed
    reasons: list[str]
    candidate: str | None
    served: dict[str, str]  # replica -> the version /readyz reports after the run
    probe_versions: dict[str, list[str]]  # replica -> the versions its probe answers carried, in order
    lam_before: float
    lam_after: float
    recalibrated: list[dict[str, Any]]
    evaluation: Evaluation
    ratio: float  # revenue of the serving model / the first model's, at equal spend
    candidate_ratio: float | None  # the same for the run's candidate, promoted or not
    # the run's candidate against the incumbent it was gated against, both at equal spend on the fresh population
    candidate_vs_incumbent: float | None = None
    # the gate's own estimate of that: difference / |incumbent's value| per decision, and its standard error
    gate_estimate: dict[str, float | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopResult:
    config: LoopConfig
    first_version: str
    first: Evaluation
    periods: list[PeriodResult]
    seconds: float = 0.0


# ---- the world, offline -------------------------------------------------------------------------------
class RandomPolicy(Policy):
    name = "random"

    def __init__(self, num_actions: int, seed: int) -> None:
        self.num_actions, self.seed = num_actions, seed

    def act(
        self, features: np.ndarray, t: int, lam: float, expected: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        return np.random.default_rng([self.seed, t]).integers(0, self.num_actions, len(features))


def sequence_policy(artifact: Artifact) -> SequencePolicy:
    return SequencePolicy.of_artifact(artifact)


def evaluate_at_spend(world: SyntheticWorld, artifact: Artifact, users: int, seed: int, target: float) -> Evaluation:
    """The model's exact expected revenue on `users` users of population `seed` at expected spend `target`: the
    monotone search of `saco calibrate` on the world itself brings spend within [0.995, 1] x `target`, then the
    revenue is interpolated linearly to the target between the passes on either side of it (`lam` is the
    search's answer, `cost` the target when interpolated)."""
    policy = sequence_policy(artifact)

    def simulate(lam: float) -> tuple[float, float]:
        r = rollout(world, policy, lam, n_users=users, seed=seed)
        return r.revenue, r.cost

    found = search_monotone(simulate, target, target_low=EQUAL_SPEND_LOW)
    # then exactly at the target: linear between the closest passes on either side of it (when there are both)
    above = [e for e in found.history if e.cost > target]
    if above and found.cost < target:
        over = min(above, key=lambda e: e.cost)
        share = (target - found.cost) / (over.cost - found.cost)
        revenue = found.revenue + share * (over.revenue - found.revenue)
        return Evaluation(artifact.version, found.lam, revenue, target, target, found.passes)
    return Evaluation(artifact.version, found.lam, found.revenue, found.cost, target, found.passes)


# ---- processes ----------------------------------------------------------------------------------------
# one intra-op thread for every torch process here: the replicas, the client and the loop's jobs share the cores,
# and a second thread per process waits on the others at every small operation (the learned environment's fit took
# 17x longer with 2 threads than with 1 on 2 busy cores)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(*args: str, timeout: float = 3600) -> dict[str, Any]:
    """A `saco` command; its last stdout line (JSON). Its stderr is passed on when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "saco", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ONE_THREAD},
    )
    if done.returncode != 0:
        raise RuntimeError(f"saco {args[0]} exited with {done.returncode}: {done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@contextlib.contextmanager
def replicas(store: Path, redis_url: str, prefix: str, count: int, log_dir: Path, seed: int) -> Iterator[list[str]]:
    """`count` `saco serve` processes on one Redis and one model store; yields their base URLs. Replica i draws
    its explorations from seed `seed * 10 + i`."""
    env = {
        "SACO_ADMIN_TOKEN": TOKEN,
        "SACO_REDIS_PREFIX": prefix,
        "SACO_DEVICE": "cpu",
        "SACO_LOG_LEVEL": "WARNING",
        # replicas, Redis, the client and the training share 2 busy cores: the default 0.5 s read timeout
        # answers 503s when a training run takes the CPUs
        "SACO_REDIS_SOCKET_TIMEOUT_S": "5",
        **ONE_THREAD,
    }
    with start_replicas(
        store,
        count,
        redis_url=redis_url,
        env=lambda i: {**env, "SACO_EXPLORATION_SEED": str(seed * 10 + i)},
        log_dir=log_dir,
        cwd=REPO,
    ) as bases:
        yield bases


def served_version(base: str) -> str:
    return str(httpx.get(base + "/readyz", timeout=10).json()["model_version"])


def campaign_view(base: str, campaign: str = CAMPAIGN) -> dict[str, Any]:
    resp = httpx.get(f"{base}/v1/admin/campaigns/{campaign}", headers=ADMIN, timeout=30)
    resp.raise_for_status()
    return dict(resp.json())


# ---- traffic ------------------------------------------------------------------------------------------
@dataclass
class Traffic:
    requests: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    decisions: int = 0

    def fail(self, what: str) -> None:
        self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(what)


async def _post(client: httpx.AsyncClient, url: str, body: bytes, traffic: Traffic) -> dict[str, Any] | None:
    """One request, never retried: anything but a 200 is a failed request."""
    traffic.requests += 1
    try:
        resp = await client.post(url, content=body, headers={"Content-Type": "application/json"})
    except httpx.HTTPError as exc:
        traffic.fail(f"POST {url}: {type(exc).__name__}: {exc}")
        return None
    if resp.status_code != 200:
        traffic.fail(f"POST {url}: {resp.status_code} {resp.text[:200]}")
        return None
    return dict(orjson.loads(resp.content))


async def serve_cohort(
    world: SyntheticWorld, bases: list[str], users: int, seed: int, period: int, cfg: LoopConfig
) -> Traffic:
    """One period: a fresh cohort (population `seed`) served round by round through the replicas."""
    traffic = Traffic()
    episode = world.start(users, seed)
    ids = np.array([f"p{period}-u{i}" for i in range(users)])
    semaphore = asyncio.Semaphore(cfg.concurrency)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as client:
        for t in range(world.rounds):
            features = world.features(episode)
            arrival = np.random.default_rng([seed, t, 7]).permutation(users)
            actions = np.zeros(users, np.int64)
            decision_ids: list[str | None] = [None] * users
            chunks = [arrival[i : i + cfg.request_users] for i in range(0, users, cfg.request_users)]

            async def decide(
                k: int,
                rows: np.ndarray,
                t: int = t,
                features: np.ndarray = features,
                actions: np.ndarray = actions,
                decision_ids: list[str | None] = decision_ids,
            ) -> None:
                payload = {
                    "requests": [
                        {"user_id": ids[r], "request_id": f"p{period}-{t}-{r}", "features": features[r]} for r in rows
                    ]
                }
                body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
                async with semaphore:
                    out = await _post(
                        client, f"{bases[k % len(bases)]}/v1/campaigns/{CAMPAIGN}/decisions", body, traffic
                    )
                if out is None:
                    return  # these users got no decision: no coupon
                for r, decision in zip(rows, out["decisions"], strict=True):
                    actions[r] = decision["action"]
                    decision_ids[r] = decision["decision_id"]
                traffic.decisions += len(rows)

            await asyncio.gather(*(decide(k, rows) for k, rows in enumerate(chunks)))
            response = world.step(episode, actions)
            outcomes = [
                {"decision_id": decision_ids[r], "reward": round(float(response.reward[r]), 2), "cost": float(c)}
                for r, c in enumerate(response.cost)
                if decision_ids[r] is not None
            ]
            for k in range(0, len(outcomes), 1000):
                body = orjson.dumps({"outcomes": outcomes[k : k + 1000]})
                url = f"{bases[(t + k // 1000) % len(bases)]}/v1/campaigns/{CAMPAIGN}/outcomes"
                await _post(client, url, body, traffic)
    return traffic


class Probe:
    """Decision requests to every replica, one after another, until stopped; records each answer's model
    version per replica (a reload under traffic shows as the old version, then the new one)."""

    def __init__(self, bases: list[str], features: np.ndarray, gap_s: float) -> None:
        self.bases, self.features, self.gap_s = bases, features, gap_s
        self.traffic = Traffic()
        self.versions: dict[str, list[str]] = {b: [] for b in bases}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        n = 0
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                base = self.bases[n % len(self.bases)]
                rows = np.arange(n * 8, n * 8 + 8) % len(self.features)
                body = {
                    "requests": [{"user_id": f"probe-{n}-{r}", "features": self.features[r].tolist()} for r in rows]
                }
                self.traffic.requests += 1
                try:
                    resp = client.post(f"{base}/v1/campaigns/{PROBE}/decisions", json=body)
                except httpx.HTTPError as exc:
                    self.traffic.fail(f"probe {base}: {type(exc).__name__}: {exc}")
                else:
                    if resp.status_code == 200:
                        version = resp.json()["decisions"][0]["model_version"]
                        seen = self.versions[base]
                        if not seen or seen[-1] != version:
                            seen.append(version)
                    else:
                        self.traffic.fail(f"probe {base}: {resp.status_code} {resp.text[:200]}")
                n += 1
                self._stop.wait(self.gap_s)


# ---- the loop -----------------------------------------------------------------------------------------
def run_loop(cfg: LoopConfig, work: Path, redis_url: str, prefix: str, log: Callable[[str], None] = say) -> LoopResult:
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    store, logs_dir, random_logs = work / "store", work / "export", work / "random.parquet"
    world_cfg = WorldConfig(users=cfg.log_users, rounds=cfg.rounds, seed=cfg.seed)
    world = SyntheticWorld(world_cfg)

    # 1. the first model, on random logs
    write_logs(simulate_logs(world_cfg), random_logs)
    log(f"random logs: {cfg.log_users} users x {cfg.rounds} rounds; saco train --epochs {cfg.epochs}")
    trained = cli("train", "--logs", str(random_logs), "--store", str(store), "--epochs", str(cfg.epochs))
    random_spend_per_user = float(load_logs(random_logs).cost.sum()) / cfg.log_users
    per_user = cfg.budget_fraction * random_spend_per_user
    calibrated = cli(
        "calibrate", "--store", str(store), "--logs", str(random_logs), "--budget", f"{per_user * cfg.log_users:.2f}"
    )
    first_version = str(trained["version"])
    log(f"first model {first_version}: lambda {calibrated['lambda']:.4g} for {per_user:.3f} per user")

    # the yardstick: a fresh population, never served; the target spend is the random policy's there x fraction
    eval_seed = cfg.seed * 100_000 + 90_000
    random_eval = rollout(
        world, RandomPolicy(world.num_actions, eval_seed), 0.0, n_users=cfg.eval_users, seed=eval_seed
    )
    target = cfg.budget_fraction * random_eval.cost
    models = ModelStore(store)
    first = evaluate_at_spend(world, models.load(first_version), cfg.eval_users, eval_seed, target)
    log(
        f"first model on the fresh population: revenue {first.revenue:,.0f} at spend {first.cost:,.0f} "
        f"(lambda {first.lam:.4g})"
    )

    periods: list[PeriodResult] = []
    coupons = [{"action": a, "cost": float(v)} for a, v in enumerate(world.values) if a > 0]
    probe_features = world.features(world.start(256, cfg.seed * 100_000 + 80_000))
    with replicas(store, redis_url, prefix, 2, work, cfg.seed) as bases:
        # the campaign plans one period more than is served here: the last run still has a horizon to recalibrate
        planned = (cfg.periods + 1) * cfg.users * cfg.rounds
        body: dict[str, Any] = {
            "budget": round(per_user / cfg.rounds * planned, 2),
            "coupons": coupons,
            "expected_decisions": planned,
            "pacing": False,  # the lambda the loop recalibrates is the one decisions use
            "reservation_mode": "expected",
            "exploration_rate": cfg.exploration_rate,
            "holdout_rate": cfg.holdout_rate,
        }
        httpx.put(f"{bases[0]}/v1/admin/campaigns/{CAMPAIGN}", json=body, headers=ADMIN, timeout=30).raise_for_status()
        probe_body = {"budget": 1e9, "coupons": coupons}
        httpx.put(
            f"{bases[0]}/v1/admin/campaigns/{PROBE}", json=probe_body, headers=ADMIN, timeout=30
        ).raise_for_status()
        channel = f"{prefix}models"
        import redis

        subscribers = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 30
        while dict(subscribers.pubsub_numsub(channel)).get(channel.encode(), 0) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas never subscribed to the models channel")
            time.sleep(0.05)
        subscribers.close()

        for period in range(1, cfg.periods + 1):
            seconds: dict[str, float] = {}
            clock = time.perf_counter()
            cohort_seed = cfg.seed * 100_000 + 30_000 + period
            traffic = asyncio.run(serve_cohort(world, bases, cfg.users, cohort_seed, period, cfg))
            seconds["serve"] = time.perf_counter() - clock
            log(
                f"period {period}: {traffic.decisions:,} decisions in {traffic.requests} requests "
                f"({traffic.failed} failed) in {seconds['serve']:.0f}s"
            )
            for error in traffic.errors[:5]:
                log(f"  failed: {error}")
            clock = time.perf_counter()
            exported = cli("export", "--redis-url", redis_url, "--prefix", prefix, "--out", str(logs_dir))
            seconds["export"] = time.perf_counter() - clock
            lam_before = float(campaign_view(bases[0])["lambda"])
            versions_before = {b: served_version(b) for b in bases}
            run = [
                "scheduler", "--every", "3600", "--runs", "1", "--no-export", "--logs", str(logs_dir),
                "--store", str(store), "--redis-url", redis_url, "--prefix", prefix, "--admin-url", bases[0],
                "--admin-token", TOKEN, "--campaign", CAMPAIGN, "--maturity-days", "0",
                "--epochs", str(cfg.epochs), "--tolerance", str(cfg.tolerance),
                "--eval-fraction", str(cfg.eval_fraction), "--cross-fit" if cfg.cross_fit else "--no-cross-fit",
                "--refit" if cfg.refit else "--no-refit",
            ]  # fmt: skip
            if cfg.warm_start:
                run.append("--warm-start")
            clock = time.perf_counter()
            with Probe(bases, probe_features, cfg.probe_gap_s) as probe:
                report = cli(*run)
                (work / "reports").mkdir(exist_ok=True)
                (work / "reports" / f"period-{period}.json").write_text(json.dumps(report, indent=1))
                seconds["scheduler"] = time.perf_counter() - clock
                current = models.current_version()
                deadline = time.monotonic() + 60
                while {served_version(b) for b in bases} != {current}:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the replicas serve {[served_version(b) for b in bases]}, not {current}")
                    time.sleep(0.1)
                time.sleep(0.5)  # a few more probe requests on the new version
            seconds["reload"] = time.perf_counter() - clock - seconds["scheduler"]
            view = campaign_view(bases[0])
            assert current is not None
            clock = time.perf_counter()
            evaluation = evaluate_at_spend(world, models.load(current), cfg.eval_users, eval_seed, target)
            candidate = report.get("candidate")
            if candidate is not None and candidate != current:
                tried = evaluate_at_spend(world, models.load(candidate), cfg.eval_users, eval_seed, target)
                candidate_ratio: float | None = tried.revenue / first.revenue
            else:
                candidate_ratio = evaluation.revenue / first.revenue if candidate is not None else None
            incumbent_revenue = periods[-1].evaluation.revenue if periods else first.revenue
            vs_incumbent = None if candidate_ratio is None else candidate_ratio * first.revenue / incumbent_revenue
            seconds["evaluate"] = time.perf_counter() - clock
            result = PeriodResult(
                period=period,
                decisions=traffic.decisions,
                explored=int(view.get("explored") or 0),
                traffic_requests=traffic.requests,
                traffic_failed=traffic.failed,
                probe_requests=probe.traffic.requests,
                probe_failed=probe.traffic.failed,
                exported=exported,
                decision=str(report["decision"]),
                reasons=list(report["reasons"]),
                candidate=candidate,
                served={b: served_version(b) for b in bases},
                probe_versions=probe.versions,
                lam_before=lam_before,
                lam_after=float(view["lambda"]),
                recalibrated=list(report.get("recalibrated") or []),
                evaluation=evaluation,
                ratio=evaluation.revenue / first.revenue,
                candidate_ratio=candidate_ratio,
                candidate_vs_incumbent=vs_incumbent,
                gate_estimate=gate_estimate(report),
                seconds=seconds,
            )
            periods.append(result)
            log(
                f"period {period}: {result.decision} {result.candidate} (was {sorted(set(versions_before.values()))}); "
                f"lambda {lam_before:.4g} -> {result.lam_after:.4g}; revenue at equal spend / first model "
                f"{result.ratio:.4f} (the candidate's {_fmt(result.candidate_ratio)}); scheduler "
                f"{seconds['scheduler']:.0f}s, probe {probe.traffic.requests} requests ({probe.traffic.failed} failed)"
            )
            for reason in result.reasons:
                log(f"  gate: {reason}")
    return LoopResult(cfg, first_version, first, periods, time.perf_counter() - started)


def gate_estimate(report: dict[str, Any]) -> dict[str, float | None]:
    """The gate's paired difference at equal spend relative to the incumbent's revenue per decision (what the
    tolerance is a share of), its standard error, the candidate's effective sample size and the evidence."""
    gate = report.get("metrics", {}).get("gate", {})
    difference = gate.get("off_policy_difference", {})
    if difference.get("relative") is None:
        return {}
    data = report.get("metrics", {}).get("data", {})
    return {
        "difference": difference["relative"],
        "stderr": difference.get("relative_stderr"),
        "ess": gate.get("off_policy", {}).get("candidate", {}).get("ess"),
        "decisions": gate.get("operating_point", {}).get("decisions"),
        "held_out_decisions": data.get("held_out_decisions"),
        "new_decisions": data.get("new_decisions"),
    }


# ---- output -------------------------------------------------------------------------------------------
def _fmt(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.4f}"


def _estimate(gate: dict[str, float | None]) -> str:
    d, se = gate.get("difference"), gate.get("stderr")
    return "n/a" if d is None else f"{1 + d:.4f} +- {se:.4f}" if se is not None else f"{1 + d:.4f}"


def table(result: LoopResult) -> str:
    f = result.first
    lines = [
        f"first model {result.first_version} (random logs): revenue {f.revenue:,.1f} at spend {f.cost:,.1f} "
        f"(target {f.target:,.1f}, lambda {f.lam:.4g}) on {result.config.eval_users} fresh users",
        "| period | decisions served (explored so far) | failed requests (traffic / probe) | scheduler run | "
        "served version (both replicas) | lambda before -> after | revenue / first model at equal spend: serving "
        "(candidate) | candidate / incumbent at equal spend: fresh population (gate's estimate +- stderr) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in result.periods:
        served = sorted(set(p.served.values()))
        lines.append(
            f"| {p.period} | {p.decisions:,} ({p.explored:,}) | {p.traffic_failed} / {p.probe_failed} | {p.decision} | "
            f"{', '.join(served)} | {p.lam_before:.4g} -> {p.lam_after:.4g} | {p.ratio:.4f} "
            f"({_fmt(p.candidate_ratio)}) | {_fmt(p.candidate_vs_incumbent)} ({_estimate(p.gate_estimate)}) |"
        )
    return "\n".join(lines)


def gate_lines(result: LoopResult) -> str:
    out = []
    for p in result.periods:
        out.append(f"period {p.period}: {p.decision}")
        out.extend(f"  {r}" for r in p.reasons)
    return "\n".join(out)


@dataclass
class Candidate:
    """A run's candidate: its revenue against the incumbent's at equal spend on the fresh population, and the gate."""

    seed: int
    period: int
    ratio: float  # candidate / incumbent
    decision: str
    estimate: float | None  # the gate's: 1 + difference / incumbent's revenue
    stderr: float | None  # of that difference, relative to the incumbent's revenue
    ess: float | None
    decisions: int | None  # the gate's evidence (decisions scored)


def candidates(results: list[LoopResult]) -> list[Candidate]:
    out = []
    for r in results:
        for p in r.periods:
            if p.candidate_vs_incumbent is None:
                continue
            g = p.gate_estimate
            d, se = g.get("difference"), g.get("stderr")
            ess, n = g.get("ess"), g.get("decisions")
            out.append(
                Candidate(
                    r.config.seed,
                    p.period,
                    p.candidate_vs_incumbent,
                    p.decision,
                    None if d is None else 1.0 + d,
                    se,
                    ess,
                    None if n is None else int(n),
                )
            )
    return out


BETTER, WORSE = 1.03, 0.98  # the must-show's lines: better by more than 3%, worse by more than 2%


def candidate_table(cands: list[Candidate]) -> str:
    lines = [
        "| seed | period | candidate / incumbent at equal spend (fresh population) | gate | gate's estimate | "
        "its stderr | ESS | evidence (decisions) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cands:
        est = "n/a" if c.estimate is None else f"{c.estimate:.4f}"
        se = "n/a" if c.stderr is None else f"{c.stderr:.2%}"
        ess = "n/a" if c.ess is None else f"{c.ess:,.0f}"
        n = "n/a" if c.decisions is None else f"{c.decisions:,}"
        lines.append(f"| {c.seed} | {c.period} | {c.ratio:.4f} | {c.decision} | {est} | {se} | {ess} | {n} |")
    return "\n".join(lines)


def summary(results: list[LoopResult], cands: list[Candidate]) -> list[str]:
    """The three criteria, each with whether it holds."""
    better = [c for c in cands if c.ratio > BETTER]
    worse = [c for c in cands if c.ratio < WORSE]
    promoted_better = sum(c.decision == "promoted" for c in better)
    promoted_worse = sum(c.decision == "promoted" for c in worse)
    finals = [r.periods[-1].ratio for r in results if r.periods]
    mean_final = float(np.mean(finals)) if finals else float("nan")
    ok_better = not better or promoted_better >= 0.8 * len(better)
    return [
        f"candidates better than their incumbent by more than 3%: {len(better)}, promoted {promoted_better}"
        + (f" ({promoted_better / len(better):.0%}; at least 80%)" if better else " (none to promote)")
        + (" ok" if ok_better else " FAILS"),
        f"candidates worse than their incumbent by more than 2%: {len(worse)}, promoted {promoted_worse} (none) "
        + ("ok" if promoted_worse == 0 else "FAILS"),
        "the loop's last model / the first model at equal spend: "
        + ", ".join(f"seed {r.config.seed} {r.periods[-1].ratio:.4f}" for r in results if r.periods)
        + f"; mean {mean_final:.4f} (at least 1.01) "
        + ("ok" if mean_final >= 1.01 else "FAILS"),
        f"all candidates: {len(cands)}, promoted {sum(c.decision == 'promoted' for c in cands)}",
    ]


def plot(results: list[LoopResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = candidates(results)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    for decision, color, marker in (("promoted", "tab:green", "o"), ("refused", "tab:red", "x")):
        chosen = [c for c in cands if c.decision == decision and c.estimate is not None]
        if chosen:
            ax.errorbar(
                [c.ratio for c in chosen],
                [float(c.estimate or 0.0) for c in chosen],
                yerr=[2 * float(c.stderr or 0.0) for c in chosen],
                fmt=marker,
                color=color,
                ecolor=color,
                alpha=0.8,
                capsize=2,
                label=f"{decision} ({len(chosen)})",
            )
    xs = [c.ratio for c in cands] or [1.0]
    lo, hi = min(min(xs), WORSE) - 0.01, max(max(xs), BETTER) + 0.01
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls=":", label="estimate = truth")
    ax.axvspan(lo, WORSE, color="tab:red", alpha=0.08, label="worse by > 2%: must be refused")
    ax.axvspan(BETTER, hi, color="tab:green", alpha=0.08, label="better by > 3%: 80% promoted")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("candidate / incumbent: revenue at equal spend on a population never served")
    ax.set_ylabel("the gate's estimate (+- 2 stderr)")
    ax.set_title("every candidate, every seed: the truth and the gate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for r in results:
        x = [0, *[p.period for p in r.periods]]
        y = [1.0, *[p.ratio for p in r.periods]]
        bx.plot(x, y, "o-", label=f"seed {r.config.seed}")
    bx.axhline(1.0, color="k", ls="--", lw=1)
    bx.axhline(1.01, color="tab:gray", ls=":", lw=1)
    if results:
        bx.set_xticks(range(results[0].config.periods + 1))
    bx.set_xlabel("period (0: the first model, trained on random logs)")
    bx.set_ylabel("serving model / first model, equal spend")
    cfg = results[0].config if results else LoopConfig()
    bx.set_title(f"the loop: {cfg.users:,} users x {cfg.rounds} rounds a period, exploration {cfg.exploration_rate:g}")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    defaults = LoopConfig()
    ap.add_argument("--periods", type=int, default=defaults.periods)
    ap.add_argument("--users", type=int, default=defaults.users, help="users served per period (a fresh cohort)")
    ap.add_argument("--rounds", type=int, default=defaults.rounds)
    ap.add_argument("--log-users", type=int, default=defaults.log_users, help="users in the random logs")
    ap.add_argument("--epochs", type=int, default=defaults.epochs)
    ap.add_argument("--eval-users", type=int, default=defaults.eval_users)
    ap.add_argument("--budget-fraction", type=float, default=defaults.budget_fraction)
    ap.add_argument("--exploration-rate", type=float, default=defaults.exploration_rate)
    ap.add_argument("--holdout-rate", type=float, default=defaults.holdout_rate)
    ap.add_argument(
        "--warm-start",
        action=argparse.BooleanOptionalAction,
        default=defaults.warm_start,
        help="candidates start from the incumbent's weights",
    )
    ap.add_argument("--tolerance", type=float, default=defaults.tolerance, help="the gate's tolerance")
    ap.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction, help="users held out")
    ap.add_argument(
        "--cross-fit",
        action=argparse.BooleanOptionalAction,
        default=defaults.cross_fit,
        help="decisions new to the incumbent are evidence too",
    )
    ap.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=defaults.refit,
        help="a passing candidate is retrained on both halves' decisions",
    )
    ap.add_argument("--seeds", default=str(defaults.seed), help="comma-separated world seeds, one loop each")
    ap.add_argument("--redis-url", help="a Redis to use (keys under a fresh prefix); default: a throwaway one")
    ap.add_argument("--png", type=Path, help="write the candidates' truth against the gate, and the loops, here")
    ap.add_argument("--json", type=Path, help="write every period's figures here")
    ap.add_argument("--work", type=Path, help="keep the logs, the model stores and the runs' reports here")
    args = ap.parse_args()
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    base = LoopConfig(
        periods=args.periods,
        users=args.users,
        rounds=args.rounds,
        log_users=args.log_users,
        epochs=args.epochs,
        eval_users=args.eval_users,
        budget_fraction=args.budget_fraction,
        exploration_rate=args.exploration_rate,
        holdout_rate=args.holdout_rate,
        warm_start=args.warm_start,
        tolerance=args.tolerance,
        eval_fraction=args.eval_fraction,
        cross_fit=args.cross_fit,
        refit=args.refit,
    )
    import torch

    torch.set_num_threads(1)
    results: list[LoopResult] = []
    started = time.perf_counter()
    for seed in seeds:
        cfg = replace(base, seed=seed)
        prefix = f"loop-bench-{os.getpid()}-{seed}:"
        with contextlib.ExitStack() as stack:
            if args.work is not None:
                work = args.work / f"seed-{seed}"
            else:
                work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="saco-loop-")))
            url = args.redis_url or stack.enter_context(start_redis()).url
            result = run_loop(cfg, work, url, prefix)
            if args.redis_url:
                _delete_prefixed(url, prefix)
        results.append(result)
        say(f"seed {seed}: done in {result.seconds / 60:.1f} min")
        print(
            f"seed {seed}: {cfg.periods} periods of {cfg.users} users x {cfg.rounds} rounds through 2 replicas, "
            f"exploration {cfg.exploration_rate:g}, holdout {cfg.holdout_rate:g}, {cfg.epochs} epochs"
            f"{', warm start' if cfg.warm_start else ''}, tolerance {cfg.tolerance:g}, eval fraction "
            f"{cfg.eval_fraction:g}{', cross-fitted' if cfg.cross_fit else ''}{', refit' if cfg.refit else ''}; "
            f"{result.seconds / 60:.1f} min",
            flush=True,
        )
        print(table(result))
        print(gate_lines(result), flush=True)
    cands = candidates(results)
    print(f"\nevery candidate ({len(seeds)} seeds, {(time.perf_counter() - started) / 60:.0f} min):")
    print(candidate_table(cands))
    print("\n".join(summary(results, cands)))
    if args.png:
        plot(results, args.png)
        print(f"figure: {args.png}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1, default=str))
    return 0


def _delete_prefixed(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for key in list(client.scan_iter(match=prefix + "*", count=1000)):
        client.delete(key)
    client.close()


if __name__ == "__main__":
    sys.exit(main())
