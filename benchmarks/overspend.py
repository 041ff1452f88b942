"""Overspend frequency of `expected` reservations when the model prices many coupons near zero.

An `expected` campaign reserves what the model expects a coupon to cost for that user, corrected by the
campaign's realised / predicted ratio, and keeps a Bernstein margin over its outstanding coupons so that
realised spend exceeds the budget with probability at most `overspend_risk`. The bound assumes the
reservations are the coupons' expected costs. This benchmark breaks that assumption where it is easiest to
break: features wider than the model was trained on (the world's features times `--feature-scale`) push its
linear cost heads below zero for many users (the expected cost now, clipped to 0 cents, and the score's cost
term); the campaign's `min_redemption` floor is what stands between such a coupon and a reservation of
nothing.

Setup: the project's sequential world (research/world.py, default WorldConfig), random logs (the code of
`saco simulate`), `saco train`, `saco calibrate` (its cost ratios correct the expected costs the service
reserves with), the model served by `saco serve` on a throwaway Redis. Then, per
`--min-redemption` setting, `--campaigns` campaigns, one per seed (the same seeds for every setting), all
settings interleaved and `--concurrency` at a time: each a fresh population of `--users` users x `--rounds`
rounds whose features are multiplied by `--feature-scale`; every round the users arrive in random order
in 128-user requests, and the round's outcomes are posted after it. Every campaign is in `expected` mode
with `overspend_risk` 0.05 and plans `expected_decisions` = users x rounds (pacing on, `resolve`).

The truth. Each granted coupon is redeemed (cost = its face) with probability max(e / face, `--redeem`),
e the expected cost the service reserved from (the `predicted` field of the coupon's decision record:
calibration ratios and the floor included; the floor changes nothing here while it is at most `--redeem`,
and a setting above it is refused). The model is honest wherever it predicts at least `--redeem` of the
face, and the coupons it prices near zero are still redeemed `--redeem` (10%) of the time. That isolates
the failure the benchmark is about: a constant redemption probability for every coupon (`--truth
constant`) would also make the model wrong about every other coupon, which the campaign's running realised
/ predicted ratio then partly corrects for zero and non-zero predictions alike, so it would test the ratio
more than the near-zero reservations. The world still moves its users (features, habit, fatigue) with the
actions taken, and the outcomes carry its rewards.

Budgets bind: first `--pilot` campaigns run with pacing off, lambda 0, `min_redemption` 0 and an open
budget (every preferred coupon granted); each campaign's budget is `--budget-fraction` of the pilot's mean
expected spend per user under the truth (sum of q x face) times its users.

Printed: the share of the pilot's coupons the model prices near zero (expected cost <= 1% of the face);
per setting, the share of granted coupons priced near zero (at most max(1% of the face, the floor)) and of
those whose reservation is <= 1% of the face (both from the decision records, read from Redis right after
each request), how often those redeem, reservations / the truth's expected cost, the overspend frequency
(spent > budget at the end; also campaigns with `overrun`) with its Clopper-Pearson 95% interval, the worst
overspend, BARate (spent / budget), and a PASS / FAIL line: overspend frequency <= `overspend_risk`. The PNG
shows the BARate distributions and the model's expected cost / face of the pilot's coupons.

    .venv/bin/python benchmarks/overspend.py --quick               # 40 campaigns of 128 users, ~1.5 min
    .venv/bin/python benchmarks/overspend.py --min-redemption 0 default 0.1 \
        --png docs/overspend.png                                    # 3 x 200 campaigns, ~18 min (docs/service.md)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import torch
from budget_control import (
    REQUEST_USERS,
    CampaignResult,
    Runner,
    Variant,
    cli,
    run_campaigns,
    say,
    service,
)

# budget_control (in benchmarks/, this script's directory) has put the repository on sys.path
from offline.logs import load_logs, write_logs
from research.simulate import simulate_logs
from research.world import SyntheticWorld, WorldConfig
from service.state.servers import start_redis
from service.state.store import DECISION_ID, StateStore, parse_decision_record

OVERSPEND_RISK = 0.05
NEAR_ZERO = 0.01  # a coupon is priced near zero when its expected cost (or reservation) is <= 1% of its face
OPEN_BUDGET = 1_000_000.0  # the pilot's budget (currency units): never binds
PILOT = Variant("pilot", "expected", "zero", pacing=False)  # open budget, lambda 0, no pacing


def floor_setting(text: str) -> float | None:
    """A `--min-redemption` value: a probability, or `default` (the campaign leaves the service's)."""
    if text == "default":
        return None
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1] or 'default', got {text}")
    return value


