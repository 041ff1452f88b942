"""Where bundles can matter: the perfect-information myopic oracle on the bundle world, at equal spend.

The bundle world (research/world.py, carry-over effects on) with the coupon catalog below, per bundle
synergy (-0.5 saturating, 0 additive in the logit, 0.5 super-additive) and per seed (the world's structure
and its users): the oracle (argmax of E[reward] - lambda E[cost] over the allowed actions, exact expected
responses) at the lambda whose expected spend is within [0.995, 1] x each spend target,

    bundles   every bundle of the catalog (max_per_bundle 2: one coupon per class) and every coupon alone
    singles   the same coupons, each alone (the catalog without bundles)
    none      no coupon at all

The spend targets are fractions of what the singles oracle spends at lambda 0 (all it wants), per seed;
the same target for both catalogs. Printed per synergy and target: revenue of each (mean and standard
deviation over the seeds), the incremental revenue over no coupon of bundles relative to singles' (mean,
and min..max over the seeds) and the share of the bundles oracle's coupon decisions that grant several
coupons. This bounds what a bundle-aware policy can gain, before any model is trained.

    .venv/bin/python benchmarks/bundle_world.py                          # 3 seeds x 3 synergies, ~2 min on 2 cores
    .venv/bin/python benchmarks/bundle_world.py --png docs/bundle_world.png
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from contract.catalog import Catalog  # noqa: E402
from offline.rollout import Policy, rollout  # noqa: E402
from research.baselines import MyopicOracle  # noqa: E402
from research.evaluate import oracle_at_spend  # noqa: E402
from research.world import SyntheticWorld, WorldConfig  # noqa: E402

# Two amount coupons, two percent coupons (the larger one needs a basket of 35) and a coupon of its own
# class that needs a basket of 25 (the median basket is 30); bundles: at most one coupon per class.
COUPONS: list[dict[str, Any]] = [
    {"action": 1, "value": 2.0},
    {"action": 2, "value": 5.0},
    {"action": 3, "kind": "percent", "value": 10.0, "cap": 5.0},
    {"action": 4, "kind": "percent", "value": 20.0, "cap": 10.0, "min_spend": 35.0},
    {"action": 5, "value": 3.0, "min_spend": 25.0, "class": "threshold"},
]
MAX_PER_BUNDLE = 2
SYNERGIES = (-0.5, 0.0, 0.5)
TARGETS = (0.1, 0.25, 0.5)
CATALOGS = ("bundles", "singles")


class NoCoupon(Policy):
    name = "no-coupon"

    def act(self, features, t, lam, expected=None):
        return np.zeros(features.shape[0], dtype=np.int64)


@dataclass
class Row:
    synergy: float
    target: float  # fraction of the singles oracle's spend at lambda 0
    seed: int
    budget: float
    revenue: dict[str, float]  # bundles, singles, none
    spend: dict[str, float]
    bundle_share: float  # of the bundles oracle's coupon decisions, those granting several coupons


def run_seed(synergy: float, seed: int, users: int, rounds: int, targets: tuple[float, ...]) -> list[Row]:
    bundles = Catalog.parse(COUPONS, max_per_bundle=MAX_PER_BUNDLE)
    singles = Catalog.parse(COUPONS)
    worlds = {
        name: SyntheticWorld(WorldConfig(users=users, rounds=rounds, seed=seed, catalog=cat, bundle_synergy=synergy))
        for name, cat in (("bundles", bundles), ("singles", singles))
    }
    none = rollout(worlds["singles"], NoCoupon(), 0.0, seed=seed).revenue
    reference = rollout(worlds["singles"], MyopicOracle(), 0.0, seed=seed).cost
    rows = []
    for target in targets:
        budget = target * reference
        found = {name: oracle_at_spend(world, budget, seed=seed) for name, world in worlds.items()}
        counts = rollout(worlds["bundles"], MyopicOracle(), found["bundles"].lam, seed=seed).action_counts
        several = sum(int(counts[j]) for j, b in enumerate(bundles.bundles, 1) if len(b.coupons) > 1)
        rows.append(
            Row(
                synergy,
                target,
                seed,
                budget,
                {**{n: r.revenue for n, r in found.items()}, "none": none},
                {n: r.cost for n, r in found.items()},
                several / max(int(counts[1:].sum()), 1),
            )
        )
    return rows


def summary(rows: list[Row]) -> list[str]:
    out = [
        "| synergy | spend target | spend | bundles revenue | singles revenue | no coupon | bundles' lift / singles' "
        "| bundle share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for synergy in dict.fromkeys(r.synergy for r in rows):
        for target in dict.fromkeys(r.target for r in rows):
            group = [r for r in rows if r.synergy == synergy and r.target == target]
            rev = {k: np.array([r.revenue[k] for r in group]) for k in ("bundles", "singles", "none")}
            ratio = (rev["bundles"] - rev["none"]) / (rev["singles"] - rev["none"])
            budget = np.mean([r.budget for r in group])
            cells = [f"{rev[k].mean():,.0f} ± {rev[k].std():,.0f}" for k in ("bundles", "singles", "none")]
            out.append(
                f"| {synergy:+.1f} | {target:.2f} | {budget:,.0f} | "
                + " | ".join(cells)
                + f" | {ratio.mean():.3f} ({ratio.min():.3f}..{ratio.max():.3f})"
                + f" | {np.mean([r.bundle_share for r in group]):.2f} |"
            )
    return out


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synergies = list(dict.fromkeys(r.synergy for r in rows))
    fig, axes = plt.subplots(1, len(synergies), figsize=(5 * len(synergies), 4), squeeze=False, sharey=True)
    for ax, synergy in zip(axes[0], synergies, strict=True):
        mine = [r for r in rows if r.synergy == synergy]
        targets = sorted(dict.fromkeys(r.target for r in mine))
        for name in CATALOGS:
            gains = np.array([[r.revenue[name] - r.revenue["none"] for r in mine if r.target == t] for t in targets])
            ax.errorbar(targets, gains.mean(axis=1), yerr=gains.std(axis=1), marker="o", capsize=3, label=name)
        ax.set_title(f"bundle synergy {synergy:+.1f}")
        ax.set_xlabel("spend target / singles' spend at lambda 0")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("oracle revenue - no-coupon revenue")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--synergies", type=float, nargs="+", default=list(SYNERGIES))
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="fractions of singles' spend")
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    if any(not 0 < t <= 1 for t in args.targets):
        ap.error("--targets: fractions within (0, 1]")
    catalog = Catalog.parse(COUPONS, max_per_bundle=MAX_PER_BUNDLE)
    print(
        f"catalog: {len(catalog.coupons)} coupons, {len(catalog.bundles)} bundles: "
        + " ".join(b.key for b in catalog.bundles)
    )
    started = time.time()
    rows: list[Row] = []
    for synergy in args.synergies:
        for seed in args.seeds:
            rows += run_seed(synergy, seed, args.users, args.rounds, tuple(args.targets))
            print(
                f"synergy {synergy:+.1f} seed {seed} done ({time.time() - started:.0f}s)", file=sys.stderr, flush=True
            )
    worst = max(r.spend[n] / r.budget for r in rows for n in CATALOGS)
    least = min(r.spend[n] / r.budget for r in rows for n in CATALOGS)
    print(
        f"{args.users} users x {args.rounds} rounds, seeds {args.seeds}; revenue mean ± std over seeds; "
        f"spend / target {least:.4f}..{worst:.4f}\n"
    )
    print("\n".join(summary(rows)))
    if args.png is not None:
        plot(rows, args.png)
        print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
