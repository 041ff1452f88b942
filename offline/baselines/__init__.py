"""Baseline policies behind the one `offline.policy.Policy` interface."""

from offline.baselines.basic import MyopicOracle, RandomAtSpend, TwoStage

__all__ = ["MyopicOracle", "RandomAtSpend", "TwoStage"]

# the baselines of the SACO paper and of the budget-allocation papers it builds on (one file per method)
from offline.baselines.bandit import ThompsonBandit
from offline.baselines.cmdp import CMDP
from offline.baselines.dfcl import DFCL
from offline.baselines.forest import CausalForest
from offline.baselines.hrc import HiddenRepClustering
from offline.baselines.regularizer import BudgetRegularizer

__all__ += ["CMDP", "DFCL", "BudgetRegularizer", "CausalForest", "HiddenRepClustering", "ThompsonBandit"]