def floor_name(value: float | None) -> str:
    return "default" if value is None else f"{value:g}"


def floor_cents(face: int, min_redemption: float) -> int:
    """The least expected cost the service assumes for a coupon (service/scoring.py, ScoreTerms.floored)."""
    return min(face, max(1, math.ceil(face * min_redemption)))


@dataclass
class Result(CampaignResult):
    min_redemption: float = 0.0  # the campaign's, as its view reports it
    coupons_near_zero: int = 0  # granted coupons the model prices at most max(NEAR_ZERO of the face, the floor)
    reserved_near_zero: int = 0  # granted coupons whose reservation is <= NEAR_ZERO of the face
    redeemed_near_zero: int = 0  # of the coupons priced near zero, those redeemed
    reserved_cents: int = 0  # sum of the granted coupons' reservations
    truth_cents: float = 0.0  # sum of the granted coupons' expected cost under the truth (q x face)
    overspent: bool = False
    predicted_share: list[float] = field(default_factory=list)  # e / face of every granted coupon (floored)


class OverspendRunner(Runner):
    """budget_control's runner (HTTP calls with retries, concurrency, progress) with this benchmark's
    campaigns: widened features, decision records read back, outcomes drawn from the truth."""

    def __init__(self, world: SyntheticWorld, args: argparse.Namespace, store: StateStore) -> None:
        super().__init__("wide", world, args.users, 0.0, 0.0, {}, args.concurrency, args.request_gap)
        self.args, self.store = args, store
        self.budget = 0.0  # currency units, set from the pilot
        self.floors: dict[str, float | None] = {PILOT.key: 0.0}  # variant key -> its min_redemption

    async def _records(self, cid: str, decision_ids: list[str]) -> dict[str, dict[str, str]]:
        """The decision records of these ids, read from Redis (one hash per request's batch)."""
        batches = sorted({m.group(1) for d in decision_ids if (m := DECISION_ID.fullmatch(d))})
        client = await self.store.client()
        out: dict[str, dict[str, str]] = {}
        for batch in batches:
            fields = await client.hgetall(self.store.keys.batch_key(cid, batch))
            for index, raw in fields.items():
                out[f"d-{batch}-{int(index)}"] = parse_decision_record(raw if isinstance(raw, bytes) else raw.encode())
        return out

    async def _campaign(self, client: httpx.AsyncClient, variant: Variant, seed: int) -> CampaignResult:
        started = time.perf_counter()
        args, world, users, rounds = self.args, self.world, self.users, self.world.rounds
        cid = f"{variant.key}-s{seed}"
        budget = OPEN_BUDGET if variant is PILOT else round(self.budget, 2)
        body: dict[str, Any] = {
            "budget": budget,
            "coupons": [{"action": a, "cost": float(v)} for a, v in enumerate(world.values) if a > 0],
            "lambda": 0.0,
            "reservation_mode": "expected",
            "overspend_risk": OVERSPEND_RISK,
            "expected_decisions": users * rounds,
            "pacing": variant.pacing,
        }
        if self.floors[variant.key] is not None:
            body["min_redemption"] = self.floors[variant.key]
        view = await self._call(client, "PUT", f"/v1/admin/campaigns/{cid}", orjson.dumps(body))
        result = Result("wide", variant.key, seed, budget, min_redemption=view["min_redemption"])
        if args.truth == "floor" and result.min_redemption > args.redeem:
            # the records' expected costs are floored: the truth would rise with the floor
            raise SystemExit(f"min_redemption {result.min_redemption} is above --redeem {args.redeem}")
        episode = world.start(users, seed)
        ids = np.array([f"u{i}" for i in range(users)])
        for t in range(rounds):
            features = world.features(episode) * np.float32(args.feature_scale)
            arrival = np.random.default_rng([seed, t, 7]).permutation(users)
            actions = np.zeros(users, np.int64)
            decision_ids: list[str] = [""] * users
            for i in range(0, users, REQUEST_USERS):
                rows = arrival[i : i + REQUEST_USERS]
                payload = {
                    "requests": [
                        {"user_id": ids[r], "request_id": f"{cid}-{t}-{r}", "features": features[r]} for r in rows
                    ]
                }
                out = await self._post(
                    client, f"/v1/campaigns/{cid}/decisions", orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
                )
                result.request_lams.append(float(out["decisions"][0]["lambda"]))
                for r, decision in zip(rows, out["decisions"], strict=True):
                    actions[r] = decision["action"]
                    decision_ids[r] = decision["decision_id"]
                self.decisions += len(rows)
                if self.gap:
                    await asyncio.sleep(self.gap)
            records = await self._records(cid, decision_ids)
            response = world.step(episode, actions)
            draws = np.random.default_rng([seed, t, 11]).random(users)
            costs = np.zeros(users)
            for r in np.flatnonzero(actions > 0):
                rec = records[decision_ids[r]]
                face, reserved, predicted = int(rec["coupon_cost"]), int(rec["reserved"]), int(rec["predicted"])
                share = predicted / face
                q = args.redeem if args.truth == "constant" else max(share, args.redeem)
                redeemed = bool(draws[r] < q)
                costs[r] = face / 100 if redeemed else 0.0
                result.coupons += 1
                result.redeemed += redeemed
                result.reserved_cents += reserved
                result.truth_cents += q * face
                result.predicted_share.append(share)
                if predicted <= max(NEAR_ZERO * face, floor_cents(face, result.min_redemption)):
                    result.coupons_near_zero += 1
                    result.redeemed_near_zero += redeemed
                result.reserved_near_zero += reserved <= NEAR_ZERO * face
            outcomes = [
                {"decision_id": decision_ids[r], "reward": round(float(response.reward[r]), 2), "cost": float(costs[r])}
                for r in range(users)
            ]
            await self._post(client, f"/v1/campaigns/{cid}/outcomes", orjson.dumps({"outcomes": outcomes}))
            view = await self._call(client, "GET", f"/v1/admin/campaigns/{cid}")
            result.spent.append(view["spent"])
            result.lams.append(view["lambda"])
            result.realised_cost += float(costs.sum())
            result.expected_revenue += float(response.expected_reward.sum())
        result.reserved_end, result.overrun = view["reserved"], view["overrun"]
        result.overspent = result.spent[-1] > budget
        if variant.pacing:  # finished: no more pacing work for the service
            await self._call(client, "PATCH", f"/v1/admin/campaigns/{cid}", b'{"pacing": false}')
        result.seconds = time.perf_counter() - started
        self.done += 1
        return result


