"""What the state store takes and returns: campaign configuration and ledger, reservations, outcomes.

All money is integer cents. A user context is one binary value in the format of `service.state.context`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from contract.catalog import Catalog

UserContext = bytes  # see service.state.context


class StateStoreError(RuntimeError):
    """The state store cannot be reached or answered with an error (the request gets a 503)."""


class CampaignNotFound(LookupError):
    def __init__(self, campaign_id: str) -> None:
        super().__init__(f"campaign {campaign_id!r} not found")
        self.campaign_id = campaign_id


class CostAboveReservation(ValueError):
    """An outcome's realized cost exceeds what its decision reserved (for a coupon of a bundle: what that
    coupon reserved); the whole outcome batch is refused."""

    def __init__(self, index: int, cost_cents: int, reserved_cents: int, coupon: int | None = None) -> None:
        cost, reserved = f"{cost_cents / 100:.2f}", f"{reserved_cents / 100:.2f}"
        if coupon is None:
            message = f"cost {cost} is above the {reserved} this decision's coupon costs"
        else:
            message = f"coupon {coupon}'s cost {cost} is above the {reserved} it costs"
        super().__init__(message)
        self.index = index
        self.coupon = coupon  # None: the outcome's cost; else the coupon of `coupons` whose cost is too high


class CouponCostsRefused(ValueError):
    """An outcome's per-coupon costs do not fit its decision: a coupon the decision did not grant, or no
    per-coupon costs for a bundle of several coupons with a cost above 0. The whole outcome batch is refused."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class RequestIdConflict(ValueError):
    """A request_id that already names another user's decision (or is given twice in one batch for two
    users); the whole batch is refused and nothing is reserved."""

    def __init__(self, request_id: str, item: int) -> None:
        super().__init__(f"request_id {request_id!r} already names a decision for another user")
        self.request_id = request_id
        self.item = item  # the position of the item in the reserved batch


@dataclass(frozen=True)
class CampaignSettings:
    """What an operator sets of a campaign (PUT / PATCH); the store keeps each as a field of its hash."""

    budget: int  # cents
    coupons: dict[int, int]  # action -> cost in cents
    admin_lambda: float | None = None
    expected_users: int | None = None  # audience size, for lambda from the model's calibration table
    reservation_mode: str = "strict"  # "strict" | "expected"
    overspend_risk: float = 0.01  # the bound of `expected` mode
    starts_ms: int | None = None  # the spend plan's horizon (epoch ms) ...
    ends_ms: int | None = None
    expected_decisions: int | None = None  # ... or the traffic the budget covers
    pacing: bool | None = None  # None: on when there is a plan
    exploration_rate: float = 0.0  # share of decisions drawn uniformly among the coupons that fit (and none)
    holdout_rate: float = 0.0  # share of users (by a hash of campaign and user) who never get a coupon
    pacing_method: str = "resolve"  # "resolve" | "descent"
    # expected mode: the smallest redemption probability a reservation assumes (None: the service's default)
    min_redemption: float | None = None
    # the coupon catalog (contract/catalog.py); None: `coupons` alone, each coupon a bundle of its own
    catalog: Catalog | None = None

    @property
    def has_plan(self) -> bool:
        return self.ends_ms is not None or self.expected_decisions is not None

    @property
    def pacing_on(self) -> bool:
        return self.has_plan and self.pacing is not False


# the settings a PUT leaves at their defaults unless it names them (budget and coupons it always names)
OPTIONAL_SETTINGS = (
    "admin_lambda",
    "expected_users",
    "reservation_mode",
    "overspend_risk",
    "starts_ms",
    "ends_ms",
    "expected_decisions",
    "pacing",
    "exploration_rate",
    "holdout_rate",
    "pacing_method",
    "min_redemption",
)


@dataclass(frozen=True)
class PacedState:
    """What the last pacing step left for decisions to read (pace.lua)."""

    lam: float  # the dual-descent lambda
    allowance: float | None  # cents each further decision may spend to meet the budget at the plan's end
    ratios: dict[int, float]  # action -> realised / predicted cost of its settled coupons


@dataclass(frozen=True)
class CampaignConfig:
    """What a decision reads of its campaign (the ledger is read and changed by the reservation alone)."""

    campaign_id: str
    settings: CampaignSettings
    paced: PacedState | None = None  # set by pacing while it runs

    @property
    def budget(self) -> int:
        return self.settings.budget

    @property
    def coupons(self) -> dict[int, int]:
        return self.settings.coupons


