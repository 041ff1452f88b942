"""The manifest that travels beside every exported policy: everything the service needs to run it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

OBJECTIVES = ("value", "dt-lagrangian", "dt-literal")
# The largest lambda the service takes (manifest default, calibration table, admin): far above any useful
# price of a unit of cost, and small enough that lambda * cost stays finite in float32.
MAX_LAMBDA = 1e6


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_lambda(name: str, value: Any) -> None:
    if not _number(value) or not math.isfinite(value) or not 0 <= value <= MAX_LAMBDA:
        raise ValueError(f"manifest field {name} must be a finite number within 0..{MAX_LAMBDA:g}, got {value!r}")


@dataclass(frozen=True)
class LambdaPoint:
    """One calibration point: running every user through the policy at `lam` costs/earns this per user."""

    lam: float
    cost_per_user: float
    revenue_per_user: float


@dataclass(frozen=True)
class Manifest:
    version: str
    created_at: str
    model_sha256: str
    feature_dim: int
    num_actions: int
    context_length: int
    max_timestep: int
    objective: str
    # To-go targets at a user's first step, in currency units; after each observed outcome the service
    # subtracts the realized reward / cost (RTG_{t+1} = RTG_t - r_t, CTG_{t+1} = CTG_t - c_t).
    initial_rtg: float
    initial_ctg: float
    format: str = "torchscript"
    # Normalisation baked into the exported module, recorded here for audit only.
    normalisation: dict[str, Any] = field(default_factory=dict)
    # Mean realized cost per action in the training logs (index = action), for operators' reference.
    action_costs: list[float] = field(default_factory=list)
    # The module also exports `score_terms` -> [B, 3K]: the revenue and cost terms of the score (score =
    # revenue - lambda * cost) and each coupon's expected cost now for the user (currency units).
    score_terms: bool = False
    # Empty: the model names actions by index (action a is coupon a). Otherwise it scores actions by their
    # features: the names of the action table's columns (contract/catalog.py ACTION_FEATURES) that its
    # exported `catalog_terms(inputs..., table)` reads, the inputs' actions being rows of that table.
    action_features: list[str] = field(default_factory=list)
    # Per decision index (a user's 0th, 1st, ... decision in a campaign; the last entry for later ones): the
    # ratio of the learned environment's expected cost of the coupons the policy chooses to the policy's own
    # expected cost now of them, measured by `saco calibrate` at its lambda. The service multiplies the
    # expected costs it reserves and paces with by it; empty: no correction.
    cost_ratios: list[float] = field(default_factory=list)
    lambda_table: list[LambdaPoint] = field(default_factory=list)
    default_lambda: float | None = None
    data_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("feature_dim", "num_actions", "context_length", "max_timestep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"manifest field {name} must be a positive integer, got {value!r}")
        if self.num_actions < 2:
            raise ValueError("manifest field num_actions must be >= 2 (no coupon + at least one coupon)")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"manifest field objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if len(self.model_sha256) != 64:
            raise ValueError("manifest field model_sha256 must be a sha256 hex digest")
        for name in ("version", "created_at", "model_sha256", "objective", "format", "data_sha256"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"manifest field {name} must be a string, got {getattr(self, name)!r}")
        for name in ("initial_rtg", "initial_ctg"):
            if not _number(getattr(self, name)) or not math.isfinite(getattr(self, name)):
                raise ValueError(f"manifest field {name} must be a finite number, got {getattr(self, name)!r}")
        if self.default_lambda is not None:
            _check_lambda("default_lambda", self.default_lambda)
        for i, point in enumerate(self.lambda_table):
            _check_lambda(f"lambda_table[{i}].lam", point.lam)
            for name in ("cost_per_user", "revenue_per_user"):
                value = getattr(point, name)
                if not _number(value) or not math.isfinite(value):
                    raise ValueError(f"manifest field lambda_table[{i}].{name} must be a finite number, got {value!r}")
        for i, cost in enumerate(self.action_costs):
            if not _number(cost) or not math.isfinite(cost):
                raise ValueError(f"manifest field action_costs[{i}] must be a finite number, got {cost!r}")
        if not isinstance(self.action_features, list) or not all(isinstance(n, str) for n in self.action_features):
            raise ValueError(f"manifest field action_features must be a list of names, got {self.action_features!r}")
        if self.action_features and not self.score_terms:
            raise ValueError("manifest field action_features needs score_terms (a model scoring by features has them)")
        if not isinstance(self.cost_ratios, list):
            raise ValueError(f"manifest field cost_ratios must be a list of numbers, got {self.cost_ratios!r}")
        for i, ratio in enumerate(self.cost_ratios):
            if not _number(ratio) or not math.isfinite(ratio) or ratio <= 0:
                raise ValueError(f"manifest field cost_ratios[{i}] must be a positive finite number, got {ratio!r}")

    def lambda_for_budget_per_user(self, budget_per_user: float) -> float | None:
        """Smallest calibrated lambda whose spend per user fits `budget_per_user` (None without a table)."""
        if not self.lambda_table:
            return self.default_lambda
        fitting = [p for p in self.lambda_table if p.cost_per_user <= budget_per_user]
        if not fitting:
            return max(p.lam for p in self.lambda_table)
        return min(p.lam for p in fitting)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        missing = [
            name
            for name in (
                "version",
                "created_at",
                "model_sha256",
                "feature_dim",
                "num_actions",
                "context_length",
                "max_timestep",
                "objective",
                "initial_rtg",
                "initial_ctg",
            )
            if name not in data
        ]
        if missing:
            raise ValueError(f"manifest lacks field(s): {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        table = kwargs.get("lambda_table", [])
        if not isinstance(table, list) or not all(isinstance(p, LambdaPoint | dict) for p in table):
            raise ValueError("manifest field lambda_table must be a list of {lam, cost_per_user, revenue_per_user}")
        kwargs["lambda_table"] = [p if isinstance(p, LambdaPoint) else LambdaPoint(**p) for p in table]
        for name in ("initial_rtg", "initial_ctg"):
            if _number(kwargs[name]):
                kwargs[name] = float(kwargs[name])
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()
