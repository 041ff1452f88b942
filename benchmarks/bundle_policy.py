"""What a trained policy earns with bundles, and with a coupon it never saw, at equal spend.

The bundle world (research/world.py, carry-over effects on) with benchmarks/bundle_world.py's catalog: per
bundle synergy and seed, logs of `--users` users x `--rounds` rounds under a uniform behaviour policy, then
SACO (the product's training defaults) trained on them and scored on a fresh population (`--eval-users`,
its own seed) at the lambda whose exact expected spend is within [0.995, 1] x each spend target:

    bundles            the catalog with bundles (max_per_bundle 2), the model scoring actions by features
    bundles by index   the same logs, the model naming each bundle as a class (the paper's way: an ablation)
    additive           the same logs as a model by index is served with bundles: trained on single coupons (a
                       logged bundle is its dearest coupon, as the learning loop records it), each bundle scored
                       by the additive rule (contract/ranking.py `bundle_scores`), its history the dearest coupons
    singles            the catalog without bundles, each coupon alone (by features)
    oracle bundles     the perfect-information myopic oracle over bundles: the ceiling
    oracle singles     the same oracle over single coupons

and a coupon added after training (`--added`; the default, fixed before any result, is coupon 4, the
largest: 20% capped at 10 needing a basket of 35, so every one of its features lies beyond those the model
was trained on; `--added 3`, 10% capped at 5, lies within them):

    added, by features the model trained without the coupon (its logs never hold it), scoring the full
                       catalog (bundles with it included) from the coupons' features, without retraining
    added, retrained   the full catalog's model (the "bundles" row)
    left out           the model trained without the coupon, offering the catalog without it

Spend targets are fractions of what the singles oracle spends at lambda 0 (all it wants), per seed. Printed:
revenue per policy and target (mean ± std over seeds) and each policy's incremental revenue over no coupon
relative to the oracle's over bundles (the share of the ceiling it reaches), mean (min..max over seeds).

    .venv/bin/python benchmarks/bundle_policy.py                          # 3 seeds x 3 synergies, ~8 min on 2 cores
    .venv/bin/python benchmarks/bundle_policy.py --png docs/bundle_policy.png --json docs/bundle_policy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bundle_world import COUPONS, MAX_PER_BUNDLE, NoCoupon  # noqa: E402

from contract.catalog import Catalog  # noqa: E402
from contract.ranking import bundle_scores  # noqa: E402
from offline.calibrate import search_monotone  # noqa: E402
from offline.logs import validate_table  # noqa: E402
from offline.rollout import Policy, SequencePolicy, rollout  # noqa: E402
from offline.train import TrainConfig, train  # noqa: E402
from research.baselines import MyopicOracle  # noqa: E402
from research.evaluate import CachedSimulator, saco_policy  # noqa: E402
from research.simulate import simulate_logs  # noqa: E402
from research.world import SyntheticWorld, WorldConfig  # noqa: E402

ADDED = 4  # the coupon added after training (default)
SYNERGIES = (-0.5, 0.0, 0.5)
TARGETS = (0.25, 0.5)
POLICIES = (
    "bundles",
    "bundles by index",
    "additive",
    "singles",
    "added, by features",
    "left out",
    "oracle bundles",
    "oracle singles",
)
CEILING = "oracle bundles"


class Additive(Policy):
    """A model of single coupons serving a catalog's bundles as the service serves a model by index: each bundle
    scored by the additive rule, the user's history holding each bundle as its dearest coupon. The world's action
    j is the catalog's bundle j - 1 (its coupons alone first, in action order: action a is coupon a alone)."""

    def __init__(self, inner: SequencePolicy, catalog: Catalog, name: str) -> None:
        self.inner, self.name = inner, name
        self.bundles = [b.coupons for b in catalog.bundles]
        self.dearest = dearest_coupon(catalog)

    def begin(self, n_users: int) -> None:
        self.inner.begin(n_users)

    def act(self, features, t, lam, expected=None):
        scores = bundle_scores(self.inner.scores(features, t, lam), self.bundles)
        return np.asarray(scores.argmax(axis=1), dtype=np.int64)

    def observe(self, actions, reward, cost):
        self.inner.observe(self.dearest[actions], reward, cost)