async def serve(runner: OverspendRunner, base: str) -> tuple[list[Result], list[Result]]:
    """The pilot (open budgets, floor of a cent), which sizes the budgets, then the measured campaigns: the
    same populations under each floor setting, interleaved."""
    args = runner.args
    seeds = [args.seed * 100_000 + 20_000 + s for s in range(args.pilot + args.campaigns)]
    variants = [Variant(f"floor-{floor_name(m)}", "expected", "cal") for m in args.min_redemption]
    runner.floors.update({v.key: m for v, m in zip(variants, args.min_redemption, strict=True)})
    try:
        pilot = await run_campaigns(runner, {"model": base}, [(PILOT, s) for s in seeds[: args.pilot]])
        per_user = float(np.mean([r.truth_cents for r in pilot if isinstance(r, Result)])) / 100 / args.users
        runner.budget = args.budget_fraction * per_user * args.users
        say(f"pilot: expected spend {per_user:.3f} per user; budget {runner.budget:.2f} per campaign")
        runner.done = runner.decisions = 0
        jobs = [(v, s) for s in seeds[args.pilot :] for v in variants]
        results = await run_campaigns(runner, {"model": base}, jobs)
    finally:
        await runner.store.close()
    return [r for r in pilot if isinstance(r, Result)], [r for r in results if isinstance(r, Result)]


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    from scipy.stats import beta

    a = (1 - level) / 2
    low = float(beta.ppf(a, k, n - k + 1)) if k > 0 else 0.0
    high = float(beta.ppf(1 - a, k + 1, n - k)) if k < n else 1.0
    return low, high


def share(part: int, whole: int) -> str:
    return f"{part:,} of {whole:,} ({part / max(1, whole):.1%})"


def summarise(results: list[Result]) -> dict[str, Any]:
    barate = np.array([r.spent[-1] / r.budget for r in results])
    overspent = int(sum(r.overspent for r in results))
    low, high = clopper_pearson(overspent, len(results))
    return {
        "min_redemption": results[0].min_redemption,
        "campaigns": len(results),
        "coupons": sum(r.coupons for r in results),
        "redeemed": sum(r.redeemed for r in results),
        "priced_near_zero": sum(r.coupons_near_zero for r in results),
        "reserved_near_zero": sum(r.reserved_near_zero for r in results),
        "redeemed_near_zero": sum(r.redeemed_near_zero for r in results),
        "reserved_over_truth": sum(r.reserved_cents for r in results) / max(1.0, sum(r.truth_cents for r in results)),
        "overspent": overspent,
        "overspend_freq": overspent / len(results),
        "overspend_ci": [low, high],
        "overrun_campaigns": int(sum(r.overrun > 0 for r in results)),
        "overspend_worst": float(max(0.0, (barate - 1).max())),
        "barate_median": float(np.median(barate)),
        "barate_p5": float(np.percentile(barate, 5)),
        "barate_p95": float(np.percentile(barate, 95)),
    }


