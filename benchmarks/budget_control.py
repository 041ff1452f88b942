"""Budget control through the real service: BARate, revenue at equal spend, overspend, pacing.

The project's sequential world (research/world.py) driven through `saco serve` on a throwaway
Redis. Per world (a low- and a high-redemption setting of WorldConfig): random logs (the code of `saco
simulate`, with the world's settings), `saco train`, `saco calibrate` (twice: same lambda?) to half the
random policy's spend, then many campaigns served concurrently by one service, one campaign per seed, each
a fresh population of the world: `--users` users x `--rounds` rounds, every round the users arrive in
random order in 128-user decision requests, and the round's outcomes (realised reward and cost from the
world) are posted after it. Every campaign plans `expected_decisions` = users x rounds (so pacing is on)
and has a budget of half the random policy's expected spend on its own users.

Variants, per world and reservation mode (`strict`, `expected`): pacing from the calibrated lambda, from
0 and from twice the calibrated lambda. Also per world: the perfect-information myopic oracle through the
same service, ledger and pacing (a second service whose "model" is a TorchScript module scoring
E[reward] - lambda E[cost] from the world's exact expected responses, sent as the request's features),
strict mode, from its own spend-matching lambda; and the model at the calibrated lambda with pacing off
and a budget that never binds (what `saco calibrate` predicts).

Per variant it prints BARate (realised spend / budget), revenue at equal spend against the myopic oracle
and against the same exported model run in-process without a ledger (both on the campaign's own users,
interpolated along their spend-vs-lambda curves at the campaign's expected spend), revenue and spend
against that model offline at the calibrated lambda, overspend frequency and size, spend against plan
after the first tenth of the horizon and at the end; then the issue's targets (PASS / FAIL) and a PNG of
spend against plan over the horizon.

    .venv/bin/python benchmarks/budget_control.py --quick      # 4 + 3 campaigns per variant, 1-3 min on 2 cores
    .venv/bin/python benchmarks/budget_control.py --expected-campaigns 70 --strict-campaigns 20 \
        --png docs/budget_control.png                            # 620 campaigns, ~8 min (docs/service.md)
    ... --request-gap 0                                         # a campaign in ~8 s: ~40 pacing steps
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
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from model_store import ModelStore, ScoringModule, load_scripted, save_scripted  # noqa: E402
from offline.calibrate import search_monotone  # noqa: E402
from offline.logs import load_logs, write_logs  # noqa: E402
from offline.rollout import Policy, SequencePolicy  # noqa: E402
from research.baselines import MyopicOracle  # noqa: E402
from research.simulate import simulate_logs  # noqa: E402
from research.world import Episode, SyntheticWorld, UserPopulation, WorldConfig, WorldState  # noqa: E402
from service.replicas import start_replica  # noqa: E402
from service.state.servers import start_redis  # noqa: E402

TOKEN = "budget-control-token"
REQUEST_USERS = 128
# Worlds whose coupons are redeemed rarely or often (WorldConfig knobs; everything else at its default):
# strong fatigue and no habit -> about 1 coupon in 5 redeemed; strong habit, no fatigue -> about 1 in 2.
WORLDS: dict[str, dict[str, Any]] = {"low": {"habit": 0.0, "fatigue": 2.0}, "high": {"habit": 2.0, "fatigue": 0.0}}
STARTS = {"cal": 1.0, "zero": 0.0, "double": 2.0}  # pacing starts from this multiple of the calibrated lambda
START_NAMES = {"cal": "calibrated", "zero": "0", "double": "2x calibrated"}
OPEN_BUDGET = 10.0  # the pacing-off variant's budget multiple: the ledger never binds


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- populations: many seeds' users in one vectorised episode ---------------------------------------------
def stack_episodes(episodes: list[Episode]) -> Episode:
    """The users of several episodes of one world as one episode (users never interact in the world, so
    each keeps exactly the trajectory it would have alone, whatever the policy)."""

    def cat(name: str, obj: Callable[[Episode], Any], axis: int = 0) -> np.ndarray:
        return np.concatenate([getattr(obj(e), name) for e in episodes], axis=axis)

    first = episodes[0]
    users = UserPopulation(
        *(cat(n, lambda e: e.users) for n in ("base", "sensitivity", "basket", "mean_state", "trait_view"))
    )
    x, habit, fatigue, reference = (cat(n, lambda e: e.state) for n in ("x", "habit", "fatigue", "reference"))
    state = WorldState(x, habit, fatigue, reference)
    return Episode(
        config=first.config,
        users=users,
        state=state,
        rng_noise=first.rng_noise,
        purchase_uniforms=cat("purchase_uniforms", lambda e: e, axis=1),
        state_noise=cat("state_noise", lambda e: e, axis=1),
        feature_noise=cat("feature_noise", lambda e: e, axis=1),
    )


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, num_actions: int, seed: int) -> None:
        self.num_actions, self.seed = num_actions, seed

    def act(self, features: np.ndarray, t: int, lam: float, expected: Any = None) -> np.ndarray:
        return np.random.default_rng([self.seed, t]).integers(0, self.num_actions, len(features))


def per_user_rollout(
    world: SyntheticWorld, seeds: list[int], users: int, policy: Policy, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """Expected revenue and cost per seed [S] of `policy` at `lam` on the seeds' populations, no ledger; the
    policy observes sampled outcomes (as the service's contexts do), totals are exact expected values."""
    episode = stack_episodes([world.start(users, seed) for seed in seeds])
    n = len(seeds) * users
    policy.begin(n)
    revenue, cost = np.zeros(n), np.zeros(n)
    for t in range(world.rounds):
        features = world.features(episode)
        expected = world.expected_response(episode) if policy.needs_oracle else None
        actions = np.asarray(policy.act(features, t, lam, expected), dtype=np.int64)
        response = world.step(episode, actions)
        policy.observe(actions, response.reward, response.cost)
        revenue += response.expected_reward
        cost += response.expected_cost
    return revenue.reshape(len(seeds), users).sum(1), cost.reshape(len(seeds), users).sum(1)


@dataclass
class Curve:
    """Expected revenue and cost per seed along a lambda grid (no ledger)."""

    lams: list[float]
    revenue: np.ndarray  # [lambdas, seeds]
    cost: np.ndarray

    def revenue_at(self, column: int, spend: float) -> tuple[float, bool]:
        """Revenue at `spend` for one seed, linear between grid points; False when `spend` is outside."""
        cost, revenue = self.cost[:, column], self.revenue[:, column]
        order = np.argsort(cost, kind="stable")
        inside = bool(cost.min() <= spend <= cost.max())
        return float(np.interp(spend, cost[order], revenue[order])), inside


def curve(world: SyntheticWorld, seeds: list[int], users: int, policy: Policy, lams: list[float]) -> Curve:
    points = [per_user_rollout(world, seeds, users, policy, lam) for lam in lams]
    return Curve(lams, np.array([p[0] for p in points]), np.array([p[1] for p in points]))


# ---- the oracle as a served model ----------------------------------------------------------------------
class OracleScores(ScoringModule):
    """The myopic oracle behind the service's model interface: the request's features are the world's exact
    E[reward | action] (first K values) and E[cost | action] (next K); scores E[reward] - lambda E[cost]."""

    def __init__(self, num_actions: int) -> None:
        super().__init__()
        self.k = num_actions

    def scores(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return x[:, : self.k] - lam.unsqueeze(1) * x[:, self.k : 2 * self.k]

    def terms(self, x: torch.Tensor) -> torch.Tensor:
        """E[reward], E[cost] (the score's terms) and E[cost] (its expected cost now): the same pacing and
        reservations as the model's."""
        return torch.cat([x[:, : 2 * self.k], x[:, self.k : 2 * self.k]], dim=1)


def publish_oracle(model_store: Path, oracle_store: Path, lam: float) -> None:
    manifest = ModelStore(model_store).load().manifest.to_json()
    k, dim = manifest["num_actions"], manifest["feature_dim"]
    if dim != 2 * k:
        raise SystemExit(f"the oracle needs feature_dim = 2 x num_actions, the model has {dim} and {k}")
    for name in ("version", "created_at", "model_sha256"):
        manifest.pop(name, None)
    manifest.update(lambda_table=[], default_lambda=lam, metrics={}, score_terms=True, cost_ratios=[])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        save_scripted(OracleScores(k), path)
        ModelStore(oracle_store).publish(path, manifest)


def publish_biased(model_store: Path, biased_store: Path, bias: float) -> None:
    """The model with its expected costs (what `expected` reservations start from) multiplied by `bias`; its
    scores, hence its decisions, unchanged."""
    artifact = ModelStore(model_store).load()
    manifest = artifact.manifest.to_json()
    for name in ("version", "created_at", "model_sha256"):
        manifest.pop(name, None)
    module = load_scripted(artifact.model_path)
    with torch.no_grad():
        module.cost_weight.mul_(bias)
        module.cost_bias.mul_(bias)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        save_scripted(module, path)
        ModelStore(biased_store).publish(path, manifest)


def oracle_features(world: SyntheticWorld, episode: Episode) -> np.ndarray:
    reward, cost = world.expected_response(episode)
    return np.concatenate([reward, cost], axis=1).astype(np.float32)


# ---- the service ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def service(store: Path, redis_url: str, prefix: str, pacing_interval: float, log: Path) -> Iterator[str]:
    """`saco serve` on `store`; its log (warnings) goes to `log`."""
    env = {
        "SACO_ADMIN_TOKEN": TOKEN,
        "SACO_REDIS_PREFIX": prefix,
        "SACO_LOG_LEVEL": "WARNING",
        "SACO_PACING_INTERVAL_S": str(pacing_interval),
        # the service, Redis and this client share 2 busy cores: the default 0.5 s read timeout answers 503s
        "SACO_REDIS_SOCKET_TIMEOUT_S": "5",
    }
    replica = start_replica(store, redis_url=redis_url, env=env, log=log, cwd=REPO)
    try:
        yield replica.base
    finally:
        replica.stop()


@dataclass(frozen=True)
class Variant:
    key: str
    mode: str  # strict | expected
    start: str  # a key of STARTS
    pacing: bool = True
    oracle: bool = False
    budget_factor: float = 1.0
    cost_bias: float = 1.0  # the served model's expected costs are this multiple of the trained model's
    pacing_method: str = "resolve"

    @property
    def service(self) -> str:
        """Which service runs it: the model, the oracle, or the model with biased expected costs."""
        return "oracle" if self.oracle else "model" if self.cost_bias == 1.0 else f"bias{self.cost_bias:g}"

    @property
    def label(self) -> str:
        who = "oracle" if self.oracle else "model"
        pace = "pacing" if self.pacing else "pacing off, open budget"
        if self.pacing and self.pacing_method != "resolve":
            pace += f" ({self.pacing_method})"
        bias = "" if self.cost_bias == 1.0 else f", expected costs x{self.cost_bias:g}"
        return f"{who} {self.mode}, from {START_NAMES[self.start]}, {pace}{bias}"


@dataclass
class CampaignResult:
    world: str
    variant: str
    seed: int
    budget: float
    spent: list[float] = field(default_factory=list)  # realised spend after each round's outcomes
    # the world's exact expected cost of the decisions made, after each round: spend without purchase noise
    expected_spent: list[float] = field(default_factory=list)
    lams: list[float] = field(default_factory=list)  # the campaign's lambda after each round
    request_lams: list[float] = field(default_factory=list)  # the lambda of each decision request
    coupons: int = 0
    redeemed: int = 0
    expected_revenue: float = 0.0
    expected_cost: float = 0.0
    realised_revenue: float = 0.0
    realised_cost: float = 0.0
    reserved_end: float = 0.0
    overrun: float = 0.0
    seconds: float = 0.0


class Runner:
    """Runs campaigns against a model service and an oracle service, `concurrency` at a time."""

    def __init__(
        self,
        world_name: str,
        world: SyntheticWorld,
        users: int,
        lam: float,
        oracle_lam: float,
        budgets: dict[int, float],
        concurrency: int,
        gap: float = 0.0,
    ) -> None:
        self.world_name, self.world, self.users = world_name, world, users
        self.lam, self.oracle_lam, self.budgets = lam, oracle_lam, budgets
        self.semaphore = asyncio.Semaphore(concurrency)
        self.gap = gap  # seconds between a campaign's requests (traffic spread over time: pacing steps between)
        self.decisions = 0
        self.done = 0
        self.retries = 0

    async def _post(self, client: httpx.AsyncClient, path: str, body: bytes) -> Any:
        return await self._call(client, "POST", path, body)

    async def _call(self, client: httpx.AsyncClient, method: str, path: str, body: bytes | None = None) -> Any:
        """One request, retried on a 503 (state store busy) or a dropped connection: decisions carry request
        ids (a repeated one returns its first decision), outcomes are idempotent."""
        headers = {"Content-Type": "application/json"}
        if "/admin/" in path:
            headers["Authorization"] = f"Bearer {TOKEN}"
        for attempt in range(50):
            try:
                resp = await client.request(method, path, content=body, headers=headers)
            except httpx.TransportError:  # a dropped keep-alive connection: every call here may be repeated
                self.retries += 1
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if resp.status_code == 503:
                self.retries += 1
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if resp.status_code != 200:
                raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text[:300]}")
            return orjson.loads(resp.content)
        raise RuntimeError(f"{method} {path}: still 503 after 50 tries")

    async def campaign(self, client: httpx.AsyncClient, variant: Variant, seed: int) -> CampaignResult:
        async with self.semaphore:
            return await self._campaign(client, variant, seed)

    async def _campaign(self, client: httpx.AsyncClient, variant: Variant, seed: int) -> CampaignResult:
        started = time.perf_counter()
        world, users, rounds = self.world, self.users, self.world.rounds
        cid = f"{self.world_name}-{variant.key}-s{seed}"
        budget = round(self.budgets[seed] * variant.budget_factor, 2)
        lam = (self.oracle_lam if variant.oracle else self.lam) * STARTS[variant.start]
        body: dict[str, Any] = {
            "budget": budget,
            "coupons": [{"action": a, "cost": float(v)} for a, v in enumerate(world.values) if a > 0],
            "lambda": lam,
            "reservation_mode": variant.mode,
            "expected_decisions": users * rounds,
            "pacing": variant.pacing,
            "pacing_method": variant.pacing_method,
        }
        await self._call(client, "PUT", f"/v1/admin/campaigns/{cid}", orjson.dumps(body))
        result = CampaignResult(self.world_name, variant.key, seed, self.budgets[seed])
        episode = world.start(users, seed)
        ids = np.array([f"u{i}" for i in range(users)])
        for t in range(rounds):
            features = oracle_features(world, episode) if variant.oracle else world.features(episode)
            arrival = np.random.default_rng([seed, t, 7]).permutation(users)
            actions = np.zeros(users, np.int64)
            decision_ids = np.empty(users, dtype=object)
            for i in range(0, users, REQUEST_USERS):
                rows = arrival[i : i + REQUEST_USERS]
                payload = {
                    "requests": [
                        {"user_id": ids[r], "request_id": f"{cid}-{t}-{r}", "features": features[r]} for r in rows
                    ]
                }
                out = await self._post(
                    client,
                    f"/v1/campaigns/{cid}/decisions",
                    orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                )
                result.request_lams.append(float(out["decisions"][0]["lambda"]))
                for r, decision in zip(rows, out["decisions"], strict=True):
                    actions[r] = decision["action"]
                    decision_ids[r] = decision["decision_id"]
                self.decisions += len(rows)
                if self.gap:
                    await asyncio.sleep(self.gap)
            response = world.step(episode, actions)
            outcomes = [
                {"decision_id": decision_ids[r], "reward": round(float(response.reward[r]), 2), "cost": float(c)}
                for r, c in enumerate(response.cost)
            ]
            await self._post(client, f"/v1/campaigns/{cid}/outcomes", orjson.dumps({"outcomes": outcomes}))
            view = await self._call(client, "GET", f"/v1/admin/campaigns/{cid}")
            result.spent.append(view["spent"])
            result.lams.append(view["lambda"])
            result.coupons += int((actions > 0).sum())
            result.redeemed += int(((actions > 0) & (response.cost > 0)).sum())
            result.expected_revenue += float(response.expected_reward.sum())
            result.expected_cost += float(response.expected_cost.sum())
            result.expected_spent.append(result.expected_cost)
            result.realised_revenue += float(np.round(response.reward, 2).sum())
            result.realised_cost += float(response.cost.sum())
        result.reserved_end, result.overrun = view["reserved"], view["overrun"]
        if variant.pacing:  # finished: no more pacing work for the service
            await self._call(client, "PATCH", f"/v1/admin/campaigns/{cid}", b'{"pacing": false}')
        result.seconds = time.perf_counter() - started
        self.done += 1
        return result


async def run_campaigns(runner: Runner, bases: dict[str, str], jobs: list[tuple[Variant, int]]) -> list[CampaignResult]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    timeout = httpx.Timeout(120.0)
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout))
            for name, base in bases.items()
        }
        started = time.perf_counter()

        async def report() -> None:
            while True:
                await asyncio.sleep(15)
                rate = runner.decisions / (time.perf_counter() - started)
                say(
                    f"  [{runner.world_name}] {runner.done}/{len(jobs)} campaigns done, "
                    f"{runner.decisions:,} decisions ({rate:,.0f}/s)"
                )

        reporter = asyncio.create_task(report())
        try:
            tasks = [runner.campaign(clients[v.service], v, seed) for v, seed in jobs]
            return list(await asyncio.gather(*tasks))
        finally:
            reporter.cancel()


