"""Request and response bodies of the HTTP API (docs/api.md)."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from service.money import to_cents

CAMPAIGN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
CAMPAIGN_ID_TEXT = "letters, digits, . _ : -"


def _two_decimals(value: float) -> float:
    to_cents(value)  # raises ValueError naming the problem
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Money = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0), AfterValidator(_two_decimals)]
PositiveMoney = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0), AfterValidator(_two_decimals)]
Lambda = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0), AfterValidator(_finite)]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
DecisionId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DecisionRequestItem(_Body):
    user_id: UserId
    features: list[FiniteFloat]
    request_id: RequestId | None = None


class DecisionsRequest(_Body):
    requests: list[DecisionRequestItem] = Field(min_length=1)


class Decision(BaseModel):
    user_id: str
    decision_id: str
    action: int
    cost: float
    model_version: str
    lambda_: float = Field(alias="lambda")


class DecisionsResponse(BaseModel):
    decisions: list[Decision]


class OutcomeItem(_Body):
    decision_id: DecisionId
    reward: FiniteFloat
    cost: Money


class OutcomesRequest(_Body):
    outcomes: list[OutcomeItem] = Field(min_length=1, max_length=10_000)


class OutcomesResponse(BaseModel):
    accepted: int
    duplicates: int
    unknown: int


class Coupon(_Body):
    action: Annotated[int, Field(strict=True, ge=1)]
    cost: PositiveMoney


class CampaignPut(_Body):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    budget: Money
    coupons: list[Coupon] = Field(max_length=1024)
    lambda_: Lambda | None = Field(default=None, alias="lambda")
    expected_users: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        default=None,
        description="audience size; with it and no lambda, lambda comes from the model's calibration table",
    )


class CampaignPatch(_Body):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    budget: Money | None = None
    coupons: list[Coupon] | None = Field(default=None, max_length=1024)
    lambda_: Lambda | None = Field(default=None, alias="lambda")
    expected_users: Annotated[int, Field(strict=True, ge=1)] | None = None


class CampaignView(BaseModel):
    campaign_id: str
    budget: float
    spent: float
    reserved: float
    remaining: float
    lambda_: float = Field(alias="lambda")
    model_version: str | None
    decisions: int
    coupons: list[Coupon]
    lambda_source: str
    expected_users: int | None
    overrun: float


class ReloadResponse(BaseModel):
    version: str
    previous: str
    changed: bool