def table(summaries: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| min_redemption | campaigns | coupons priced near zero | reservations <= 1% of face | of those priced "
        "near zero, redeemed | reserved / true expected cost | overspend frequency [95%] | worst overspend | "
        "overrun | BARate median [p5, p95] |",
        "|" + "---|" * 10,
    ]
    for name, s in summaries.items():
        low, high = s["overspend_ci"]
        coupons = max(1, s["coupons"])
        label = f"{s['min_redemption']:g}" + (" (default)" if name == "default" else "")
        lines.append(
            f"| {label} | {s['campaigns']} | {s['priced_near_zero'] / coupons:.1%} | "
            f"{s['reserved_near_zero'] / coupons:.1%} | "
            f"{s['redeemed_near_zero'] / max(1, s['priced_near_zero']):.1%} | "
            f"{s['reserved_over_truth']:.3f} | {s['overspend_freq']:.3f} ({s['overspent']}) [{low:.3f}, {high:.3f}] | "
            f"{100 * s['overspend_worst']:.2f}% | {s['overrun_campaigns']} | {s['barate_median']:.3f} "
            f"[{s['barate_p5']:.3f}, {s['barate_p95']:.3f}] |"
        )
    return "\n".join(lines)


def plot(groups: dict[str, list[Result]], pilot: list[Result], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    everything = np.concatenate([[r.spent[-1] / r.budget for r in rs] for rs in groups.values()])
    bins = np.linspace(everything.min(), everything.max(), 50)
    for name, rs in groups.items():
        barate = np.array([r.spent[-1] / r.budget for r in rs])
        left.hist(
            barate,
            bins=bins,
            histtype="step",
            lw=1.8,
            label=f"min_redemption {rs[0].min_redemption:g}{' (default)' if name == 'default' else ''}: "
            f"{(barate > 1).mean():.1%} overspend",
        )
    left.axvline(1.0, color="k", ls="--", lw=1, label="budget")
    left.set_title(
        f"BARate, expected mode at overspend_risk {OVERSPEND_RISK:g} ({len(next(iter(groups.values())))} "
        "campaigns per setting)",
        fontsize=10,
    )
    left.set_xlabel("realised spend / budget")
    left.set_ylabel("campaigns")
    left.legend(fontsize=8, loc="upper left")
    shares = np.concatenate([r.predicted_share for r in pilot])
    near = float((shares <= NEAR_ZERO).mean())
    right.hist(shares, bins=np.linspace(0, 1, 51), color="tab:orange", alpha=0.8)
    right.axvline(args.redeem, color="k", ls="--", lw=1, label=f"true redemption floor {args.redeem:g}")
    right.set_title(
        f"model's expected cost / face, open budget, features x{args.feature_scale:g}: {near:.0%} <= {NEAR_ZERO:.0%}",
        fontsize=10,
    )
    right.set_xlabel("expected cost / face of the coupons granted")
    right.set_ylabel("coupons")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 campaigns of 128 users per setting, small logs, 1 epoch")
    ap.add_argument("--campaigns", type=int, default=200, help="campaigns per floor setting")
    ap.add_argument(
        "--min-redemption",
        type=floor_setting,
        nargs="+",
        default=[None],
        help="the campaigns' floor settings (each a probability, or `default`: the service's), one set of "
        "campaigns each; default: `default`",
    )
    ap.add_argument("--feature-scale", type=float, default=16.0, help="the served features are the world's x this")
    ap.add_argument("--redeem", type=float, default=0.10, help="the lowest true redemption probability of a coupon")
    ap.add_argument(
        "--truth",
        choices=("floor", "constant"),
        default="floor",
        help="floor: a coupon is redeemed with probability max(expected cost / face, --redeem); constant: --redeem",
    )
    ap.add_argument("--users", type=int, default=256, help="users per campaign")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--pilot", type=int, default=8, help="open-budget campaigns that size the budgets")
    ap.add_argument("--budget-fraction", type=float, default=0.5, help="budget / the pilot's expected spend")
    ap.add_argument("--log-users", type=int, default=4000, help="users in the training logs")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=100, help="campaigns served at once")
    ap.add_argument("--request-gap", type=float, default=0.5, help="seconds a campaign waits after each request")
    ap.add_argument("--pacing-interval", type=float, default=0.2, help="SACO_PACING_INTERVAL_S of the service")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", type=Path, default=Path("overspend.png"))
    ap.add_argument("--json", type=Path, help="also write every campaign's figures here")
    args = ap.parse_args()
    if args.quick:
        args.campaigns, args.users, args.pilot, args.log_users, args.epochs = 40, 128, 4, 2000, 1
        args.request_gap = 0.2
    if not 0 <= args.redeem <= 1:
        ap.error(f"--redeem must be a probability in [0, 1], got {args.redeem}")
    if len({floor_name(m) for m in args.min_redemption}) < len(args.min_redemption):
        ap.error("--min-redemption names a setting twice")
    if args.campaigns < 1 or args.pilot < 1:
        ap.error("--campaigns and --pilot must be at least 1")
    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg = WorldConfig(users=args.log_users, rounds=args.rounds, seed=args.seed)
    world = SyntheticWorld(cfg)
    with tempfile.TemporaryDirectory(prefix="saco-overspend-") as tmp, start_redis() as redis_server:
        work = Path(tmp)
        logs, model_store = work / "logs.parquet", work / "store"
        write_logs(simulate_logs(cfg), logs)
        say(f"{cfg.users:,} users x {cfg.rounds} rounds of random logs; saco train --epochs {args.epochs}")
        trained = cli("train", "--logs", str(logs), "--store", str(model_store), "--epochs", str(args.epochs))
        budget_cal = args.budget_fraction * float(load_logs(logs).cost.sum())
        calibrated = cli("calibrate", "--store", str(model_store), "--logs", str(logs), "--budget", f"{budget_cal:.2f}")
        say(f"model {trained['version']}, calibrated lambda {calibrated['lambda']:.4g}; serving")
        prefix = f"overspend-{os.getpid()}:"
        with service(model_store, redis_server.url, prefix, args.pacing_interval, work / "service.log") as base:
            runner = OverspendRunner(world, args, StateStore(redis_server.url, prefix=prefix, socket_timeout_s=5))
            pilot, results = asyncio.run(serve(runner, base))
    elapsed = time.perf_counter() - started
    groups = {floor_name(m): [r for r in results if r.variant == f"floor-{floor_name(m)}"] for m in args.min_redemption}
    summaries = {name: summarise(rs) for name, rs in groups.items()}
    q_text = f"{args.redeem:g}" if args.truth == "constant" else f"max(expected cost / face, {args.redeem:g})"
    print(
        f"overspend: {args.campaigns} campaigns per setting of {args.users} users x {args.rounds} rounds, features "
        f"x{args.feature_scale:g}, expected mode at overspend_risk {OVERSPEND_RISK:g}, pacing (expected_decisions), "
        f"budget {runner.budget:.2f} = {args.budget_fraction:g} x the open-budget spend; redemption probability "
        f"{q_text}; {runner.retries} requests retried; {elapsed / 60:.1f} min"
    )
    open_coupons = sum(r.coupons for r in pilot)
    print(
        f"open budget (lambda 0, min_redemption 0): coupons the model prices near zero (expected cost <= "
        f"{NEAR_ZERO:.0%} of face) {share(sum(r.coupons_near_zero for r in pilot), open_coupons)}"
    )
    print(
        f"priced near zero: expected cost <= max({NEAR_ZERO:.0%} of face, the floor) in the decision record; "
        "reservations and the truth's expected cost from the records too"
    )
    print(table(summaries))
    for name, s in summaries.items():
        verdict = "PASS" if s["overspend_freq"] <= OVERSPEND_RISK else "FAIL"
        low, high = s["overspend_ci"]
        print(
            f"{verdict} min_redemption {s['min_redemption']:g}{' (default)' if name == 'default' else ''}: overspend "
            f"in {s['overspent']} of {s['campaigns']} campaigns, {s['overspend_freq']:.3f} [95% {low:.3f}, "
            f"{high:.3f}] (<= overspend_risk {OVERSPEND_RISK:g}); worst {100 * s['overspend_worst']:.2f}% of budget; "
            f"campaigns with overrun {s['overrun_campaigns']}; BARate median {s['barate_median']:.3f}"
        )
    plot(groups, pilot, args, args.png)
    print(f"BARate distribution: {args.png}")
    if args.json:
        campaigns = [{k: v for k, v in asdict(r).items() if k != "predicted_share"} for r in results]
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "summaries": summaries, "campaigns": campaigns},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