def context_failures(base: str) -> float:
    """saco_context_write_failures_total of a service: decisions whose step never reached the user's context."""
    text = httpx.get(base + "/metrics", timeout=10).text
    lines = text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("saco_context_write_failures_total"))


# ---- one world -----------------------------------------------------------------------------------------
def cli(*args: str) -> dict[str, Any]:
    """A `saco` command; its last stdout line (JSON)."""
    out = subprocess.run([sys.executable, "-m", "saco", *args], cwd=REPO, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@dataclass
class WorldRun:
    name: str
    config: dict[str, Any]
    lam_runs: list[float]
    predicted_spend_per_user: float
    oracle_lam: float
    budgets: dict[int, float]
    results: list[CampaignResult]
    model_curve: Curve
    oracle_curve: Curve
    seeds: list[int]
    seconds: dict[str, float]


def variants_for(args: argparse.Namespace) -> list[tuple[Variant, int]]:
    """(variant, number of campaigns)."""
    out: list[tuple[Variant, int]] = []
    for mode, n in (("expected", args.expected_campaigns), ("strict", args.strict_campaigns)):
        for start in STARTS:
            out.append((Variant(f"{mode}-{start}", mode, start), n))
    for bias in args.cost_biases:
        out.append((Variant(f"expected-cal-bias{bias:g}", "expected", "cal", cost_bias=bias), args.expected_campaigns))
    for mode in ("expected", "strict"):  # the ablation: dual descent alone
        for start in ("cal", "zero"):
            variant = Variant(f"{mode}-{start}-descent", mode, start, pacing_method="descent")
            out.append((variant, args.strict_campaigns))
    out.append((Variant("oracle-strict-cal", "strict", "cal", oracle=True), args.strict_campaigns))
    out.append((Variant("open-cal", "strict", "cal", pacing=False, budget_factor=OPEN_BUDGET), args.strict_campaigns))
    return out


def run_world(name: str, args: argparse.Namespace, root: Path, redis_url: str) -> WorldRun:
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    cfg = WorldConfig(users=args.log_users, rounds=args.rounds, seed=args.seed, **WORLDS[name])
    world = SyntheticWorld(cfg)
    work = root / name
    work.mkdir(parents=True)
    logs, store, oracle_store = work / "logs.parquet", work / "store", work / "oracle-store"
    table = simulate_logs(cfg)  # what `saco simulate` runs, with this world's settings
    write_logs(table, logs)
    say(f"[{name}] {table.num_rows:,} logged rows ({WORLDS[name]}); saco train --epochs {args.epochs}")
    trained = cli("train", "--logs", str(logs), "--store", str(store), "--epochs", str(args.epochs), "--seed", "0")
    seconds["train"] = time.perf_counter() - clock
    say(f"[{name}] trained {trained['version']} in {seconds['train']:.0f}s (val loss {trained['val_loss']:.4g})")
    data = load_logs(logs)
    budget_cal = args.budget_fraction * float(data.cost.sum())
    lam_runs, predicted = [], 0.0
    for run in range(args.calibrations):
        clock = time.perf_counter()
        calibrated = cli("calibrate", "--store", str(store), "--logs", str(logs), "--budget", f"{budget_cal:.2f}")
        lam_runs.append(float(calibrated["lambda"]))
        predicted = float(calibrated["cost"]) / int(calibrated["users"])
        seconds[f"calibrate {run + 1}"] = time.perf_counter() - clock
        say(f"[{name}] saco calibrate run {run + 1}: lambda {lam_runs[-1]!r} in {seconds[f'calibrate {run + 1}']:.0f}s")
    lam = lam_runs[0]

    clock = time.perf_counter()
    n_seeds = max(args.expected_campaigns, args.strict_campaigns)
    seeds = [args.seed * 100_000 + 20_000 + s for s in range(n_seeds)]  # never the logs' or calibration's users
    _, random_cost = per_user_rollout(world, seeds, args.users, RandomPolicy(cfg.num_actions, args.seed), 0.0)
    budgets = {s: round(args.budget_fraction * float(c), 2) for s, c in zip(seeds, random_cost, strict=True)}
    # the oracle's own spend-matching lambda, on the logs' population size (not the served users)
    oracle = MyopicOracle()
    per_user_budget = args.budget_fraction * float(random_cost.sum()) / (len(seeds) * args.users)
    cal_seed = args.seed * 100_000 + 10_000

    def oracle_sim(x: float) -> tuple[float, float]:
        rev, cost = per_user_rollout(world, [cal_seed], args.log_users, oracle, x)
        return float(rev[0]), float(cost[0])

    oracle_lam = search_monotone(oracle_sim, per_user_budget * args.log_users).lam
    publish_oracle(store, oracle_store, oracle_lam)
    artifact = ModelStore(store).load()
    policy = SequencePolicy.of_artifact(artifact)
    model_lams = sorted({0.0, *(lam * f for f in (0.25, 0.5, 0.7, 0.85, 1.0, 1.15, 1.3, 1.6, 2.0, 3.0, 5.0, 10.0))})
    model_curve = curve(world, seeds, args.users, policy, model_lams)
    oracle_lams = [0.0, *np.geomspace(oracle_lam / 10, oracle_lam * 10, 41).tolist()]
    oracle_curve = curve(world, seeds, args.users, oracle, oracle_lams)
    seconds["offline references"] = time.perf_counter() - clock
    say(
        f"[{name}] lambda {lam:.4g} (oracle {oracle_lam:.4g}); offline curves of {len(seeds)} populations in "
        f"{seconds['offline references']:.0f}s; serving"
    )

    jobs: list[tuple[Variant, int]] = []
    plan = variants_for(args)
    for s in range(n_seeds):  # interleaved: every variant progresses together
        jobs += [(v, seeds[s]) for v, n in plan if s < n]
    clock = time.perf_counter()
    prefix = f"bc-{name}-{os.getpid()}"
    stores = {"model": store, "oracle": oracle_store}
    for bias in args.cost_biases:
        stores[f"bias{bias:g}"] = work / f"store-bias{bias:g}"
        publish_biased(store, stores[f"bias{bias:g}"], bias)
    with contextlib.ExitStack() as stack:
        bases = {
            key: stack.enter_context(
                service(path, redis_url, f"{prefix}{key}:", args.pacing_interval, work / f"{key}-service.log")
            )
            for key, path in stores.items()
        }
        runner = Runner(name, world, args.users, lam, oracle_lam, budgets, args.concurrency, args.request_gap)
        results = asyncio.run(run_campaigns(runner, bases, jobs))
        failures = {base: context_failures(base) for base in bases.values()}
    seconds["serving"] = time.perf_counter() - clock
    say(
        f"[{name}] {len(results)} campaigns, {runner.decisions:,} decisions in {seconds['serving']:.0f}s; "
        f"{runner.retries} requests retried after a 503 or a dropped connection; "
        f"context write failures {sum(failures.values()):.0f}"
    )
    seconds["503 retries"] = runner.retries
    seconds["context write failures"] = sum(failures.values())
    return WorldRun(
        name,
        asdict(cfg),
        lam_runs,
        predicted,
        oracle_lam,
        budgets,
        results,
        model_curve,
        oracle_curve,
        seeds,
        seconds,
    )


# ---- figures -------------------------------------------------------------------------------------------
def q(values: list[float] | np.ndarray, p: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), p)) if len(values) else float("nan")


