"""`saco report`: SACO against every baseline on sequential, single-round and real data.

Datasets (each with its own logs, its own scoring environment and 9 budgets; `datasets.py`):
  seq-effects-on   the sequential synthetic world with carry-over effects (research/world.py), exact scoring
  seq-effects-off  the same world with the effects off (myopic), exact scoring
  hillstrom        the real randomised e-mail campaign, T = 1 (research/hillstrom.py for the mapping);
                   policies and a LogEnvironment are fitted on a random half, every policy is scored by that
                   environment on the held-out half's customers, and checked with an unbiased
                   inverse-propensity estimate (P(arm) = 1/3) on the same held-out rows
  hillstrom-world  a sequential world whose first-round visit rates / spend match Hillstrom's (simulated
                   carry-over), exact scoring

Every method is calibrated per budget with `research.evaluate.calibrate_levels` (the monotone search:
spend <= budget by construction, so BARate <= 1.00). Budgets are BUDGET_LEVELS x the reference spend =
the smallest unconstrained (lambda = 0) spend of the compared main methods, as in `saco evaluate`.

Modules: `run` (fit, calibrate and score every method; write the outputs), `ablations` (the SACO variants),
`tables` (aggregation and markdown tables), `plots` (figures), `markdown` (results.md), `datasets`,
`policies` (timing and budget-knob wrappers) and `config` (`ReportConfig`, `Row`).
"""

from research.report.ablations import ABLATIONS, Ablation, ZeroInputs, ablation_policy, zero_inputs
from research.report.config import ABLATION_SET, DATASETS, FOREST, ReportConfig, Row
from research.report.datasets import Dataset, build_dataset, world_logs
from research.report.markdown import markdown
from research.report.plots import plot_ablations, plot_forest_difference
from research.report.policies import BudgetKnob, Timed
from research.report.run import baseline_factories, run_ablations, run_dataset, run_report
from research.report.tables import gain_vs_forest, ips_table, level_table, methods_of, summary_table

__all__ = [
    "ABLATIONS",
    "ABLATION_SET",
    "DATASETS",
    "FOREST",
    "Ablation",
    "BudgetKnob",
    "Dataset",
    "ReportConfig",
    "Row",
    "Timed",
    "ZeroInputs",
    "ablation_policy",
    "baseline_factories",
    "build_dataset",
    "gain_vs_forest",
    "ips_table",
    "level_table",
    "markdown",
    "methods_of",
    "plot_ablations",
    "plot_forest_difference",
    "run_ablations",
    "run_dataset",
    "run_report",
    "summary_table",
    "world_logs",
    "zero_inputs",
]
