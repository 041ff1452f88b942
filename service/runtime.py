"""Everything one app instance holds, built by the lifespan and reached by the route dependencies."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from model_store import ModelStore
from service.background import Background
from service.batcher import MicroBatcher
from service.campaigns import Campaigns
from service.decisions import Decisions
from service.metrics import ServiceMetrics
from service.policy import LoadedPolicy, PolicyHolder, PolicyRejected
from service.settings import Settings
from service.state import StateStoreError
from service.state.store import StateStore

log = logging.getLogger("saco.service.runtime")
RESUBSCRIBE_S = 1.0  # wait before subscribing again after the announcements' connection failed


@dataclass
class Runtime:
    settings: Settings
    metrics: ServiceMetrics
    policies: PolicyHolder
    store: StateStore
    batcher: MicroBatcher
    decisions: Decisions
    campaigns: Campaigns
    background: Background
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def reload_model(self, version: str | None = None) -> tuple[LoadedPolicy, LoadedPolicy]:
        """Verify and serve `version` (default: the model store's current one): (previous, new). Raises
        PolicyRejected, the incumbent serving on."""
        previous, current = await self.policies.reload(version)
        if previous.version != current.version:
            self.metrics.set_model(previous.version, current.version)
        return previous, current

    async def _announced(self, version: str) -> None:
        try:
            previous, current = await self.reload_model(version)
        except PolicyRejected as exc:
            self.metrics.model_announcements.labels(result="refused").inc()
            log.warning(
                "announced model refused, the incumbent keeps serving", extra={"version": version, "error": str(exc)}
            )
            return
        changed = previous.version != current.version
        self.metrics.model_announcements.labels(result="loaded" if changed else "unchanged").inc()

    async def follow_model_announcements(self) -> None:
        """Serve every version announced on the store's models channel (a background task, until
        cancelled). After each (re)subscription the store's current version is served if it is not
        already: an announcement made while not subscribed is not lost."""
        while True:
            try:
                async with self.store.model_announcements() as versions:
                    current = await asyncio.to_thread(ModelStore(self.settings.store).current_version)
                    if current is not None and current != self.policies.current.version:
                        await self._announced(current)
                    async for version in versions:
                        await self._announced(version)
            except StateStoreError as exc:
                log.warning("model announcements unavailable, subscribing again", extra={"error": str(exc)})
            await asyncio.sleep(RESUBSCRIBE_S)
