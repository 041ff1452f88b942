"""Everything one app instance holds, built by the lifespan and reached by the route dependencies."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from service.batcher import MicroBatcher
from service.engine import DecisionEngine
from service.metrics import ServiceMetrics
from service.policy import PolicyHolder
from service.settings import Settings
from service.state.store import StateStore


@dataclass
class Runtime:
    settings: Settings
    metrics: ServiceMetrics
    policies: PolicyHolder
    store: StateStore
    batcher: MicroBatcher
    engine: DecisionEngine
    background: list[asyncio.Task[None]] = field(default_factory=list)