@dataclass(frozen=True)
class Pacing:
    """Where online pacing stands (the store's `pace` step keeps it)."""

    state: PacedState | None = None  # None before the first step
    at_ms: int | None = None  # when the last step ran
    plan: int = 0  # cents the plan had spent by then
    actual: int = 0  # cents spent then, realised plus the expected cost of outstanding reservations

    @property
    def lam(self) -> float | None:
        return None if self.state is None else self.state.lam


@dataclass(frozen=True)
class Groups:
    """One group of a campaign's users (holdout or treated): its decisions and its settled outcomes."""

    decisions: int = 0
    settled: int = 0  # decisions with an accepted outcome
    reward: int = 0  # cents, the sum of their rewards
    cost: int = 0  # cents, the sum of their realised costs

    @property
    def reward_per_outcome(self) -> float | None:
        """Mean reward of a settled decision, in cents (None before the first outcome)."""
        return self.reward / self.settled if self.settled else None


@dataclass(frozen=True)
class LogStatus:
    """A campaign's decision log as the exporter sees it (docs/state.md, "The decision log")."""

    entries: int  # entries in the stream
    lag: int  # of them, the entries the exporter's group has not read (all of them before its first run)
    lost: int  # entries trimmed before the exporter read them, since the campaign began


@dataclass(frozen=True)
class CampaignState:
    campaign_id: str
    settings: CampaignSettings
    spent: int
    reserved: int
    model_version: str | None
    decisions: int
    overrun: int  # realized cost of late outcomes that no longer fitted the budget (kept out of `spent`)
    pacing: Pacing = field(default_factory=Pacing)
    explored: int = 0  # decisions drawn by exploration
    holdout: Groups = field(default_factory=Groups)  # holdout users' decisions and outcomes
    treated: Groups = field(default_factory=Groups)  # everyone else's
    log_entries: int = 0  # entries in the campaign's decision and outcome log
    outstanding: int = 0  # face value (cents) of the coupons granted and neither settled nor expired
    log_lost: int = 0  # log entries trimmed before the exporter read them (docs/state.md)
    stock_used: dict[int, int] = field(default_factory=dict)  # coupon -> units of its stock held or redeemed

    @property
    def budget(self) -> int:
        return self.settings.budget

    @property
    def coupons(self) -> dict[int, int]:
        return self.settings.coupons

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.spent - self.reserved)

    @property
    def excess(self) -> int:
        """How far spent + reserved is above the budget (an operator lowered it below them; CONTRACT 4)."""
        return max(0, self.spent + self.reserved - self.budget)

    @property
    def config(self) -> CampaignConfig:
        return CampaignConfig(self.campaign_id, self.settings, self.paced)

    @property
    def paced(self) -> PacedState | None:
        return self.pacing.state


@dataclass(frozen=True)
class CampaignUpdate:
    """What a PUT (replace=True) or PATCH sets. A field left None is not changed by a PATCH and is reset to
    its default by a PUT; a field named in `cleared` goes back to its default either way."""

    replace: bool
    budget: int | None = None
    coupons: dict[int, int] | None = None
    admin_lambda: float | None = None
    expected_users: int | None = None
    reservation_mode: str | None = None
    overspend_risk: float | None = None
    starts_ms: int | None = None
    ends_ms: int | None = None
    expected_decisions: int | None = None
    pacing: bool | None = None
    exploration_rate: float | None = None
    holdout_rate: float | None = None
    pacing_method: str | None = None
    min_redemption: float | None = None
    catalog: Catalog | None = None  # with `coupons`: the catalog they come from (None: a plain campaign)
    cleared: frozenset[str] = frozenset()


class ReserveItem(NamedTuple):
    """One user of a reservation (tests and tools; the decision path builds a `ReserveBatch` directly)."""

    user_id: str
    request_id: str | None
    # offered actions in descending score order, cut after action 0: the first that fits is taken
    preferences: list[int]
    features: bytes = b""  # the request's features (float32 little-endian), for the decision log
    holdout: bool = False  # the user is in the campaign's holdout group: no coupon
    # exploration: a uniform draw in [0, 1) that picks among the coupons that fit (and none) instead of the
    # first preference; None: the first preference that fits
    explore_draw: float | None = None
    # per action (index = action): the model's expected cost of that coupon for this user, in cents, at most
    # the coupon's cost; what an `expected` reservation starts from (None: the coupon's cost)
    expected_costs: list[int] | None = None


