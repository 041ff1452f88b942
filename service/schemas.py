"""Request and response bodies of the HTTP API (docs/api.md)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from contract.catalog import MAX_ACTION, MAX_BUNDLES, MAX_CLASS_CHARS, MAX_COUPONS, MAX_PER_BUNDLE, MAX_STOCK
from contract.money import MAX_AMOUNT, to_cents
from model_store import MAX_LAMBDA

CAMPAIGN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
CAMPAIGN_ID_TEXT = "letters, digits, . _ : -"
# The largest count a campaign takes (`expected_users`, `expected_decisions`): far above any audience, and
# exact in the doubles of Redis's Lua scripts and of JSON.
MAX_COUNT = 10**12
# The largest magnitude a 32-bit float holds: the model reads features as float32. The service's
# feature range (SACO_MAX_ABS_FEATURE) is narrower.
FLOAT32_MAX = 3.4028234663852886e38


def _two_decimals(value: float) -> float:
    to_cents(value)  # raises ValueError naming the problem
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Money = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=MAX_AMOUNT), AfterValidator(_two_decimals)]
PositiveMoney = Annotated[
    float, Field(strict=True, allow_inf_nan=False, gt=0, le=MAX_AMOUNT), AfterValidator(_two_decimals)
]
Reward = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_AMOUNT, le=MAX_AMOUNT)]
Lambda = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=MAX_LAMBDA), AfterValidator(_finite)]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
DecisionId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


Feature = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


class DecisionRequestItem(_Body):
    user_id: UserId
    features: list[Feature] = Field(
        description="the model's feature_dim numbers, each within +-SACO_MAX_ABS_FEATURE (default 10^6)"
    )
    request_id: RequestId | None = None


class DecisionsRequest(_Body):
    requests: list[DecisionRequestItem] = Field(min_length=1)


class DecisionCoupon(BaseModel):
    action: int
    cost: float = Field(description="what the coupon reserves at worst: its amount, or a percent coupon's cap")


class Decision(BaseModel):
    user_id: str
    decision_id: str
    action: int = Field(
        description="0 no coupon; a coupon's action; a bundle of several coupons: its action in the campaign's "
        "`bundles` (above 1000000)"
    )
    cost: float = Field(description="the amount reserved at worst: the sum of the coupons' costs")
    model_version: str
    lambda_: float = Field(alias="lambda")
    coupons: list[DecisionCoupon] | None = Field(
        default=None, description="a catalog campaign's decision: its coupons (absent for a campaign without one)"
    )


class DecisionsResponse(BaseModel):
    decisions: list[Decision]


Action = Annotated[int, Field(strict=True, ge=1, le=MAX_ACTION)]


class OutcomeCoupon(_Body):
    action: Action
    cost: Money


class OutcomeItem(_Body):
    decision_id: DecisionId
    reward: Reward
    cost: Money
    coupons: list[OutcomeCoupon] | None = Field(
        default=None,
        max_length=MAX_PER_BUNDLE,
        description="the realised cost of each coupon of the decision's bundle (a coupon left out: 0, unused); "
        "they sum to `cost`. Needed for a bundle of several coupons whose cost is above 0",
    )

    @model_validator(mode="after")
    def _coupons_sum(self) -> OutcomeItem:
        if self.coupons is not None:
            actions = [c.action for c in self.coupons]
            if len(set(actions)) < len(actions):
                raise ValueError("coupons: a coupon is named twice")
            if sum(to_cents(c.cost) for c in self.coupons) != to_cents(self.cost):
                raise ValueError("coupons: their costs must sum to the outcome's cost")
        return self


class OutcomesRequest(_Body):
    outcomes: list[OutcomeItem] = Field(min_length=1, max_length=10_000)


class OutcomesResponse(BaseModel):
    accepted: int
    duplicates: int
    unknown: int


class Coupon(_Body):
    """A coupon of the campaign (docs/api.md, "Coupon catalog"; contract/catalog.py): today's `{action,
    cost}`, or a catalog coupon with `kind`, `value`, `cap`, `min_spend`, `stock`, `class`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    action: Action
    cost: PositiveMoney | None = Field(default=None, description="a fixed amount off (today's form of `value`)")
    kind: Literal["amount", "percent"] | None = Field(default=None, description="amount (default) or percent")
    value: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=MAX_AMOUNT)] | None = Field(
        default=None, description="the amount off (money), or the percent off (0 < value <= 100)"
    )
    cap: PositiveMoney | None = Field(default=None, description="a percent coupon's largest amount off (required)")
    min_spend: Money | None = Field(default=None, description="the basket the coupon needs")
    stock: Annotated[int, Field(strict=True, ge=0, le=MAX_STOCK)] | None = Field(
        default=None, description="units the campaign may grant"
    )
    group: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CLASS_CHARS)] | None = Field(
        default=None, alias="class", description="the class of the bundle rule (default: the kind)"
    )


Bundle = Annotated[list[Action], Field(min_length=1, max_length=MAX_PER_BUNDLE)]
MaxPerBundle = Annotated[int, Field(strict=True, ge=1, le=MAX_PER_BUNDLE)]


ReservationMode = Literal["strict", "expected"]
PacingMethod = Literal["resolve", "descent"]
OverspendRisk = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=0.5)]
Count = Annotated[int, Field(strict=True, ge=1, le=MAX_COUNT)]
Rate = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=0.5)]
Probability = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)]


class _Campaign(_Body):
    """The optional settings of a campaign, shared by PUT and PATCH (docs/api.md, budget control)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    lambda_: Lambda | None = Field(default=None, alias="lambda")
    expected_users: Count | None = Field(
        default=None,
        description="audience size; with it and no lambda, lambda comes from the model's calibration table",
    )
    reservation_mode: ReservationMode | None = Field(
        default=None,
        description="strict (default): a coupon reserves its cost, never an overspend; expected: a coupon "
        "reserves its expected cost plus a margin, overspend with probability at most overspend_risk",
    )
    overspend_risk: OverspendRisk | None = Field(default=None, description="the bound of expected mode (0.01)")
    starts_at: AwareDatetime | None = Field(default=None, description="the spend plan's start (default: now)")
    ends_at: AwareDatetime | None = Field(default=None, description="the spend plan's end: spend evenly until then")
    expected_decisions: Count | None = Field(
        default=None, description="the decisions the budget covers: spend evenly over them (before ends_at)"
    )
    pacing: Annotated[bool, Field(strict=True)] | None = Field(
        default=None, description="adjust lambda online toward the plan (default: on when there is a plan)"
    )
    pacing_method: PacingMethod | None = Field(
        default=None,
        description="resolve (default): each decision request solves for the lambda at which the model's "
        "expected spend of the request meets the budget left per decision; descent: dual descent alone",
    )
    exploration_rate: Rate | None = Field(
        default=None,
        description="share of decisions drawn uniformly among the coupons that fit and no coupon (default 0)",
    )
    holdout_rate: Rate | None = Field(
        default=None, description="share of users who never get a coupon, to measure incremental revenue (default 0)"
    )
    min_redemption: Probability | None = Field(
        default=None,
        description="expected mode: the smallest redemption probability a reservation assumes; a coupon reserves "
        "at least this share of its cost, and at least a cent (default SACO_MIN_REDEMPTION, 0.02)",
    )

    bundles: list[Bundle] | None = Field(
        default=None,
        max_length=MAX_BUNDLES,
        description="the allowed bundles, each a list of coupon actions (default: each coupon alone)",
    )
    max_per_bundle: MaxPerBundle | None = Field(
        default=None,
        description="the largest bundle; without `bundles`, every bundle of at most this many coupons, one per class",
    )

    @model_validator(mode="after")
    def _horizon(self) -> _Campaign:
        if self.starts_at is not None and self.ends_at is not None and self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class CampaignPut(_Campaign):
    budget: Money
    coupons: list[Coupon] = Field(max_length=MAX_COUPONS)


class CampaignPatch(_Campaign):
    budget: Money | None = None
    coupons: list[Coupon] | None = Field(default=None, max_length=MAX_COUPONS)


class PlainCoupon(_Body):
    action: int
    cost: float


class CatalogCoupon(BaseModel):
    action: int
    kind: str
    value: float = Field(description="the amount off, or the percent off")
    cap: float | None
    min_spend: float | None
    stock: int | None
    class_: str | None = Field(alias="class")
    cost: float = Field(description="the most the coupon costs: its amount, or its cap")
    stock_left: int | None = Field(
        description="units of its stock neither held by a decision nor redeemed (below 0: the stock was lowered "
        "below them, or a coupon redeemed after its reservation expired took its unit again)"
    )


class BundleView(BaseModel):
    action: int = Field(description="what a decision granting the bundle answers")
    coupons: list[int]
    cost: float = Field(description="the sum of its coupons' costs")


class GroupView(BaseModel):
    decisions: int
    settled: int = Field(description="decisions with an outcome")
    reward: float = Field(description="sum of the outcomes' rewards")
    cost: float = Field(description="sum of the outcomes' realised costs")
    reward_per_decision: float | None = Field(description="reward / settled (null before the first outcome)")


class CampaignView(BaseModel):
    campaign_id: str
    budget: float
    spent: float
    reserved: float
    remaining: float
    lambda_: float = Field(alias="lambda")
    model_version: str | None
    decisions: int
    coupons: list[PlainCoupon | CatalogCoupon] = Field(
        description="a campaign without a catalog: {action, cost}; with one: each coupon's catalog fields"
    )
    bundles: list[BundleView] | None = Field(
        default=None, description="a catalog campaign's allowed bundles (absent for a campaign without a catalog)"
    )
    max_per_bundle: int | None = None
    lambda_source: str
    calibration: str | None = Field(
        description="the model calibration this replica takes the lambda table and default lambda from "
        "(null: the manifest's own values)"
    )
    expected_users: int | None
    overrun: float
    excess: float = Field(
        description="how far spent + reserved is above the budget after the budget was lowered below them "
        "(no new coupon is granted until it is back to 0)"
    )
    reservation_mode: ReservationMode
    overspend_risk: float
    starts_at: datetime | None
    ends_at: datetime | None
    expected_decisions: int | None
    pacing: bool = Field(description="whether pacing adjusts lambda now")
    pacing_method: PacingMethod
    allowance: float | None = Field(
        description="what each further decision may spend to meet the budget at the plan's end (last pacing step)"
    )
    plan: float | None = Field(description="what the spend plan has spent by the last pacing step")
    pacing_spend: float | None = Field(
        description="spend at the last pacing step: realised plus the expected cost of outstanding reservations"
    )
    pacing_error: float | None = Field(description="(pacing_spend - plan) / budget at the last pacing step")
    exploration_rate: float
    holdout_rate: float
    min_redemption: float = Field(
        description="expected mode: the smallest redemption probability a reservation assumes"
    )
    outstanding: float = Field(
        description="face value of the coupons granted and not yet settled or expired (what strict mode counts)"
    )
    explored: int = Field(description="decisions drawn by exploration")
    holdout: GroupView = Field(description="the holdout group's decisions and outcomes")
    treated: GroupView = Field(description="every other user's decisions and outcomes")
    incremental_revenue_per_decision: float | None = Field(
        description="mean reward of a treated user's settled decision minus a holdout user's (null until both "
        "groups have outcomes)"
    )
    log_entries: int = Field(description="entries in the campaign's decision and outcome log")
    log_lost: int = Field(
        description="entries of the campaign's log trimmed by its bound before the exporter read them"
    )


class ReloadResponse(BaseModel):
    version: str
    previous: str
    changed: bool = Field(description="whether the version or its calibration changed")
    calibration: str | None = Field(description="the calibration now serving (null: the manifest's own values)")
    previous_calibration: str | None


class ErrorResponse(BaseModel):
    """Every error answer: a message, or (422, 409) a list of errors, each naming its field in `loc`."""

    detail: str | list[dict[str, Any]]


ERROR_DESCRIPTIONS = {
    401: "missing or wrong admin bearer token",
    404: "unknown campaign, or the admin API is disabled (no SACO_ADMIN_TOKEN)",
    409: "a request_id already names another user's decision (decisions); the model was refused (reload)",
    413: "request body larger than SACO_MAX_BODY_BYTES",
    415: "the body is not JSON (Content-Type must be application/json)",
    422: "malformed body; each error names its field",
    503: "state store unavailable or service overloaded: retry after the Retry-After seconds",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of these error codes."""
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


class InvalidInput(ValueError):
    """Input that pydantic could not check alone (it depends on the model or the campaign): a 422."""

    def __init__(self, loc: tuple[str | int, ...], msg: str, value: Any = None) -> None:
        super().__init__(msg)
        self.errors = [{"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": value}]
