"""The service's state on Redis (standalone or Cluster): campaign ledgers, decision records, user contexts.

`StateStore` is the one implementation; `open_state_store` connects it to the configured Redis, or to
the embedded store's private redis-server when none is configured."""

from service.state.types import (
    CampaignConfig,
    CampaignNotFound,
    CampaignSettings,
    CampaignState,
    CampaignUpdate,
    CostAboveReservation,
    CouponCostsRefused,
    Groups,
    LogStatus,
    NewStep,
    NewSteps,
    Outcome,
    PacedState,
    Pacing,
    RequestIdConflict,
    ReserveBatch,
    ReservedDecision,
    ReserveItem,
    ReserveResult,
    SettleResult,
    StateStoreError,
    UserContext,
)

__all__ = [
    "CampaignConfig",
    "CampaignNotFound",
    "CampaignSettings",
    "CampaignState",
    "CampaignUpdate",
    "CostAboveReservation",
    "CouponCostsRefused",
    "Groups",
    "LogStatus",
    "NewStep",
    "NewSteps",
    "Outcome",
    "PacedState",
    "Pacing",
    "RequestIdConflict",
    "ReserveBatch",
    "ReserveItem",
    "ReserveResult",
    "ReservedDecision",
    "SettleResult",
    "StateStoreError",
    "UserContext",
]
