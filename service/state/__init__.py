"""State stores: one interface, a Redis implementation and an embedded in-process one."""

from service.state.base import (
    CampaignConfig,
    CampaignNotFound,
    CampaignState,
    CampaignUpdate,
    CostAboveReservation,
    NewStep,
    Outcome,
    ReservedDecision,
    ReserveItem,
    ReserveResult,
    SettleResult,
    StateStore,
    StateStoreError,
    UserContext,
)

__all__ = [
    "CampaignConfig",
    "CampaignNotFound",
    "CampaignState",
    "CampaignUpdate",
    "CostAboveReservation",
    "NewStep",
    "Outcome",
    "ReserveItem",
    "ReserveResult",
    "ReservedDecision",
    "SettleResult",
    "StateStore",
    "StateStoreError",
    "UserContext",
]
