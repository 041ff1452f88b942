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
        """Verify and serve `version` (default: the model store's current one) with its active calibration:
        (previous, new). Raises PolicyRejected, the incumbent serving on."""
        previous, current = await self.policies.reload(version)
        if served(previous) != served(current):
            self.metrics.set_model(served(previous), served(current))
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
        changed = served(previous) != served(current)
        self.metrics.model_announcements.labels(result="loaded" if changed else "unchanged").inc()

    def _store_serves(self) -> tuple[str | None, str | None]:
        """The model store's current version and that version's active calibration."""
        store = ModelStore(self.settings.store)
        current = store.current_version()
        return current, None if current is None else store.calibrations.active_id(current)

    async def follow_model_announcements(self) -> None:
        """Serve every version announced on the store's models channel, with its active calibration (a
        background task, until cancelled). After each (re)subscription the store's current version and
        calibration are served if they are not already: an announcement made while not subscribed is not
        lost."""
        while True:
            try:
                async with self.store.model_announcements() as versions:
                    current, calibration = await asyncio.to_thread(self._store_serves)
                    if current is not None and (current, calibration) != served(self.policies.current):
                        await self._announced(current)
                    async for version in versions:
                        await self._announced(version)
            except (OSError, ValueError) as exc:
                log.warning("the model store is unreadable, subscribing again", extra={"error": str(exc)})
            except StateStoreError as exc:
                log.warning("model announcements unavailable, subscribing again", extra={"error": str(exc)})
            await asyncio.sleep(RESUBSCRIBE_S)


def served(policy: LoadedPolicy) -> tuple[str, str | None]:
    """What a policy serves: its version and calibration (a reload that changes neither changes nothing)."""
    return policy.version, policy.calibration_id