def summarise(run: WorldRun, variant: Variant, users: int) -> dict[str, Any]:
    rows = [r for r in run.results if r.variant == variant.key]
    column = {s: i for i, s in enumerate(run.seeds)}
    barate = np.array([r.spent[-1] / r.budget for r in rows])
    first = np.array([r.spent[0] / (r.budget / len(r.spent)) for r in rows])
    first_expected = np.array([r.expected_spent[0] / (r.budget / len(r.spent)) for r in rows])
    over = barate[barate > 1.0] - 1.0
    vs_oracle, vs_model, outside = [], [], 0
    cal = run.model_curve.lams.index(min(run.model_curve.lams, key=lambda x: abs(x - run.lam_runs[0])))
    same_rev, same_cost = [], []
    for r in rows:
        c = column[r.seed]
        rev_o, in_o = run.oracle_curve.revenue_at(c, r.expected_cost)
        rev_m, in_m = run.model_curve.revenue_at(c, r.expected_cost)
        outside += (not in_o) + (not in_m)
        vs_oracle.append(r.expected_revenue / rev_o)
        vs_model.append(r.expected_revenue / rev_m)
        same_rev.append(r.expected_revenue / run.model_curve.revenue[cal, c])
        same_cost.append(r.expected_cost / run.model_curve.cost[cal, c])
    return {
        "world": run.name,
        "variant": variant.key,
        "label": variant.label,
        "campaigns": len(rows),
        "redemption": sum(r.redeemed for r in rows) / max(1, sum(r.coupons for r in rows)),
        "barate_median": q(barate, 50),
        "barate_p5": q(barate, 5),
        "barate_p95": q(barate, 95),
        "barate_min": float(barate.min()),
        "barate_max": float(barate.max()),
        "overspend_freq": float((barate > 1.0).mean()),
        "overspend_worst": float(over.max()) if len(over) else 0.0,
        "first_tenth_median": q(first, 50),
        "first_tenth_p5": q(first, 5),
        "first_tenth_p95": q(first, 95),
        "first_tenth_within_10pct": float((np.abs(first - 1) <= 0.10).mean()),
        "first_tenth_expected_median": q(first_expected, 50),
        "first_tenth_expected_p5": q(first_expected, 5),
        "first_tenth_expected_p95": q(first_expected, 95),
        "first_tenth_expected_within_10pct": float((np.abs(first_expected - 1) <= 0.10).mean()),
        "end_within_3pct": float((np.abs(barate - 1) <= 0.03).mean()),
        "vs_oracle_median": q(vs_oracle, 50),
        "vs_model_median": q(vs_model, 50),
        "vs_model_p5": q(vs_model, 5),
        "same_lambda_revenue_median": q(same_rev, 50),
        "same_lambda_spend_median": q(same_cost, 50),
        "interpolation_outside": outside,
        "open_spend_per_user": float(np.mean([r.realised_cost / users for r in rows])),
        "seconds_median": q([r.seconds for r in rows], 50),
    }


