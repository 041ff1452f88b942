"""Baseline policies behind the one `offline.policy.Policy` interface."""

from offline.baselines.basic import MyopicOracle, RandomAtSpend, TwoStage

__all__ = ["MyopicOracle", "RandomAtSpend", "TwoStage"]