def dearest_coupon(catalog: Catalog) -> np.ndarray:
    """[1 + bundles]: each world action's dearest coupon (contract/catalog.py `dominant`, the rule by which the
    learning loop and a model by index read a bundle), 0 for no coupon."""
    return np.array([0] + [catalog.dominant(b) for b in catalog.bundles], np.int64)


@dataclass
class Row:
    synergy: float
    seed: int
    target: float
    budget: float
    revenue: dict[str, float]  # per policy, and "none" (no coupon)
    spend: dict[str, float]


def catalogs(added: int) -> dict[str, Catalog]:
    without = [c for c in COUPONS if c["action"] != added]
    return {
        "bundles": Catalog.parse(COUPONS, max_per_bundle=MAX_PER_BUNDLE),
        "singles": Catalog.parse(COUPONS),
        "without": Catalog.parse(without, max_per_bundle=MAX_PER_BUNDLE),
    }


def run_seed(
    synergy: float, seed: int, args: argparse.Namespace, log: Any
) -> tuple[list[Row], dict[str, dict[str, float]]]:
    cats = catalogs(args.added)
    worlds = {
        name: WorldConfig(users=args.users, rounds=args.rounds, seed=seed, catalog=cat, bundle_synergy=synergy)
        for name, cat in cats.items()
    }
    cfg = TrainConfig(seed=seed)
    models: dict[str, Any] = {}
    trained: dict[str, dict[str, float]] = {}
    kinds = (("bundles", True), ("bundles by index", False), ("additive", False), ("singles", True), ("without", True))
    for name, by_features in kinds:
        world_name = "bundles" if name == "additive" else name.split()[0]
        logs = validate_table(simulate_logs(worlds[world_name]))
        table = cats[world_name].action_descriptors() if by_features else None
        if name == "additive":  # a logged bundle as its dearest coupon
            logs = replace(logs, action=dearest_coupon(cats["bundles"])[logs.action])
        started = time.time()
        result = train(logs, cfg, progress=False, action_table=table)
        trained[name] = {"seconds": time.time() - started, "val_loss": result.metrics["val_loss"]}
        models[name] = (result, logs.feature_dim)
        log(f"synergy {synergy:+.1f} seed {seed}: trained '{name}' in {trained[name]['seconds']:.0f}s")

    def model(name: str, table_of: str | None = None) -> SequencePolicy:
        result, feature_dim = models[name]
        table = None if table_of is None else cats[table_of].action_descriptors()
        return saco_policy(result, feature_dim, name, action_table=table)

    # every policy on its world, the same evaluation population
    plan: dict[str, tuple[str, Policy]] = {
        "bundles": ("bundles", model("bundles")),
        "bundles by index": ("bundles", model("bundles by index")),
        "additive": ("bundles", Additive(model("additive"), cats["bundles"], "additive")),
        "singles": ("singles", model("singles")),
        "added, by features": ("bundles", model("without", table_of="bundles")),
        "left out": ("without", model("without")),
        "oracle bundles": ("bundles", MyopicOracle()),
        "oracle singles": ("singles", MyopicOracle()),
    }
    eval_seed = 10_000 + seed
    envs = {name: SyntheticWorld(cfg_) for name, cfg_ in worlds.items()}
    sims = {name: CachedSimulator(envs[w], p, args.eval_users, eval_seed) for name, (w, p) in plan.items()}
    none = rollout(envs["singles"], NoCoupon(), 0.0, n_users=args.eval_users, seed=eval_seed).revenue
    reference = sims["oracle singles"](0.0)[1]
    rows = []
    for target in args.targets:
        budget = target * reference
        found = {name: search_monotone(sim, budget, target_low=0.995) for name, sim in sims.items()}
        rows.append(
            Row(
                synergy,
                seed,
                target,
                budget,
                {**{n: r.revenue for n, r in found.items()}, "none": none},
                {n: r.cost for n, r in found.items()},
            )
        )
    return rows, trained


def share(rows: list[Row], policy: str) -> np.ndarray:
    """Each row's incremental revenue over no coupon, as a share of the ceiling's."""
    return np.array([(r.revenue[policy] - r.revenue["none"]) / (r.revenue[CEILING] - r.revenue["none"]) for r in rows])