def table(summaries: list[dict[str, Any]]) -> str:
    head = (
        "| world | variant | n | redeemed | BARate median [p5, p95] | overspend freq / worst | spend/plan at 1/10 "
        "median [p5, p95] | within 10% at 1/10 | expected spend/plan at 1/10 median [p5, p95] | within 10% | "
        "within 3% at end | rev / oracle (equal spend) | rev / model offline (equal spend) | "
        "rev, spend / model offline at calibrated lambda |"
    )
    lines = [head, "|" + "---|" * 14]
    for s in summaries:
        over = f"{s['overspend_freq']:.3f} / {100 * s['overspend_worst']:.2f}%"
        lines.append(
            f"| {s['world']} | {s['label']} | {s['campaigns']} | {s['redemption']:.2f} | "
            f"{s['barate_median']:.3f} [{s['barate_p5']:.3f}, {s['barate_p95']:.3f}] | "
            f"{'n/a (budget x10)' if s['variant'] == 'open-cal' else over} | "
            f"{s['first_tenth_median']:.3f} [{s['first_tenth_p5']:.3f}, {s['first_tenth_p95']:.3f}] | "
            f"{s['first_tenth_within_10pct']:.2f} | {s['first_tenth_expected_median']:.3f} "
            f"[{s['first_tenth_expected_p5']:.3f}, {s['first_tenth_expected_p95']:.3f}] | "
            f"{s['first_tenth_expected_within_10pct']:.2f} | {s['end_within_3pct']:.2f} | "
            f"{s['vs_oracle_median']:.3f} | "
            f"{s['vs_model_median']:.3f} | {s['same_lambda_revenue_median']:.3f}, {s['same_lambda_spend_median']:.3f} |"
        )
    return "\n".join(lines)


