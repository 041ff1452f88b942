"""Running the report: fit every method on every dataset and seed, calibrate each to the 9 budgets, train and
score the ablations, then write results.json, the figures and results.md."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offline.calibrate import TARGET_LOW
from offline.logs import Logs
from offline.rollout import Policy
from offline.train import train
from research import hillstrom as hs
from research.baselines import (
    CMDP,
    DFCL,
    BudgetRegularizer,
    CausalForest,
    HiddenRepClustering,
    MyopicOracle,
    RandomAtSpend,
    ThompsonBandit,
    TwoStage,
)
from research.evaluate import BUDGET_LEVELS, LEVEL_NAMES, CachedSimulator, calibrate_levels, saco_policy
from research.report.ablations import ABLATIONS, ablation_policy
from research.report.config import ABLATION_SET, DATASETS, FOREST, ReportConfig, Row
from research.report.datasets import Dataset, build_dataset
from research.report.markdown import markdown
from research.report.plots import plot_ablations, plot_forest_difference
from research.report.policies import BudgetKnob, Timed
from research.report.tables import gain_vs_forest, mean_std, methods_of, select


def baseline_factories(num_actions: int, seed: int, known_world: bool) -> dict[str, Callable[[Logs], Policy]]:
    out: dict[str, Callable[[Logs], Policy]] = {
        "random": lambda logs: RandomAtSpend(num_actions, seed=seed),
        "two-stage": lambda logs: TwoStage.fit(logs),
        FOREST: lambda logs: CausalForest.fit(logs),
        "bandit": lambda logs: ThompsonBandit.fit(logs),
        "cmdp25": lambda logs: CMDP.fit(logs, 0.25),
        "cmdp50": lambda logs: CMDP.fit(logs, 0.5),
        "cmdp75": lambda logs: CMDP.fit(logs, 0.75),
        "dfcl": lambda logs: DFCL.fit(logs),
        "regularizer": lambda logs: BudgetRegularizer.fit(logs),
        "hrc": lambda logs: HiddenRepClustering.fit(logs),
    }
    if known_world:
        out["myopic-oracle"] = lambda logs: MyopicOracle()
    return out


def _ips(policy: Policy, ds: Dataset, lam: float) -> tuple[float, float]:
    assert ds.holdout is not None
    data, rows = ds.holdout
    policy.begin(len(rows))
    actions = policy.act(data.features[rows], 0, lam, None)
    return hs.ips_estimate(actions, data, rows)


def calibrated_rows(
    ds: Dataset,
    cfg: ReportConfig,
    seed: int,
    name: str,
    timed: Timed,
    sim: CachedSimulator,
    reference: float,
    train_s: float,
) -> list[Row]:
    """One row per budget level: `name` calibrated to each budget (never above it; NaN where it cannot be)."""
    out = []
    note = ""
    try:
        calibrated = calibrate_levels(name, sim, reference, cfg.max_passes, target_low=TARGET_LOW)
    except RuntimeError:
        # lambda alone cannot bring spend under some budget (e.g. a cost head that predicts <= 0): price at the
        # lambda of least spend seen, and withhold coupons from a random subset of users beyond it
        split = min(sim.cache, key=lambda lam: (sim.cache[lam][1], lam))
        knob = BudgetKnob(timed, split, seed=seed)
        sim = CachedSimulator(ds.env, knob, ds.eval_users, ds.eval_seed)
        note = f"lambda alone could not meet the budget: coupons withheld at random beyond lambda={split:g}"
        try:
            calibrated = calibrate_levels(name, sim, reference, cfg.max_passes, target_low=TARGET_LOW)
        except RuntimeError as exc:
            calibrated, note = [], str(exc).splitlines()[0]
    if not calibrated:  # spend cannot be brought under a budget: report, never exceed it
        nan = float("nan")
        return [
            Row(
                ds.name,
                seed,
                name,
                lvl,
                frac,
                frac * reference,
                nan,
                nan,
                nan,
                nan,
                False,
                train_s,
                timed.ms_per_1k,
                note=note,
            )
            for lvl, frac in zip(LEVEL_NAMES, BUDGET_LEVELS, strict=True)
        ]
    for pr in calibrated:
        r = pr.result
        row = Row(
            ds.name,
            seed,
            name,
            pr.level,
            pr.budget_fraction,
            pr.budget,
            r.revenue,
            r.cost,
            r.barate,
            r.lam,
            r.converged,
            train_s,
            timed.ms_per_1k,
            note=note,
        )
        if ds.holdout is not None:
            row.ips_revenue, row.ips_cost = _ips(sim.policy, ds, r.lam)
        out.append(row)
    return out


def run_dataset(ds: Dataset, cfg: ReportConfig, seed: int, log: Callable[[str], None]) -> tuple[list[Row], float]:
    """Fit SACO and every baseline on `ds`, calibrate each at the 9 budgets; returns the rows and the
    reference spend the budgets are fractions of."""
    factories: dict[str, Callable[[Logs], Policy]] = {
        "saco": lambda logs: saco_policy(train(logs, replace(cfg.train, seed=seed), progress=False), logs.feature_dim),
    }
    factories.update(baseline_factories(ds.env.num_actions, seed, ds.known_world))
    fitted: dict[str, tuple[Timed, float]] = {}
    for name, fit in factories.items():
        started = time.perf_counter()
        policy = fit(ds.logs)
        fitted[name] = (Timed(policy), time.perf_counter() - started)
        log(f"[{ds.name} seed {seed}] {name} fitted in {fitted[name][1]:.1f}s")
    sims = {name: CachedSimulator(ds.env, timed, ds.eval_users, ds.eval_seed) for name, (timed, _) in fitted.items()}
    reference = min(sim(0.0)[1] for sim in sims.values())
    if reference <= 0:
        reference = max(sim(0.0)[1] for sim in sims.values())
    rows: list[Row] = []
    for name, (timed, train_s) in fitted.items():
        rows += calibrated_rows(ds, cfg, seed, name, timed, sims[name], reference, train_s)
    log(f"[{ds.name} seed {seed}] calibrated {len(fitted)} methods at 9 budgets (reference spend {reference:,.1f})")
    return rows, reference


def run_ablations(ds: Dataset, cfg: ReportConfig, seed: int, reference: float, log: Callable[[str], None]) -> list[Row]:
    """Train every ablation variant on `ds` and calibrate it at the same budgets as the main methods."""
    rows: list[Row] = []
    for ab in ABLATIONS:
        policy, train_s = ablation_policy(ab, ds.logs, cfg.train, seed)
        timed = Timed(policy)
        sim = CachedSimulator(ds.env, timed, ds.eval_users, ds.eval_seed)
        rows += [
            replace(r, dataset=ABLATION_SET)
            for r in calibrated_rows(ds, cfg, seed, ab.name, timed, sim, reference, train_s)
        ]
        log(f"[ablation seed {seed}] {ab.name} trained in {train_s:.1f}s and calibrated")
    return rows


def run_report(cfg: ReportConfig, out_dir: Path, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole report: writes results.md, results.json and the PNGs to `out_dir`; returns a summary."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = hs.load_hillstrom(cfg.hillstrom_path)  # fails early, with one line, if the file is missing
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    references: dict[str, list[float]] = {}
    datasets: list[Dataset] = []
    for seed in cfg.seeds:
        for name in DATASETS:
            ds = build_dataset(name, cfg, seed, data)
            ds_rows, reference = run_dataset(ds, cfg, seed, log)
            rows += ds_rows
            references.setdefault(name, []).append(reference)
            if name == "seq-effects-on" and cfg.ablations and seed == cfg.seeds[0]:  # ablations: first seed
                rows += [replace(r, dataset=ABLATION_SET) for r in ds_rows if r.method in ("saco", FOREST)]
                rows += run_ablations(ds, cfg, seed, reference, log)
            if seed == cfg.seeds[-1]:
                datasets.append(ds)
            log(f"[{name} seed {seed}] done at {(time.time() - started) / 60:.1f} min")
    figures = {"forest": plot_forest_difference(rows, list(DATASETS), out_dir / "revenue_vs_forest.png").name}
    if cfg.ablations:
        figures["ablation"] = plot_ablations(rows, out_dir / "ablations.png").name
    seconds = time.time() - started
    (out_dir / "results.json").write_text(json.dumps([asdict(r) for r in rows], default=float, indent=0))
    (out_dir / "results.md").write_text(markdown(rows, cfg, datasets, references, figures, seconds, out_dir))
    finite = [r.barate for r in rows if np.isfinite(r.barate)]
    ablation_means = {
        m: mean_std([r.revenue for r in select(rows, dataset=ABLATION_SET, method=m)])[0]
        for m in methods_of(rows, ABLATION_SET)
    }
    gains = [g.mean() for d in DATASETS for g in gain_vs_forest(rows, d, "saco").values()]
    return {
        "out": str(out_dir / "results.md"),
        "figures": [str(out_dir / f) for f in figures.values()],
        "rows": len(rows),
        "barate_min": min(finite),
        "barate_max": max(finite),
        "saco_gain_vs_forest_pct": 100 * float(np.mean(gains)) if gains else None,
        "ablation_mean_revenue": ablation_means,
        "seconds": round(seconds, 1),
        "quick": cfg.quick,
    }
