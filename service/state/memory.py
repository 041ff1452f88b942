"""The embedded state store: the same semantics as the Redis one, in process, under one asyncio lock.

The default when no Redis URL is configured (a single service process). Expiry is emulated with
deadlines checked on access and purged by the sweep.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Generic, NamedTuple, TypeVar

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
    UserContext,
)
from service.state.context import append_steps_to, apply_outcome, empty_context

RESERVED, SETTLED, EXPIRED = "R", "S", "X"
V = TypeVar("V")


def _now_ms() -> int:
    return int(time.time() * 1000)


class _DecisionRecord(NamedTuple):
    user_id: str
    action: int
    probability: float
    reserved: int
    status: str
    model_version: str
    lam: float
    expires_ms: int
    reward: float | None = None
    cost: int | None = None


class _ExpiringTable(Generic[V]):
    """key -> atomic value (see _DecisionTable), each entry expiring at `expiry(value)` ms.

    Entries are kept in insertion order, and while each new entry expires no earlier than the one added before
    it (the service writes every kind with one TTL per process) that is expiry order: `due` then stops at the
    first live entry, O(due) instead of a pass over the table under the store's lock (0.23 s to rebuild
    400,000 decision records; ~29 ms to scan as many pending reservations). An entry that breaks the order
    makes the next `due` sort the table once, which restores it: exact whatever the expiries."""

    def __init__(self, expiry: Callable[[V], int]) -> None:
        self.rows: dict[str, V] = {}
        self._expiry = expiry
        self._latest: int | None = None  # the expiry of the newest entry while in order
        self._ordered = True

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: str) -> V | None:
        return self.rows.get(key)

    def pop(self, key: str) -> V | None:
        return self.rows.pop(key, None)

    def set(self, key: str, value: V) -> None:
        """Add or replace an entry: a replacement with the same expiry keeps its place, any other goes last."""
        expires = self._expiry(value)
        old = self.rows.get(key)
        if old is not None:
            if self._expiry(old) == expires:
                self.rows[key] = value
                return
            del self.rows[key]
        self.rows[key] = value
        if self._latest is not None and expires < self._latest:
            self._ordered = False
        else:
            self._latest = expires

    def due(self, now_ms: int, limit: int | None = None) -> list[str]:
        """The keys of the entries expired at `now_ms`, earliest first (at most `limit`)."""
        if not self._ordered:
            self.rows = dict(sorted(self.rows.items(), key=lambda entry: self._expiry(entry[1])))
            self._ordered = True
            self._latest = self._expiry(next(reversed(self.rows.values()))) if self.rows else None
        keys: list[str] = []
        for key, value in self.rows.items():
            if len(keys) == limit or self._expiry(value) > now_ms:
                break
            keys.append(key)
        return keys

    def drop_due(self, now_ms: int) -> None:
        for key in self.due(now_ms):
            del self.rows[key]


class _DecisionTable:
    """decision id -> record, each packed into one `bytes` value.

    Why bytes: the cyclic GC walks every entry of a tracked dict in each pass over the generation the dict is
    in, and CPython re-tracks an untracked dict whenever a tracked object (any new tuple) is stored in it.
    With tuple records the table, 400,000 decisions in, cost 16 ms per pass, three passes (young, middle,
    full) every ~170 128-user requests, a p99 that grew with the store's age. A dict of str -> bytes is never
    re-tracked once a full pass has untracked it, so the collector never walks it. Model versions are kept
    as indices into `_versions` (a handful per process)."""

    # expires ms (first: the sweep reads only it), action, probability, reserved cents, status, model version
    # index, lambda, has outcome, reward, cost cents; then the user id (UTF-8)
    _FIXED = struct.Struct("<qidqcId?dq")
    _EXPIRES = struct.Struct("<q")

    def __init__(self) -> None:
        self._rows = _ExpiringTable[bytes](lambda row: _DecisionTable._EXPIRES.unpack_from(row)[0])
        self._versions: list[str] = []
        self._version_index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, decision_id: str) -> _DecisionRecord | None:
        row = self._rows.get(decision_id)
        if row is None:
            return None
        expires, action, probability, reserved, status, version, lam, settled, reward, cost = self._FIXED.unpack_from(
            row
        )
        user_id = row[self._FIXED.size :].decode("utf-8", "surrogatepass")
        model_version = self._versions[version]
        if settled:
            return _DecisionRecord(
                user_id, action, probability, reserved, status.decode(), model_version, lam, expires, reward, cost
            )
        return _DecisionRecord(user_id, action, probability, reserved, status.decode(), model_version, lam, expires)

    def put(self, decision_id: str, record: _DecisionRecord) -> None:
        version = self._version_index.get(record.model_version)
        if version is None:
            version = self._version_index[record.model_version] = len(self._versions)
            self._versions.append(record.model_version)
        settled = record.reward is not None
        self._rows.set(
            decision_id,
            self._FIXED.pack(
                record.expires_ms,
                record.action,
                record.probability,
                record.reserved,
                record.status.encode(),
                version,
                record.lam,
                settled,
                record.reward if settled else 0.0,
                record.cost or 0,
            )
            + record.user_id.encode("utf-8", "surrogatepass"),
        )

    def drop_expired(self, now_ms: int) -> None:
        self._rows.drop_due(now_ms)


def _request_record(value: str) -> tuple[int, str]:
    """(expiry ms, decision id) of a request record "<expiry ms> <decision id>"."""
    expires, _, decision_id = value.partition(" ")
    return int(expires), decision_id


def _context_key(campaign_id: str, user_id: str) -> str:
    return f"{campaign_id}\t{user_id}"  # campaign ids have no tabs


@dataclass
class _Campaign:
    state: CampaignState
    decisions: _DecisionTable = field(default_factory=_DecisionTable)
    # request_id -> "<expiry ms> <decision id>" (a str, not a tuple: see _DecisionTable)
    requests: _ExpiringTable[str] = field(default_factory=lambda: _ExpiringTable(lambda v: _request_record(v)[0]))
    # decision_id -> release deadline (ms)
    pending: _ExpiringTable[int] = field(default_factory=lambda: _ExpiringTable(int))


class MemoryStateStore(StateStore):
    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._campaigns: dict[str, _Campaign] = {}
        # _context_key -> context, and -> its expiry in ms: atomic keys and values only, which the cyclic GC
        # stops walking (see _DecisionTable)
        self._contexts: dict[str, UserContext] = {}
        self._context_expiry: dict[str, int] = {}

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    # ---- campaigns -------------------------------------------------------------------------------
    async def upsert_campaign(self, campaign_id: str, update: CampaignUpdate) -> CampaignState:
        async with self._lock:
            current = self._campaigns.get(campaign_id)
            if current is None:
                if not update.replace:
                    raise CampaignNotFound(campaign_id)
                state = CampaignState(campaign_id, 0, 0, 0, {}, None, None, None, 0, 0)
                current = self._campaigns[campaign_id] = _Campaign(state)
            state = current.state
            if update.replace:
                state = replace(state, admin_lambda=None, expected_users=None)
            if update.budget is not None:
                state = replace(state, budget=update.budget)
            if update.coupons is not None:
                state = replace(state, coupons=dict(update.coupons))
            if update.admin_lambda is not None:
                state = replace(state, admin_lambda=update.admin_lambda)
            elif update.clear_lambda:
                state = replace(state, admin_lambda=None)
            if update.expected_users is not None:
                state = replace(state, expected_users=update.expected_users)
            elif update.clear_expected_users:
                state = replace(state, expected_users=None)
            current.state = state
            return state

    async def get_campaign(self, campaign_id: str) -> CampaignState | None:
        campaign = self._campaigns.get(campaign_id)
        return campaign.state if campaign else None

    async def campaign_ids(self) -> list[str]:
        return list(self._campaigns)

    # ---- decisions -------------------------------------------------------------------------------
    async def load_for_decision(
        self, campaign_id: str, user_ids: list[str]
    ) -> tuple[CampaignConfig | None, list[UserContext | None]]:
        campaign = self._campaigns.get(campaign_id)
        if campaign is None:
            return None, []
        now = _now_ms()
        contexts: list[UserContext | None] = []
        expiry = self._context_expiry
        for user_id in user_ids:
            key = _context_key(campaign_id, user_id)
            contexts.append(self._contexts.get(key) if expiry.get(key, 0) > now else None)
        return campaign.state.config, contexts

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
        async with self._lock:
            campaign = self._campaigns.get(campaign_id)
            if campaign is None:
                raise CampaignNotFound(campaign_id)
            state = campaign.state
            available = state.budget - state.spent - state.reserved
            new_reserved = 0
            new_count = 0
            out: list[ReservedDecision] = []
            for item in items:
                if item.request_id is not None:
                    request = campaign.requests.get(item.request_id)
                    known = None if request is None else _request_record(request)
                    record = campaign.decisions.get(known[1]) if known is not None and known[0] > now_ms else None
                    if known is not None and record is not None:
                        out.append(
                            ReservedDecision(
                                known[1],
                                record.user_id,
                                record.action,
                                record.reserved,
                                record.model_version,
                                record.lam,
                                new=False,
                            )
                        )
                        continue
                action, cost = 0, 0
                for candidate in item.preferences:
                    if candidate == 0:
                        break
                    price = state.coupons.get(candidate)
                    if price is not None and price <= available - new_reserved:
                        action, cost = candidate, price
                        break
                downgraded = bool(item.preferences) and item.preferences[0] != 0 and action != item.preferences[0]
                new_reserved += cost
                new_count += 1
                campaign.decisions.put(
                    item.decision_id,
                    _DecisionRecord(
                        item.user_id, action, 1.0, cost, RESERVED, model_version, lam, now_ms + decision_ttl_ms
                    ),
                )
                if cost > 0:
                    campaign.pending.set(item.decision_id, now_ms + reservation_expiry_ms)
                if item.request_id is not None:
                    campaign.requests.set(item.request_id, f"{now_ms + decision_ttl_ms} {item.decision_id}")
                out.append(
                    ReservedDecision(
                        item.decision_id,
                        item.user_id,
                        action,
                        cost,
                        model_version,
                        lam,
                        new=True,
                        downgraded=downgraded,
                    )
                )
            state = replace(
                state,
                reserved=state.reserved + new_reserved,
                decisions=state.decisions + new_count,
                model_version=model_version if new_count else state.model_version,
            )
            campaign.state = state
            return ReserveResult(out, state.budget - state.spent - state.reserved)

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
        if not steps:
            return
        initial = empty_context(len(steps[0].features) // 4, initial_rtg, initial_ctg)
        async with self._lock:
            now = _now_ms()
            if len({step.user_id for step in steps}) < len(steps):  # a user twice: each append sees the last
                for step in steps:
                    self._append(campaign_id, [step], capacity, ttl_ms, initial, now)
            else:
                self._append(campaign_id, steps, capacity, ttl_ms, initial, now)

    def _append(
        self, campaign_id: str, steps: list[NewStep], capacity: int, ttl_ms: int, initial: bytes, now: int
    ) -> None:
        keys = [_context_key(campaign_id, step.user_id) for step in steps]
        expiry = self._context_expiry
        current = [self._contexts.get(key) if expiry.get(key, 0) > now else None for key in keys]
        appended = append_steps_to(current, [step.encoded() for step in steps], capacity, initial)
        expires = now + ttl_ms
        for key, value in zip(keys, appended, strict=True):
            self._contexts[key] = value
            expiry[key] = expires

    # ---- outcomes --------------------------------------------------------------------------------
    async def settle(self, campaign_id: str, outcomes: list[Outcome]) -> SettleResult:
        async with self._lock:
            campaign = self._campaigns.get(campaign_id)
            if campaign is None:
                raise CampaignNotFound(campaign_id)
            now = _now_ms()

            def live(decision_id: str) -> _DecisionRecord | None:
                record = campaign.decisions.get(decision_id)
                return record if record is not None and record.expires_ms > now else None

            for index, outcome in enumerate(outcomes):
                record = live(outcome.decision_id)
                if record is not None and record.status != SETTLED and outcome.cost > record.reserved:
                    raise CostAboveReservation(index, outcome.cost, record.reserved)
            result = SettleResult()
            state = campaign.state
            for outcome in outcomes:
                record = live(outcome.decision_id)
                if record is None:
                    result.unknown += 1
                    continue
                if record.status == SETTLED:
                    result.duplicates += 1
                    continue
                if record.status == RESERVED:
                    state = replace(state, reserved=state.reserved - record.reserved, spent=state.spent + outcome.cost)
                    campaign.pending.pop(outcome.decision_id)
                else:  # the reservation expired and was released: charge what still fits
                    fits = max(0, min(outcome.cost, state.budget - state.spent - state.reserved))
                    state = replace(state, spent=state.spent + fits, overrun=state.overrun + outcome.cost - fits)
                campaign.decisions.put(
                    outcome.decision_id, record._replace(status=SETTLED, reward=outcome.reward, cost=outcome.cost)
                )
                result.accepted += 1
                result.context_updates.append((record.user_id, outcome.decision_id, outcome.reward, outcome.cost))
            campaign.state = state
            result.remaining = state.budget - state.spent - state.reserved
            return result

    async def apply_outcomes_to_contexts(
        self, campaign_id: str, updates: list[tuple[str, str, float, int]], *, ttl_ms: int
    ) -> None:
        async with self._lock:
            now = _now_ms()
            for user_id, decision_id, reward, cost in updates:
                key = _context_key(campaign_id, user_id)
                if self._context_expiry.get(key, 0) <= now:
                    continue
                updated = apply_outcome(self._contexts[key], decision_id, reward, cost / 100)
                if updated is not None:
                    self._contexts[key] = updated
                    self._context_expiry[key] = now + ttl_ms

    async def sweep_expired(self, campaign_id: str, now_ms: int, limit: int = 1000) -> int:
        async with self._lock:
            campaign = self._campaigns.get(campaign_id)
            if campaign is None:
                return 0
            released = 0
            state = campaign.state
            for decision_id in campaign.pending.due(now_ms, limit):
                campaign.pending.pop(decision_id)
                record = campaign.decisions.get(decision_id)
                if record is not None and record.status == RESERVED:
                    campaign.decisions.put(decision_id, record._replace(status=EXPIRED))
                    state = replace(state, reserved=state.reserved - record.reserved)
                    released += 1
            campaign.state = state
            # expire old records the way Redis TTLs would
            campaign.decisions.drop_expired(now_ms)
            campaign.requests.drop_due(now_ms)
            # a context's expiry moves on each write (its place does not): scanned whole, deleted in place
            for key in [key for key, expires in self._context_expiry.items() if expires <= now_ms]:
                del self._context_expiry[key], self._contexts[key]
            return released
