"""Aggregation of report rows (mean ± std over seeds, gains against the forest) and the markdown tables."""

from __future__ import annotations

from typing import Any

import numpy as np

from research.evaluate import BUDGET_LEVELS, LEVEL_NAMES
from research.report.config import FOREST, Row


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std of the finite values (std 0 for one value; NaN, NaN for none)."""
    arr = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def plus_minus(values: list[float], fmt: str = "{:,.1f}") -> str:
    """`mean ± std` (just the mean for one value; `n/a` for none)."""
    mean, std = mean_std(values)
    if not np.isfinite(mean):
        return "n/a"
    return fmt.format(mean) + (" ± " + fmt.format(std) if len(values) > 1 else "")


def select(rows: list[Row], **kw: Any) -> list[Row]:
    """The rows whose fields equal every keyword given."""
    return [r for r in rows if all(getattr(r, k) == v for k, v in kw.items())]


def gain_vs_forest(rows: list[Row], dataset: str, method: str) -> dict[int, np.ndarray]:
    """Per seed: relative revenue difference to the forest at each of the 9 levels."""
    out = {}
    for seed in sorted({r.seed for r in rows if r.dataset == dataset}):
        m = select(rows, dataset=dataset, method=method, seed=seed)
        f = select(rows, dataset=dataset, method=FOREST, seed=seed)
        if len(m) == 9 and len(f) == 9:
            out[seed] = np.array([a.revenue / b.revenue - 1.0 for a, b in zip(m, f, strict=True)])
    return out


def methods_of(rows: list[Row], dataset: str) -> list[str]:
    return list(dict.fromkeys(r.method for r in rows if r.dataset == dataset))


def level_table(rows: list[Row], dataset: str) -> list[str]:
    out = [
        "| method | " + " | ".join(f"{n} ({f:.2f})" for n, f in zip(LEVEL_NAMES, BUDGET_LEVELS, strict=True)) + " |",
        "|---|" + "---|" * 9,
    ]
    for m in methods_of(rows, dataset):
        cells = []
        for lvl in LEVEL_NAMES:
            sel = select(rows, dataset=dataset, method=m, level=lvl)
            cells.append(f"{plus_minus([r.revenue for r in sel])} ({plus_minus([r.barate for r in sel], '{:.3f}')})")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def summary_table(rows: list[Row], dataset: str) -> list[str]:
    out = [
        "| method | mean revenue | mean ROI | mean BARate | max BARate | gain vs forest (mean of 9 levels) "
        "| >= forest at | train s | decide ms / 1k users |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods_of(rows, dataset):
        sel = select(rows, dataset=dataset, method=m)
        seeds = sorted({r.seed for r in sel})
        mean_rev = [mean_std([r.revenue for r in sel if r.seed == s])[0] for s in seeds]
        roi = [mean_std([r.roi for r in sel if r.seed == s])[0] for s in seeds]
        bar = [mean_std([r.barate for r in sel if r.seed == s])[0] for s in seeds]
        gains = gain_vs_forest(rows, dataset, m)
        gain = [100 * float(np.mean(g)) for g in gains.values()]
        wins = [int(np.sum(g >= -1e-12)) for g in gains.values()]
        max_bar = max((r.barate for r in sel if np.isfinite(r.barate)), default=float("nan"))
        train_s = [r.train_s for r in sel if r.level == LEVEL_NAMES[0]]
        decide = [r.decide_ms_per_1k for r in sel if r.level == LEVEL_NAMES[0]]
        win_txt = "/".join(str(w) for w in wins) + " of 9" if wins else "n/a"
        out.append(
            f"| {m} | {plus_minus(mean_rev)} | {plus_minus(roi, '{:.3f}')} | {plus_minus(bar, '{:.3f}')} | "
            f"{max_bar:.3f} | {plus_minus(gain, '{:+.2f}')}% | {win_txt} | {plus_minus(train_s)} | "
            f"{plus_minus(decide, '{:.2f}')} |"
        )
    return out


def ips_table(rows: list[Row], dataset: str = "hillstrom") -> list[str]:
    out = ["| method | " + " | ".join(LEVEL_NAMES) + " |", "|---|" + "---|" * 9]
    for m in methods_of(rows, dataset):
        cells = []
        for lvl in LEVEL_NAMES:
            sel = select(rows, dataset=dataset, method=m, level=lvl)
            cells.append(
                f"{plus_minus([r.ips_revenue for r in sel], '{:,.0f}')} "
                f"({plus_minus([r.ips_cost / r.budget for r in sel], '{:.2f}')})"
            )
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out