def targets(runs: list[WorldRun], summaries: list[dict[str, Any]], users: int) -> list[str]:
    def rows(world: str | None, key: str) -> list[CampaignResult]:
        return [r for run in runs for r in run.results if r.variant == key and world in (None, r.world)]

    def barate(rs: list[CampaignResult]) -> np.ndarray:
        return np.array([r.spent[-1] / r.budget for r in rs])

    def first(rs: list[CampaignResult]) -> np.ndarray:
        return np.array([r.spent[0] / (r.budget / len(r.spent)) for r in rs])

    def first_expected(rs: list[CampaignResult]) -> np.ndarray:
        return np.array([r.expected_spent[0] / (r.budget / len(r.spent)) for r in rs])

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    out = []
    exp_keys = [f"expected-{s}" for s in STARTS]
    exp = [r for k in exp_keys for r in rows(None, k)]
    b = barate(exp)
    for run in runs:
        for k in exp_keys:
            med = float(np.median(barate(rows(run.name, k))))
            out.append(f"{verdict(med >= 0.97)} expected mode, {run.name}, {k}: median BARate {med:.3f} (>= 0.97)")
    freq, worst = float((b > 1).mean()), float(max(0.0, (b - 1).max()))
    out.append(
        f"{verdict(freq <= 0.01)} expected mode: overspend in {int((b > 1).sum())} of {len(b)} campaigns "
        f"({freq:.3f}; <= overspend_risk 0.01)"
    )
    out.append(f"{verdict(worst <= 0.01)} expected mode: worst overspend {100 * worst:.2f}% of budget (<= 1%)")
    biased = [r for run in runs for r in run.results if r.variant.startswith("expected-cal-bias")]
    if biased:
        bb = barate(biased)
        bfreq, bworst = float((bb > 1).mean()), float(max(0.0, (bb - 1).max()))
        out.append(
            f"{verdict(bfreq <= 0.01)} expected mode, the model's expected costs biased "
            f"{', '.join(f'x{x:g}' for x in sorted({float(r.variant.split('bias')[1]) for r in biased}))}: "
            f"overspend in {int((bb > 1).sum())} of {len(bb)} campaigns ({bfreq:.3f}; <= 0.01), "
            f"worst {100 * bworst:.2f}% (<= 1%), median BARate {np.median(bb):.3f}"
        )
    strict = [r for k in STARTS for r in rows(None, f"strict-{k}")]
    out.append(
        f"{verdict(all(r.spent[-1] <= r.budget for r in strict))} strict mode: "
        f"{sum(r.spent[-1] > r.budget for r in strict)} overspends in {len(strict)} campaigns (never)"
    )
    for run in runs:
        model = {r.seed: r.spent[-1] / r.budget for r in rows(run.name, "strict-cal")}
        oracle = {r.seed: r.spent[-1] / r.budget for r in rows(run.name, "oracle-strict-cal")}
        ratio = float(np.median([model[s] / oracle[s] for s in model if s in oracle]))
        out.append(
            f"{verdict(ratio >= 0.95)} strict mode, {run.name}: BARate / the oracle's through the same ledger and "
            f"pacing, median {ratio:.3f} (>= 0.95)"
        )
    for run in runs:
        for mode in ("expected", "strict"):
            for k in ("zero", "double"):
                rs = rows(run.name, f"{mode}-{k}")
                end, fst, fst_exp = barate(rs), first(rs), first_expected(rs)
                where = f"pacing from {START_NAMES[k]}, {run.name}, {mode}"
                out.append(
                    f"{verdict(bool(np.all(np.abs(end - 1) <= 0.03)))} {where}: "
                    f"end within 3% of plan in {(np.abs(end - 1) <= 0.03).mean():.2f} of campaigns "
                    f"(median {np.median(end):.3f})"
                )
                out.append(
                    f"{verdict(bool(np.all(np.abs(fst - 1) <= 0.10)))} {where}: "
                    f"spend after the first tenth within 10% of plan in {(np.abs(fst - 1) <= 0.10).mean():.2f} "
                    f"of campaigns (median {np.median(fst):.3f})"
                )
                out.append(
                    f"{verdict(bool(np.all(np.abs(fst_exp - 1) <= 0.10)))} {where}: "
                    f"expected spend (no purchase noise) after the first tenth within 10% of plan in "
                    f"{(np.abs(fst_exp - 1) <= 0.10).mean():.2f} of campaigns (median {np.median(fst_exp):.3f})"
                )
    for s in summaries:
        if s["variant"] in ("open-cal", "oracle-strict-cal"):
            continue
        out.append(
            f"{verdict(s['vs_model_median'] >= 0.97)} revenue at equal spend, {s['world']} {s['variant']}: "
            f"{s['vs_model_median']:.3f} of the model offline without a ledger (>= 0.97)"
        )
    for run in runs:
        same = len(set(run.lam_runs)) == 1
        out.append(f"{verdict(same)} saco calibrate twice, {run.name}: lambda {', '.join(map(repr, run.lam_runs))}")
        served = next(s for s in summaries if s["world"] == run.name and s["variant"] == "open-cal")
        ratio = run.predicted_spend_per_user / served["open_spend_per_user"]
        out.append(
            f"{verdict(abs(ratio - 1) <= 0.05)} saco calibrate, {run.name}: predicted spend / served spend at "
            f"its lambda with pacing off {ratio:.3f} (within 5%)"
        )
    return out


