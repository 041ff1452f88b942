"""What a report run is sized by (`ReportConfig`) and the one record it produces per scored point (`Row`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from offline.train import TrainConfig

DATASETS = ("seq-effects-on", "seq-effects-off", "hillstrom", "hillstrom-world")
FOREST = "forest"  # the reference method: every "gain vs forest" is relative to it
ABLATION_SET = "ablations"  # rows of the ablation study (scored on seq-effects-on), with saco and forest copied in


@dataclass
class ReportConfig:
    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    # sized so that the full run (3 seeds) fits in well under an hour on 2 CPU cores
    users: int = 1000  # users in the synthetic training logs
    rounds: int = 8
    eval_users: int = 1000  # fresh users of the evaluation population (synthetic worlds)
    eval_seed: int = 12_345
    hillstrom_rows: int | None = 10_000  # random subsample of the 64k customers (half train, half held out)
    hillstrom_path: Path | None = None
    # exactly the product's TrainConfig() (architecture, objective, 12-epoch schedule)
    train: TrainConfig = field(default_factory=TrainConfig)
    ablations: bool = True
    threads: int = 2
    max_passes: int = 24  # rollouts per budget level in the lambda search

    @classmethod
    def quick_config(cls, hillstrom_path: Path | None = None) -> ReportConfig:
        return cls(
            quick=True,
            seeds=(0,),
            users=100,
            rounds=3,
            eval_users=100,
            hillstrom_rows=600,
            max_passes=8,
            hillstrom_path=hillstrom_path,
            train=TrainConfig(epochs=1, d_model=16, n_layers=1, n_heads=2, lambda_draws=1),
        )


@dataclass
class Row:
    """One method calibrated to one budget level on one dataset and seed."""

    dataset: str
    seed: int
    method: str
    level: str
    budget_fraction: float
    budget: float
    revenue: float
    cost: float
    barate: float
    lam: float
    converged: bool
    train_s: float
    decide_ms_per_1k: float
    ips_revenue: float = float("nan")
    ips_cost: float = float("nan")
    note: str = ""

    @property
    def roi(self) -> float:
        return self.revenue / self.cost if self.cost > 0 else float("nan")
