"""Baseline policies behind the one `offline.rollout.Policy` interface."""

from research.baselines.basic import MyopicOracle, RandomAtSpend, TwoStage

__all__ = ["MyopicOracle", "RandomAtSpend", "TwoStage"]

# the baselines of the SACO paper and of the budget-allocation papers it builds on (one file per method)
from research.baselines.bandit import ThompsonBandit
from research.baselines.cmdp import CMDP
from research.baselines.dfcl import DFCL
from research.baselines.forest import CausalForest
from research.baselines.hrc import HiddenRepClustering
from research.baselines.regularizer import BudgetRegularizer

__all__ += ["CMDP", "DFCL", "BudgetRegularizer", "CausalForest", "HiddenRepClustering", "ThompsonBandit"]