def summary(rows: list[Row]) -> list[str]:
    out = [
        "| synergy | target | " + " | ".join(POLICIES) + " |",
        "|---|---|" + "---|" * len(POLICIES),
    ]
    for synergy in dict.fromkeys(r.synergy for r in rows):
        for target in dict.fromkeys(r.target for r in rows):
            group = [r for r in rows if r.synergy == synergy and r.target == target]
            cells = []
            for p in POLICIES:
                s = share(group, p)
                cells.append(f"{s.mean():.3f} ({s.min():.3f}..{s.max():.3f})")
            out.append(f"| {synergy:+.1f} | {target:.2f} | " + " | ".join(cells) + " |")
    return out


def ratios(rows: list[Row]) -> list[str]:
    """The comparisons the benchmark is for, as ratios of incremental revenue over no coupon."""

    def gain(r: Row, p: str) -> float:
        return r.revenue[p] - r.revenue["none"]

    pairs = (
        ("bundles", "singles"),
        ("bundles", "bundles by index"),
        ("bundles", "additive"),
        ("added, by features", "left out"),
        ("added, by features", "bundles"),
        ("oracle bundles", "oracle singles"),
    )
    out = ["| synergy | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |", "|---|" + "---|" * len(pairs)]
    for synergy in dict.fromkeys(r.synergy for r in rows):
        group = [r for r in rows if r.synergy == synergy]
        cells = []
        for a, b in pairs:
            x = np.array([gain(r, a) / gain(r, b) for r in group])
            cells.append(f"{x.mean():.3f} ({x.min():.3f}..{x.max():.3f})")
        out.append(f"| {synergy:+.1f} | " + " | ".join(cells) + " |")
    return out


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synergies = list(dict.fromkeys(r.synergy for r in rows))
    fig, axes = plt.subplots(1, len(synergies), figsize=(5.5 * len(synergies), 4.5), squeeze=False, sharey=True)
    for ax, synergy in zip(axes[0], synergies, strict=True):
        mine = [r for r in rows if r.synergy == synergy]
        targets = sorted(dict.fromkeys(r.target for r in mine))
        width = 0.8 / len(POLICIES)
        for i, p in enumerate(POLICIES):
            s = [share([r for r in mine if r.target == t], p) for t in targets]
            x = np.arange(len(targets)) + (i - len(POLICIES) / 2 + 0.5) * width
            ax.bar(x, [v.mean() for v in s], width, yerr=[v.std() for v in s], capsize=2, label=p)
        ax.set_xticks(np.arange(len(targets)), [f"{t:.2f}" for t in targets])
        ax.set_title(f"bundle synergy {synergy:+.1f}")
        ax.set_xlabel("spend target / singles oracle's spend at lambda 0")
        ax.set_ylim(0.4, 1.05)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("revenue gain over no coupon / oracle over bundles'")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(POLICIES), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=5000, help="logged users per world")
    ap.add_argument("--eval-users", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--synergies", type=float, nargs="+", default=list(SYNERGIES))
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="fractions of singles' spend")
    ap.add_argument("--added", type=int, default=ADDED, choices=[c["action"] for c in COUPONS])
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if any(not 0 < t <= 1 for t in args.targets):
        ap.error("--targets: fractions within (0, 1]")
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:5.0f}s] {msg}", file=sys.stderr, flush=True)

    rows: list[Row] = []
    trained: list[dict[str, Any]] = []
    for synergy in args.synergies:
        for seed in args.seeds:
            got, fits = run_seed(synergy, seed, args, log)
            rows += got
            trained.append({"synergy": synergy, "seed": seed, "models": fits})
    worst = max(r.spend[p] / r.budget for r in rows for p in POLICIES)
    least = min(r.spend[p] / r.budget for r in rows for p in POLICIES)
    print(
        f"{args.users} logged users x {args.rounds} rounds per world, {args.eval_users} evaluation users, seeds "
        f"{args.seeds}; coupon {args.added} added after training; spend / target {least:.4f}..{worst:.4f}\n"
    )
    print("Revenue over no coupon, as a share of the oracle's over bundles: mean (min..max) over seeds\n")
    print("\n".join(summary(rows)))
    print("\nRatios of revenue over no coupon (all targets): mean (min..max)\n")
    print("\n".join(ratios(rows)))
    if args.png is not None:
        plot(rows, args.png)
        print(f"\nwrote {args.png}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "rows": [r.__dict__ for r in rows],
                    "trained": trained,
                },
                indent=1,
            )
        )
        print(f"wrote {args.json}")
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