@dataclass(frozen=True)
class ReserveBatch:
    """A request's users as the reservation takes them: columns, one entry per user, in priority order (the
    order in which they reserve); what `ReserveItem` says of one user, for all of them."""

    user_ids: list[str]
    request_ids: list[str | None]
    orderings: list[list[int]]  # the distinct preference lists (a batch has a handful)
    ordering: list[int]  # per user: the index of its preference list in `orderings`
    features: bytes = b""  # the users' float32 little-endian feature rows, concatenated
    holdout: list[int] = field(default_factory=list)  # positions of the holdout users
    explore: list[tuple[int, float]] = field(default_factory=list)  # (position, draw) of the exploring users
    expected_costs: list[list[int]] | None = None  # per user, as ReserveItem.expected_costs ([]: none)
    # a catalog campaign's request: the bundle keys (contract/catalog.py `Bundle.key`) that the preference
    # lists name by position (1-based; 0 no coupon); None: the lists name coupon actions
    bundles: list[str] | None = None

    def __len__(self) -> int:
        return len(self.user_ids)

    @staticmethod
    def of(items: Sequence[ReserveItem], bundles: list[str] | None = None) -> ReserveBatch:
        """The batch of these items; `bundles`: the bundle keys their preferences name by position."""
        if len({len(item.features) for item in items}) > 1:
            raise ValueError("every reserve item must carry features of the same length (float32 rows)")
        orderings: dict[tuple[int, ...], int] = {}
        ordering = [orderings.setdefault(tuple(item.preferences), len(orderings)) for item in items]
        return ReserveBatch(
            user_ids=[item.user_id for item in items],
            request_ids=[item.request_id for item in items],
            orderings=[list(prefs) for prefs in orderings],
            ordering=ordering,
            features=b"".join([item.features for item in items]),
            holdout=[i for i, item in enumerate(items) if item.holdout],
            explore=[
                (i, item.explore_draw)
                for i, item in enumerate(items)
                if item.explore_draw is not None and not item.holdout
            ],
            expected_costs=[item.expected_costs or [] for item in items]
            if any(item.expected_costs for item in items)
            else None,
            bundles=bundles,
        )


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
    """The batch's decisions as columns, in the order of the batch."""

    decision_ids: list[str]
    user_ids: list[str]
    actions: list[int]
    costs: list[int]  # cents reserved
    versions: list[str]  # the model version of each decision (an earlier one's for a repeated request_id)
    lams: list[float]
    new: list[bool]  # False: an earlier decision returned again for a repeated request_id
    downgraded: list[bool]  # the preferred coupon did not fit the remaining budget
    remaining: int
    # a catalog request's: per decision, its coupons and their costs in cents ([] no coupon); None otherwise
    components: list[list[tuple[int, int]]] | None = None

    @property
    def decisions(self) -> list[ReservedDecision]:
        return [
            ReservedDecision(*row)
            for row in zip(
                self.decision_ids,
                self.user_ids,
                self.actions,
                self.costs,
                self.versions,
                self.lams,
                self.new,
                self.downgraded,
                strict=True,
            )
        ]


class NewStep(NamedTuple):
    user_id: str
    decision_id: str
    action: int
    features: bytes  # float32 little-endian
    # the user's context as the decision read it: the step is appended to it, unless it changed since
    read: bytes | None = None


@dataclass(frozen=True)
class NewSteps:
    """Decisions to append to their users' contexts, as columns (what `NewStep` says of one, for all)."""

    user_ids: list[str]
    decision_ids: list[str]
    actions: list[int]
    features: bytes  # the float32 little-endian feature rows, concatenated
    reads: list[bytes | None]  # each user's context as the decision read it

    def __len__(self) -> int:
        return len(self.user_ids)

    @staticmethod
    def of(steps: Sequence[NewStep]) -> NewSteps:
        if len({len(step.features) for step in steps}) > 1:
            raise ValueError("every new step must carry features of the same length (float32 rows)")
        return NewSteps(
            user_ids=[step.user_id for step in steps],
            decision_ids=[step.decision_id for step in steps],
            actions=[step.action for step in steps],
            features=b"".join([step.features for step in steps]),
            reads=[step.read for step in steps],
        )


@dataclass(frozen=True)
class Outcome:
    decision_id: str
    reward: float  # currency units, any precision: the store logs and counts it in cents, rounded half up
    cost: int  # cents
    # each coupon's realised cost (coupon, cents), summing to `cost`; None: not given
    coupons: list[tuple[int, int]] | None = None


@dataclass
class SettleResult:
    accepted: int = 0
    duplicates: int = 0
    unknown: int = 0
    # (user_id, decision_id, reward, cost) of the accepted outcomes (cents), for the contexts
    context_updates: list[tuple[str, str, int, int]] = field(default_factory=list)
    remaining: int = 0
