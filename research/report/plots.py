"""The report's figures: revenue difference to the forest per budget level, and the ablations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from research.evaluate import LEVEL_NAMES
from research.report.ablations import ABLATIONS
from research.report.config import ABLATION_SET, FOREST, Row
from research.report.tables import gain_vs_forest, mean_std, methods_of, select


def plot_forest_difference(rows: list[Row], datasets: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.4), squeeze=False)
    x = np.arange(9)
    for ax, ds in zip(axes[0], datasets, strict=True):
        for m in methods_of(rows, ds):
            if m == FOREST:
                continue
            gains = gain_vs_forest(rows, ds, m)
            if not gains:
                continue
            g = 100 * np.stack(list(gains.values()))
            style = {"lw": 2.6, "color": "black", "zorder": 5} if m == "saco" else {"lw": 1.0, "alpha": 0.8}
            ax.errorbar(
                x,
                g.mean(0),
                yerr=g.std(0, ddof=1) if len(g) > 1 else None,
                marker="o",
                ms=3,
                capsize=2,
                label=m,
                **style,
            )
        ax.axhline(0, color="grey", ls="--", lw=1)
        ax.set_xticks(x, LEVEL_NAMES, rotation=45, fontsize=7)
        ax.set_title(ds)
        ax.set_ylabel("revenue difference to forest (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Revenue difference to the causal forest at equal budget (cf. the paper's Figure 4)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ablations(rows: list[Row], path: Path, levels: tuple[str, ...] = ("Low-2", "Med-2", "High-2")) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["saco", *[a.name for a in ABLATIONS]]
    fig, axes = plt.subplots(1, len(levels), figsize=(5.0 * len(levels), 3.8), squeeze=False, sharey=True)
    for ax, lvl in zip(axes[0], levels, strict=True):
        budget = float("nan")
        for i, m in enumerate(names):
            sel = select(rows, dataset=ABLATION_SET, method=m, level=lvl)
            if not sel:
                continue
            budget = float(np.mean([r.budget for r in sel]))
            rev, rev_sd = mean_std([r.revenue for r in sel])
            cost, cost_sd = mean_std([r.cost for r in sel])
            ax.barh(i, rev, xerr=rev_sd, color="tab:blue", capsize=2)
            ax.barh(i, -cost, xerr=cost_sd, color="tab:red", capsize=2)
        ax.axvline(-budget, color="black", ls="--", lw=1, label="budget")
        ax.set_yticks(range(len(names)), names)
        ax.set_title(f"{lvl}: revenue (+) and cost (-)")
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Ablations on the sequential world with carry-over effects (cf. the paper's Figure 5)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
