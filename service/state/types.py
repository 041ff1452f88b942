"""What the state store takes and returns: campaign configuration and ledger, reservations, outcomes.

All money is integer cents. A user context is one binary value in the format of `service.state.context`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

UserContext = bytes  # see service.state.context


class StateStoreError(RuntimeError):
    """The state store cannot be reached or answered with an error (the request gets a 503)."""


class CampaignNotFound(LookupError):
    def __init__(self, campaign_id: str) -> None:
        super().__init__(f"campaign {campaign_id!r} not found")
        self.campaign_id = campaign_id


class CostAboveReservation(ValueError):
    """An outcome's realized cost exceeds what its decision reserved; the whole outcome batch is refused."""

    def __init__(self, index: int, cost_cents: int, reserved_cents: int) -> None:
        super().__init__(
            f"cost {cost_cents / 100:.2f} is above the {reserved_cents / 100:.2f} reserved by this decision"
        )
        self.index = index


@dataclass(frozen=True)
class CampaignConfig:
    """What a decision reads of its campaign (the ledger is read and changed by the reservation alone)."""

    campaign_id: str
    budget: int  # cents
    coupons: dict[int, int]  # action -> cost in cents
    admin_lambda: float | None
    expected_users: int | None


@dataclass(frozen=True)
class CampaignState:
    campaign_id: str
    budget: int
    spent: int
    reserved: int
    coupons: dict[int, int]  # action -> cost in cents
    admin_lambda: float | None
    expected_users: int | None
    model_version: str | None
    decisions: int
    overrun: int  # realized cost of late outcomes that no longer fitted the budget (kept out of `spent`)

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.spent - self.reserved)

    @property
    def config(self) -> CampaignConfig:
        return CampaignConfig(self.campaign_id, self.budget, self.coupons, self.admin_lambda, self.expected_users)


@dataclass(frozen=True)
class CampaignUpdate:
    """What a PUT (replace=True) or PATCH sets; None leaves a field as it is (PUT: clears lambda/users)."""

    replace: bool
    budget: int | None = None
    coupons: dict[int, int] | None = None
    admin_lambda: float | None = None
    clear_lambda: bool = False
    expected_users: int | None = None
    clear_expected_users: bool = False


# One per user on the decision path, built and dropped within a request: NamedTuples are the cheapest.
class ReserveItem(NamedTuple):
    user_id: str
    request_id: str | None
    # offered actions in descending score order, cut after action 0: the first that fits is taken
    preferences: list[int]


class ReservedDecision(NamedTuple):
    decision_id: str
    user_id: str
    action: int
    cost: int
    model_version: str
    lam: float
    new: bool  # False: an earlier decision returned again for a repeated request_id
    downgraded: bool = False  # the preferred coupon did not fit the remaining budget


@dataclass(frozen=True)
class ReserveResult:
    decisions: list[ReservedDecision]  # in the order of the items
    remaining: int


class NewStep(NamedTuple):
    user_id: str
    decision_id: str
    action: int
    features: bytes  # float32 little-endian
    # the user's context as the decision read it: the step is appended to it, unless it changed since
    read: bytes | None = None


@dataclass(frozen=True)
class Outcome:
    decision_id: str
    reward: float
    cost: int


@dataclass
class SettleResult:
    accepted: int = 0
    duplicates: int = 0
    unknown: int = 0
    # (user_id, decision_id, reward, cost in cents) of the accepted outcomes, for the contexts
    context_updates: list[tuple[str, str, float, int]] = field(default_factory=list)
    remaining: int = 0
