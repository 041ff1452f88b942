"""The state-store interface: campaign ledgers, decision and request records, user contexts.

Two implementations share these semantics exactly (the store test suite runs against both):
`RedisStateStore` (Lua scripts, one atomic script per ledger operation) and `MemoryStateStore`
(in-process, one asyncio lock). All money is integer cents.

A user context is one binary value (`service.state.context` defines the format and the pure-Python
operations on it; the Redis scripts do the same by byte offset). It travels on every decision, so it
is compact and a batch of them turns into model inputs without per-step parsing.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import NamedTuple

from service.state.context import new_step_bytes

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


# One per user on the decision path: NamedTuples (a frozen dataclass costs ~2 us per instance, 0.3 ms for
# a batch of 128; these are built, read and dropped within a request).
class ReserveItem(NamedTuple):
    decision_id: str  # used only when the item makes a new decision
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
    # the user's context as the decision read it: a store may write the appended value it derives from this
    # when the context has not changed since (the Redis store checks the header), else it appends afresh
    read: bytes | None = None

    def encoded(self) -> bytes:
        return new_step_bytes(self.decision_id, self.action, self.features)


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


class StateStore(abc.ABC):
    """Every method is atomic with respect to the budget invariant `spent + reserved <= budget`."""

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def upsert_campaign(self, campaign_id: str, update: CampaignUpdate) -> CampaignState:
        """Create/replace (update.replace) or patch; patching an unknown campaign raises CampaignNotFound."""

    @abc.abstractmethod
    async def get_campaign(self, campaign_id: str) -> CampaignState | None: ...

    @abc.abstractmethod
    async def campaign_ids(self) -> list[str]: ...

    @abc.abstractmethod
    async def load_for_decision(
        self, campaign_id: str, user_ids: list[str]
    ) -> tuple[CampaignConfig | None, list[UserContext | None]]:
        """The campaign's configuration and every user's context, in one round trip."""

    @abc.abstractmethod
    async def reserve(
        self,
        campaign_id: str,
        items: list[ReserveItem],
        *,
        model_version: str,
        lam: float,
        now_ms: int,
        reservation_expiry_ms: int,
        decision_ttl_ms: int,
    ) -> ReserveResult:
        """Decide and reserve a whole batch atomically, items in priority order; request_id idempotent."""

    @abc.abstractmethod
    async def append_steps(
        self,
        campaign_id: str,
        steps: list[NewStep],
        *,
        capacity: int,
        ttl_ms: int,
        initial_rtg: float,
        initial_ctg: float,
    ) -> None:
        """Append each decision as a step of its user's context, keeping the last `capacity` steps."""

    @abc.abstractmethod
    async def settle(self, campaign_id: str, outcomes: list[Outcome]) -> SettleResult:
        """Settle a batch of outcomes atomically (all or nothing: CostAboveReservation refuses all)."""

    @abc.abstractmethod
    async def apply_outcomes_to_contexts(
        self, campaign_id: str, updates: list[tuple[str, str, float, int]], *, ttl_ms: int
    ) -> None:
        """Write outcomes into their users' context steps and running to-go values."""

    @abc.abstractmethod
    async def sweep_expired(self, campaign_id: str, now_ms: int, limit: int = 1000) -> int:
        """Release reservations whose deadline passed; returns how many were released."""
