"""The Redis state store: one Lua script per ledger operation, so every one is atomic.

Key layout (P = configured prefix, T = the campaign's hash tag ``{c:<campaign_id>}``)::

    P T:campaign          hash: budget, spent, reserved, overrun (cents), coupons (JSON), lambda, users,
                          model_version, decisions
    P T:config            string "budget\tlambda\tusers\tcoupons": what a decision reads of the campaign,
                          written with the hash by upsert_campaign.lua (fetched in the contexts' MGET)
    P T:pending           zset: what may hold reservations, scored by release deadline (ms): "b-<batch>" for a
                          batch's records, a decision id for a record of its own; the sweep releases what
                          is still reserved in it (settled records are skipped)
    P T:b:<batch>         hash: field i is the record of decision "d-<batch>-<i>" (the ids the engine issues:
                          one HSET per batch, TTL = decision TTL)
    P T:d:<decision_id>   string: the record of a decision whose id is not a batch id (records of earlier
                          releases, callers' own ids)
                          A record is tab-separated: status (R reserved, S settled,
                          X expired), reserved cents, action, probability, decided at ms, model version,
                          lambda, reward and cost (empty until settled), length of the request id, request id,
                          user id; `parse_decision_record` reads it
    P T:r:<request_id>    string: the decision record returned again for a repeated request_id
    P ctx:<campaign>:<user>  string: the user's context in the binary format of service.state.context;
                          no hash tag, so contexts spread freely
    P campaigns           set of campaign ids (for the periodic sweep)

Every key a ledger script touches shares the campaign's hash tag, so those scripts are Redis Cluster
safe. The context scripts handle each of their keys on its own: any subset of keys can go in one call
(one call per slot on a Cluster); the store sends a request's users in one call.

Commands go over one multiplexed connection (service.state.resp), which speaks bytes (contexts are
binary); text fields are decoded where they are read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import operator
import re
from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson

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
from service.state.context import HEADER, append_steps_to, empty_context, encode_decision_id
from service.state.resp import ReplyError, RespConnection

T = TypeVar("T")
BATCH_INDEX = re.compile(r"[0-9]{1,5}")  # a decision's index within its batch
BATCH_DECISION_ID = re.compile(rf"d-([0-9a-f]{{20}})-({BATCH_INDEX.pattern})")  # see service.engine.new_decision_ids
BATCH_MEMBER = re.compile(r"b-([0-9a-f]{20})")  # a batch's pending entry (sweep.lua tells it the same way)
log = logging.getLogger("saco.service.state")
LUA_DIR = Path(__file__).resolve().parents[1] / "lua"
SCRIPT_NAMES = ("upsert_campaign", "reserve", "settle", "sweep", "append_steps", "apply_outcomes")


class _Script:
    def __init__(self, name: str) -> None:
        self.name = name
        self.source = (LUA_DIR / f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


_KEY_AND_MEMBER = operator.itemgetter(0, 2)  # of a decision location (key, field, pending member)


def _record_tail(request_id: str | None, user_id: str) -> str:
    """The end of a decision record: byte length of the request id (the scripts count bytes), request id,
    user id."""
    if request_id is None:
        return "0\t\t" + user_id
    return f"{len(request_id.encode())}\t{request_id}\t{user_id}"


def _replayed(record: bytes) -> ReservedDecision:
    """An earlier decision returned again for a repeated request id (its request record, reserve.lua)."""
    decision_id, action, cost, version, lam, user_id = record.decode().split("\t", 5)
    return ReservedDecision(decision_id, user_id, int(action), int(cost), version, float(lam), False)


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


DECISION_FIELDS = (
    "status",
    "reserved",
    "action",
    "probability",
    "decided_at_ms",
    "model_version",
    "lambda",
    "reward",
    "cost",
)


def parse_decision_record(raw: bytes) -> dict[str, str]:
    """A decision record as reserve.lua, settle.lua and sweep.lua write it (for tests, tools, debugging)."""
    *fixed, request_length, free_text = raw.split(b"\t", len(DECISION_FIELDS) + 1)
    record = {name: value.decode() for name, value in zip(DECISION_FIELDS, fixed, strict=True)}
    length = int(request_length)  # in bytes, as the scripts count it
    record["request_id"], record["user_id"] = free_text[:length].decode(), free_text[length + 1 :].decode()
    return record


@lru_cache(maxsize=1024)
def _parse_config(campaign_id: str, raw: bytes) -> CampaignConfig:
    """Cached: the same string comes back on every decision until an admin changes the campaign."""
    budget, lam, users, coupons = raw.decode().split("\t", 3)
    return CampaignConfig(
        campaign_id=campaign_id,
        budget=int(budget),
        coupons={int(a): int(c) for a, c in json.loads(coupons).items()},
        admin_lambda=float(lam) if lam else None,
        expected_users=int(users) if users else None,
    )


def _parse_campaign(campaign_id: str, flat: Sequence[bytes]) -> CampaignState | None:
    """A campaign hash as HGETALL (or upsert_campaign.lua) returns it: field, value, field, value..."""
    fields = {_text(k): _text(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
    if not fields:
        return None
    return CampaignState(
        campaign_id=campaign_id,
        budget=int(fields["budget"]),
        spent=int(fields["spent"]),
        reserved=int(fields["reserved"]),
        coupons={int(a): int(c) for a, c in json.loads(fields["coupons"]).items()},
        admin_lambda=float(fields["lambda"]) if fields.get("lambda") else None,
        expected_users=int(fields["users"]) if fields.get("users") else None,
        model_version=fields.get("model_version") or None,
        decisions=int(fields.get("decisions", 0)),
        overrun=int(fields.get("overrun", 0)),
    )


class RedisStateStore(StateStore):
    def __init__(self, url: str, *, prefix: str = "saco:", socket_timeout_s: float = 0.5) -> None:
        self.prefix = prefix
        self.redis = RespConnection.from_url(url, timeout_s=socket_timeout_s)
        self.scripts = {name: _Script(name) for name in SCRIPT_NAMES}

    # ---- keys ------------------------------------------------------------------------------------
    def _tag(self, campaign_id: str) -> str:
        return f"{self.prefix}{{c:{campaign_id}}}"

    def campaign_key(self, campaign_id: str) -> str:
        return self._tag(campaign_id) + ":campaign"

    def config_key(self, campaign_id: str) -> str:
        return self._tag(campaign_id) + ":config"

    def pending_key(self, campaign_id: str) -> str:
        return self._tag(campaign_id) + ":pending"

    def decision_key(self, campaign_id: str, decision_id: str) -> str:
        return f"{self._tag(campaign_id)}:d:{decision_id}"

    def batch_key(self, campaign_id: str, batch: str) -> str:
        return f"{self._tag(campaign_id)}:b:{batch}"

    def decision_location(self, campaign_id: str, decision_id: str) -> tuple[str, str, str]:
        """Where a decision's record lives: (key, field, pending member). A batch id ("d-<batch>-<i>", as
        the engine issues them) is field i of its batch's hash, pending as "b-<batch>"; any other id is
        a string key of its own (ids of earlier releases, callers' own ids), pending as itself."""
        batch = BATCH_DECISION_ID.fullmatch(decision_id)
        if batch is None:
            return self.decision_key(campaign_id, decision_id), "", decision_id
        return self.batch_key(campaign_id, batch[1]), batch[2], "b-" + batch[1]

    def decision_locations(self, campaign_id: str, decision_ids: list[str]) -> list[tuple[str, str, str]]:
        """`decision_location` of each id; a batch's key and pending member are worked out once (128 ids of
        one batch: ~130 -> ~30 us)."""
        batches: dict[str, tuple[str, str]] = {}  # "d-<batch>" -> (its hash's key, its pending member)
        locations = []
        for decision_id in decision_ids:
            head, _, index = decision_id.rpartition("-")
            known = batches.get(head)
            if known is not None and BATCH_INDEX.fullmatch(index):
                locations.append((known[0], index, known[1]))
                continue
            location = self.decision_location(campaign_id, decision_id)
            if location[1]:
                batches[head] = location[0], location[2]
            locations.append(location)
        return locations

    def request_key(self, campaign_id: str, request_id: str) -> str:
        return f"{self._tag(campaign_id)}:r:{request_id}"

    def context_key(self, campaign_id: str, user_id: str) -> str:
        return f"{self.prefix}ctx:{campaign_id}:{user_id}"

    @property
    def campaigns_key(self) -> str:
        return f"{self.prefix}campaigns"

    # ---- plumbing --------------------------------------------------------------------------------
    async def _guard(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except (ReplyError, OSError, TimeoutError) as exc:  # ConnectionError is an OSError
            raise StateStoreError(f"state store unavailable: {type(exc).__name__}: {exc}") from exc

    async def _call(self, *args: Any) -> Any:
        return await self._guard(lambda: self.redis.execute(*args))

    async def load_scripts(self) -> None:
        await self._guard(lambda: self.redis.pipeline(*(("SCRIPT", "LOAD", s.source) for s in self.scripts.values())))

    async def _eval(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        script = self.scripts[name]

        async def call() -> Any:
            try:
                return await self.redis.execute("EVALSHA", script.sha, len(keys), *keys, *args)
            except ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                await self.redis.execute("SCRIPT", "LOAD", script.source)  # e.g. after a restart or SCRIPT FLUSH
                return await self.redis.execute("EVALSHA", script.sha, len(keys), *keys, *args)

        return await self._guard(call)

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.execute("PING"))
        except (ReplyError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.redis.close()

    # ---- campaigns -------------------------------------------------------------------------------
    async def upsert_campaign(self, campaign_id: str, update: CampaignUpdate) -> CampaignState:
        def optional(value: Any, clear: bool) -> str:
            return "-" if clear else ("" if value is None else repr(value))

        args = [
            "1" if update.replace else "0",
            "" if update.budget is None else str(update.budget),
            "" if update.coupons is None else json.dumps({str(a): c for a, c in sorted(update.coupons.items())}),
            optional(update.admin_lambda, update.clear_lambda and update.admin_lambda is None),
            optional(update.expected_users, update.clear_expected_users and update.expected_users is None),
            campaign_id,
        ]
        flat = await self._eval("upsert_campaign", [self.campaign_key(campaign_id), self.config_key(campaign_id)], args)
        if flat is None:
            raise CampaignNotFound(campaign_id)
        await self._call("SADD", self.campaigns_key, campaign_id)
        state = _parse_campaign(campaign_id, flat)
        assert state is not None
        return state

    async def get_campaign(self, campaign_id: str) -> CampaignState | None:
        return _parse_campaign(campaign_id, await self._call("HGETALL", self.campaign_key(campaign_id)))

    async def campaign_ids(self) -> list[str]:
        return sorted(_text(m) for m in await self._call("SMEMBERS", self.campaigns_key))

    # ---- decisions -------------------------------------------------------------------------------
    async def load_for_decision(
        self, campaign_id: str, user_ids: list[str]
    ) -> tuple[CampaignConfig | None, list[UserContext | None]]:
        keys = [self.config_key(campaign_id)] + [self.context_key(campaign_id, user_id) for user_id in user_ids]
        config, *contexts = cast(list[bytes | None], await self._call("MGET", *keys))
        if config is None:  # a campaign written before the config key existed, or none
            state = await self.get_campaign(campaign_id)
            return (None, []) if state is None else (state.config, contexts)
        return _parse_config(campaign_id, config), contexts

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
        keys = [self.campaign_key(campaign_id), self.pending_key(campaign_id)]
        locations = self.decision_locations(campaign_id, [item.decision_id for item in items])
        # runs of consecutive items that share a record key and a pending member (a batch is one run); the
        # per-item columns are built by comprehensions (one loop doing all of it: 128 items ~520 -> ~400 us)
        record_keys: dict[str, int] = {}  # a batch's hash once, however many of its decisions
        groups: list[tuple[int, int, int, str]] = []  # first, last (1-based), record key index, member
        last = 0
        for (key, member), run in itertools.groupby(locations, _KEY_AND_MEMBER):
            first, last = last + 1, last + sum(1 for _ in run)
            if key not in record_keys:
                keys.append(key)
                record_keys[key] = len(keys)
            groups.append((first, last, record_keys[key], member))
        orderings: dict[tuple[int, ...], int] = {}  # distinct preference lists: a batch has a handful
        ordering = [orderings.setdefault(tuple(item.preferences), len(orderings) + 1) for item in items]
        requests = []
        for position, item in enumerate(items, 1):
            if item.request_id is not None:
                keys.append(self.request_key(campaign_id, item.request_id))
                requests.append((position, len(keys), item.decision_id, item.user_id))
        columns = {
            "orderings": list(orderings),
            "ordering": ordering,
            "tails": [_record_tail(item.request_id, item.user_id) for item in items],
            "fields": [field for _, field, _ in locations],
            "groups": groups,
            "requests": requests,
        }
        args = [now_ms, reservation_expiry_ms, decision_ttl_ms, model_version, repr(lam), orjson.dumps(columns)]
        reply = await self._eval("reserve", keys, args)
        if reply[0] == b"missing":
            raise CampaignNotFound(campaign_id)
        end = 3 * len(items) + 1
        replays = iter(reply[end:])  # the earlier decisions of repeated request ids (flag 0), in item order
        decisions = [
            ReservedDecision(item.decision_id, item.user_id, action, cost, model_version, lam, True, flag == 2)
            if flag
            else _replayed(next(replays))
            for item, action, cost, flag in zip(items, reply[1:end:3], reply[2:end:3], reply[3:end:3], strict=True)
        ]
        return ReserveResult(decisions, int(reply[0]))

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
        keys = [self.context_key(campaign_id, s.user_id) for s in steps]
        encoded = [s.encoded() for s in steps]
        # the value each context becomes if it is still as the decision read it (checked by its header in
        # the script): Redis then stores it as is instead of rebuilding it in Lua (~3x less Redis CPU)
        seen = [b"" if s.read is None else s.read[: HEADER.size] for s in steps]
        appended = append_steps_to([s.read for s in steps], encoded, capacity, initial)
        await self._eval("append_steps", keys, [capacity, ttl_ms, initial, b"".join(encoded), *seen, *appended])

    # ---- outcomes --------------------------------------------------------------------------------
    async def settle(self, campaign_id: str, outcomes: list[Outcome]) -> SettleResult:
        keys = [self.campaign_key(campaign_id), self.pending_key(campaign_id)]
        args: list[Any] = []
        locations = self.decision_locations(campaign_id, [outcome.decision_id for outcome in outcomes])
        for outcome, (key, field, _) in zip(outcomes, locations, strict=True):
            keys.append(key)
            args += [outcome.cost, repr(float(outcome.reward)), field]
        reply = await self._eval("settle", keys, args)
        if reply[0] == b"missing":
            raise CampaignNotFound(campaign_id)
        if reply[0] == b"too_high":
            index = int(reply[1])
            raise CostAboveReservation(index, outcomes[index].cost, int(reply[2]))
        result = SettleResult(remaining=int(reply[0]))
        for outcome, code, user_id in zip(outcomes, reply[1::2], reply[2::2], strict=True):
            if code == b"A":
                result.accepted += 1
                result.context_updates.append((user_id.decode(), outcome.decision_id, outcome.reward, outcome.cost))
            elif code == b"D":
                result.duplicates += 1
            else:
                result.unknown += 1
        return result

    async def apply_outcomes_to_contexts(
        self, campaign_id: str, updates: list[tuple[str, str, float, int]], *, ttl_ms: int
    ) -> None:
        if not updates:
            return
        keys = [self.context_key(campaign_id, user_id) for user_id, *_ in updates]
        args: list[Any] = [ttl_ms]
        for _, decision_id, reward, cost in updates:
            args += [encode_decision_id(decision_id), repr(float(reward)), repr(cost / 100)]
        await self._eval("apply_outcomes", keys, args)

    async def sweep_expired(self, campaign_id: str, now_ms: int, limit: int = 1000) -> int:
        """Up to `limit` due pending entries, 16 per script call: a batch's entry holds up to max_batch
        records, and no single call should hold Redis for long."""
        pending, released, taken = self.pending_key(campaign_id), 0, 0
        while taken < limit:
            chunk = min(16, limit - taken)
            due = [_text(m) for m in await self._call("ZRANGEBYSCORE", pending, "-inf", now_ms, "LIMIT", 0, chunk)]
            if not due:
                break
            keys = [self.campaign_key(campaign_id), pending]
            keys += [
                self.batch_key(campaign_id, m[2:]) if BATCH_MEMBER.fullmatch(m) else self.decision_key(campaign_id, m)
                for m in due
            ]
            released += int(await self._eval("sweep", keys, [now_ms, *due]))
            taken += len(due)
            if len(due) < chunk:
                break
        return released