def plot(runs: list[WorldRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ("expected", "strict")
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 4.2 * len(runs)), squeeze=False)
    colours = {"cal": "tab:blue", "zero": "tab:orange", "double": "tab:green"}
    for row, run in zip(axes, runs, strict=True):
        for ax, mode in zip(row, modes, strict=True):
            keys = [(f"{mode}-{k}", f"model from {START_NAMES[k]}", colours[k]) for k in STARTS]
            if mode == "strict":
                keys.append(("oracle-strict-cal", "oracle from its calibrated", "tab:gray"))
            for key, name, colour in keys:
                rs = [r for r in run.results if r.variant == key]
                if not rs:
                    continue
                frac = np.array([r.spent for r in rs]) / np.array([r.budget for r in rs])[:, None]
                x = np.arange(0, frac.shape[1] + 1) / frac.shape[1]
                frac = np.concatenate([np.zeros((len(rs), 1)), frac], axis=1)
                ax.plot(x, np.median(frac, axis=0), color=colour, label=f"{name} (median, 5-95%)")
                ax.fill_between(
                    x, np.percentile(frac, 5, axis=0), np.percentile(frac, 95, axis=0), color=colour, alpha=0.2
                )
            ax.plot([0, 1], [0, 1], "k--", lw=1, label="plan")
            ax.set_title(f"{run.name} redemption world, {mode} mode ({len(rs)} campaigns per line)")
            ax.set_xlabel("fraction of the horizon (decisions / expected_decisions)")
            ax.set_ylabel("realised spend / budget")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few campaigns per variant, small logs, 1 epoch")
    ap.add_argument("--users", type=int, default=512, help="users per campaign")
    ap.add_argument("--rounds", type=int, default=10, help="rounds (the first tenth of the horizon is one round)")
    ap.add_argument("--expected-campaigns", type=int, default=40, help="campaigns per expected-mode variant")
    ap.add_argument("--strict-campaigns", type=int, default=12, help="campaigns per other variant")
    ap.add_argument("--log-users", type=int, default=4000, help="users in the training logs")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--calibrations", type=int, default=2, help="`saco calibrate` runs (the same lambda?)")
    ap.add_argument("--budget-fraction", type=float, default=0.5, help="budget / the random policy's spend")
    ap.add_argument("--concurrency", type=int, default=96, help="campaigns served at once")
    ap.add_argument(
        "--request-gap",
        type=float,
        default=0.5,
        help="seconds a campaign waits after each decision request (with SACO_PACING_INTERVAL_S, sets how many "
        "pacing steps the horizon has: 0 compresses a campaign into a few seconds)",
    )
    ap.add_argument(
        "--cost-biases",
        type=float,
        nargs="*",
        default=[0.8, 1.2],
        help="expected-mode variants served by the model with its expected costs multiplied by each",
    )
    ap.add_argument("--pacing-interval", type=float, default=0.2, help="SACO_PACING_INTERVAL_S of the service")
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", type=Path, default=Path("budget_control.png"))
    ap.add_argument("--json", type=Path, help="also write every campaign's figures here")
    args = ap.parse_args()
    if args.quick:
        args.expected_campaigns, args.strict_campaigns = 4, 3
        args.log_users, args.epochs, args.users, args.request_gap = 2000, 1, 256, 0.2
    torch.set_num_threads(1)
    started = time.perf_counter()
    runs: list[WorldRun] = []
    with tempfile.TemporaryDirectory(prefix="saco-budget-") as tmp, start_redis() as redis_server:
        for name in args.worlds:
            runs.append(run_world(name, args, Path(tmp), redis_server.url))
    summaries = [summarise(run, v, args.users) for run in runs for v, _ in variants_for(args)]
    elapsed = time.perf_counter() - started
    print(
        f"budget control: {len(runs)} worlds, {sum(len(r.results) for r in runs)} campaigns of {args.users} users "
        f"x {args.rounds} rounds, {REQUEST_USERS}-user requests, budget {args.budget_fraction:g} x the random "
        f"policy's spend, SACO_PACING_INTERVAL_S={args.pacing_interval:g}, {args.request_gap:g} s between a "
        f"campaign's requests, {args.concurrency} campaigns at once; {elapsed / 60:.1f} min"
    )
    for run in runs:
        print(
            f"{run.name}: lambda {run.lam_runs[0]:.4g} (oracle {run.oracle_lam:.4g}); "
            + ", ".join(f"{k} {v:.0f}{'' if k.startswith(('503', 'context')) else 's'}" for k, v in run.seconds.items())
        )
    print(table(summaries))
    print("\n".join(targets(runs, summaries, args.users)))
    plot(runs, args.png)
    print(f"spend against plan: {args.png}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "summaries": summaries,
                    "campaigns": [asdict(r) for run in runs for r in run.results],
                    "worlds": [
                        {"name": r.name, "lambda_runs": r.lam_runs, "oracle_lambda": r.oracle_lam, "seconds": r.seconds}
                        for r in runs
                    ],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
