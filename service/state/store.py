"""The state store: Redis (standalone or Cluster) through redis-py's asyncio client.

Every ledger rule (reserve, settle, expire, campaign upsert) is one Lua script in service/lua/, so each
is atomic and exists once; the user-context rules (append a step, apply an outcome) live once in
`service.state.context`, and the `write_contexts` script stores their results compare-and-set.

The key and channel names are contract/keys.py's.

Decision ids are made here: "d-<batch>-<i>", the batch 80 random bits (collisions are not a concern at any
realistic volume), i the position in the batch; a batch's records are one hash written by one HSET.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError

from contract.catalog import Catalog
from contract.keys import LOG_GROUP, Keys
from contract.money import rounded_cents
from service.state.context import HEADER, apply_outcome, empty_context, new_steps
from service.state.context import append_steps as append_context_steps
from service.state.types import (
    OPTIONAL_SETTINGS,
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
    ReserveItem,
    ReserveResult,
    SettleResult,
    StateStoreError,
    UserContext,
)

T = TypeVar("T")
Client = aioredis.Redis | RedisCluster
LUA_DIR = Path(__file__).resolve().parents[1] / "lua"
DECISION_ID = re.compile(r"d-([0-9a-f]{20})-([0-9]{1,5})")
LOGGING_SCRIPTS = ("reserve", "settle")  # the scripts that write the decision log (service/lua/log.lua)
CAS_ATTEMPTS = 32  # a context changed by another writer between read and write is redone, at most this often


class Script:
    """A Lua script of service/lua, called by its SHA1 and loaded on the node that lacks it."""

    def __init__(self, name: str) -> None:
        self.source = (LUA_DIR / f"{name}.lua").read_text()
        if name in LOGGING_SCRIPTS:  # the one definition of log_add, as a local of the script
            self.source = (LUA_DIR / "log.lua").read_text() + self.source
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, client: Client, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or flushed server, or a Cluster node that never ran it
            return await client.eval(self.source, len(keys), *keys, *args)


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def _coupons(raw: bytes | str) -> list[tuple[int, int]]:
    """A decision's coupons as reserve.lua answers them: "coupon=cents" pairs, ','-separated."""
    text = _text(raw)
    return [(int(a), int(c)) for a, _, c in (pair.partition("=") for pair in text.split(","))] if text else []


def _record_tail(request_id: str | None, user_id: str) -> str:
    """The end of a decision record: byte length of the request id (the scripts count bytes), request id,
    user id."""
    if request_id is None:
        return "0\t\t" + user_id
    return f"{len(request_id.encode())}\t{request_id}\t{user_id}"


DECISION_FIELDS = (
    "status",
    "reserved",
    "coupon_cost",
    "variance",
    "predicted",
    "action",
    "probability",
    "decided_at_ms",
    "model_version",
    "lambda",
    "reward",
    "cost",
)


def parse_decision_record(raw: bytes) -> dict[str, str]:
    """A decision record as reserve.lua, settle.lua and sweep.lua write it (for tests, tools, debugging); a
    catalog campaign's record has its coupons in `parts` (reserve.lua)."""
    *fixed, request_length, free_text = raw.split(b"\t", len(DECISION_FIELDS) + 1)
    record = {name: value.decode() for name, value in zip(DECISION_FIELDS, fixed, strict=True)}
    action, colon, parts = record["action"].partition(":")
    if colon:
        record["action"], record["parts"] = action, parts
    length = int(request_length)  # in bytes, as the scripts count it
    record["request_id"], record["user_id"] = free_text[:length].decode(), free_text[length + 1 :].decode()
    return record


def _optional(text: str, kind: Callable[[str], T]) -> T | None:
    return kind(text) if text else None


def _parse_settings(fields: dict[str, str]) -> CampaignSettings:
    """A campaign's settings from their stored text ('' = the default), as upsert_campaign.lua writes them."""
    return CampaignSettings(
        budget=int(fields["budget"]),
        coupons={int(a): int(c) for a, c in json.loads(fields["coupons"]).items()},
        admin_lambda=_optional(fields["admin_lambda"], float),
        expected_users=_optional(fields["expected_users"], int),
        reservation_mode=fields["reservation_mode"] or "strict",
        overspend_risk=_optional(fields["overspend_risk"], float) or 0.01,
        starts_ms=_optional(fields["starts_ms"], int),
        ends_ms=_optional(fields["ends_ms"], int),
        expected_decisions=_optional(fields["expected_decisions"], int),
        pacing=None if not fields["pacing"] else fields["pacing"] == "1",
        pacing_method=fields.get("pacing_method") or "resolve",
        exploration_rate=_optional(fields.get("exploration_rate") or "", float) or 0.0,
        holdout_rate=_optional(fields.get("holdout_rate") or "", float) or 0.0,
        min_redemption=_optional(fields.get("min_redemption") or "", float),
        catalog=_parse_catalog(fields.get("catalog") or ""),
    )


@lru_cache(maxsize=256)
def _parse_catalog(text: str) -> Catalog | None:
    return Catalog.from_json(text) if text else None


# the fields of a campaign's catalog, written together whenever its coupons are (a PUT without them resets
# them: a campaign without a catalog); `bundles` and `stock` are the tables reserve.lua reads
CATALOG_SETTINGS = ("catalog", "bundles", "stock")


def _settings_text(update: CampaignUpdate) -> dict[str, str]:
    """The settings an update writes, as upsert_campaign.lua stores them ('' = back to the default)."""
    text: dict[str, str] = {}
    if update.budget is not None:
        text["budget"] = str(update.budget)
    if update.coupons is not None:
        text["coupons"] = json.dumps({str(a): c for a, c in sorted(update.coupons.items())})
        catalog = update.catalog
        text["catalog"] = "" if catalog is None else catalog.to_json()
        text["bundles"] = "" if catalog is None else catalog.ledger_bundles()
        text["stock"] = "" if catalog is None or not catalog.stock else catalog.ledger_stock()
    for name in OPTIONAL_SETTINGS:
        value = getattr(update, name)
        if name in update.cleared:
            text[name] = ""
        elif isinstance(value, bool):
            text[name] = "1" if value else "0"
        elif value is not None:
            text[name] = repr(value) if isinstance(value, float) else str(value)
    return text


def _parse_paced(raw: bytes | None) -> PacedState | None:
    """The pacing key as pace.lua writes it (JSON)."""
    if raw is None:
        return None
    state = json.loads(raw)
    ratios = state["ratios"]
    return PacedState(
        float(state["lambda"]),
        None if state["allowance"] is None else float(state["allowance"]),
        {int(a): float(r) for a, r in (ratios.items() if isinstance(ratios, dict) else [])},
    )


@lru_cache(maxsize=1024)
def _parse_config(campaign_id: str, raw: bytes, paced: bytes | None) -> CampaignConfig:
    """Cached: the same strings come back on every decision until an admin or pacing changes them."""
    return CampaignConfig(campaign_id, _parse_settings(json.loads(raw)), _parse_paced(paced))


def _groups(fields: dict[str, str], name: str, decisions: int) -> Groups:
    """A group's counters (reserve.lua and settle.lua keep them; absent before its first)."""
    return Groups(
        decisions=decisions,
        settled=int(fields.get(f"{name}_settled") or 0),
        reward=int(fields.get(f"{name}_reward") or 0),
        cost=int(fields.get(f"{name}_cost") or 0),
    )


def _parse_campaign(
    campaign_id: str, raw: dict[Any, Any], paced: bytes | None, log_entries: int = 0
) -> CampaignState | None:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    if not fields:
        return None
    decisions, held_out = int(fields["decisions"]), int(fields.get("holdout_decisions") or 0)
    at_ms = _optional(fields["paced_at_ms"], int)
    pacing = Pacing(
        state=_parse_paced(paced),
        at_ms=at_ms,
        plan=int(fields["pace_plan"] or 0),
        actual=int(fields["pace_actual"] or 0),
    )
    return CampaignState(
        campaign_id=campaign_id,
        settings=_parse_settings(fields),
        spent=int(fields["spent"]),
        reserved=int(fields["reserved"]),
        model_version=fields["model_version"] or None,
        decisions=decisions,
        overrun=int(fields["overrun"]),
        pacing=pacing,
        explored=int(fields.get("explored_decisions") or 0),
        holdout=_groups(fields, "holdout", held_out),
        treated=_groups(fields, "treated", decisions - held_out),
        log_entries=log_entries,
        # a campaign that never kept outstanding_face reserved only in strict mode: at face value
        outstanding=int(fields["outstanding_face"]) if "outstanding_face" in fields else int(fields["reserved"]),
        log_lost=int(fields.get("log_lost") or 0),
        stock_used={int(name[5:]): int(value) for name, value in fields.items() if name.startswith("used:")},
    )


def connect(url: str, *, cluster: bool, timeout_s: float) -> Client:
    """A redis-py asyncio client of `url` (bytes in and out: contexts are binary). Its commands carry no
    socket timeout of their own: the store bounds each of its calls as a whole (`StateStore._guard`),
    which on Python 3.11 costs one timer per call instead of a task per command sent."""
    if cluster:
        return RedisCluster.from_url(url, socket_timeout=None, socket_connect_timeout=timeout_s)
    return aioredis.Redis.from_url(url, socket_timeout=None, socket_connect_timeout=timeout_s)


class StateStore:
    """Campaign ledgers, decision records and user contexts on one Redis or Redis Cluster.

    Every method is atomic with respect to the budget invariant `spent + reserved <= budget`. Whether
    the server is a Cluster is asked once, on first use (`cluster=None`), unless the caller says.
    `log_max_entries`: the approximate bound of each campaign's decision log (0: no log)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "saco:",
        cluster: bool | None = None,
        socket_timeout_s: float = 0.5,
        log_max_entries: int = 1_000_000,
    ) -> None:
        if log_max_entries < 0:
            raise ValueError(f"log_max_entries must be >= 0 (0 turns the decision log off), got {log_max_entries}")
        self.keys = Keys(prefix)
        self.url = url
        self.prefix = prefix
        self.cluster = cluster
        self.socket_timeout_s = socket_timeout_s
        self.log_max_entries = log_max_entries
        self._client: Client | None = None
        self._connecting = asyncio.Lock()
        names = ("upsert_campaign", "reserve", "settle", "sweep", "pace", "write_contexts", "clock")
        self.scripts = {name: Script(name) for name in names}

    # ---- connection ------------------------------------------------------------------------------
    async def client(self) -> Client:
        """The connected client; on first use, asks the server whether it is a Cluster (unless told)."""
        if self._client is not None:
            return self._client
        async with self._connecting:
            if self._client is None:
                cluster = self.cluster
                if cluster is None:
                    probe = connect(self.url, cluster=False, timeout_s=self.socket_timeout_s)
                    try:
                        info = await self._guard(lambda: probe.info("cluster"))
                    finally:
                        await probe.aclose()
                    cluster = bool(info.get("cluster_enabled"))
                self._client = connect(self.url, cluster=cluster, timeout_s=self.socket_timeout_s)
                self.cluster = cluster
        return self._client

    async def _guard(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` within the socket timeout; any failure of the server or the connection becomes a
        StateStoreError (a command cut short by the timeout drops its connection: redis-py disconnects it)."""
        try:
            async with asyncio.timeout(self.socket_timeout_s):
                return await call()
        except (RedisError, OSError, TimeoutError) as exc:  # ConnectionError is an OSError
            raise StateStoreError(f"state store unavailable: {type(exc).__name__}: {exc}") from exc

    async def _eval(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        client = await self.client()
        return await self._guard(lambda: self.scripts[name](client, keys, args))

    async def _eval_each(self, name: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """A script called once per (keys, args), each call's keys in one slot: a single call on a
        standalone server; on a Cluster one pipeline, which sends each node its calls in one round trip."""
        client = await self.client()
        if len(calls) == 1 or not isinstance(client, RedisCluster):
            return [await self._eval(name, keys, args) for keys, args in calls]
        script = self.scripts[name]

        async def pipelined() -> list[Any]:
            pipe = client.pipeline()
            for keys, args in calls:
                pipe.eval(script.source, len(keys), *keys, *args)  # EVAL: no NOSCRIPT to handle mid-pipeline
            return await pipe.execute()

        return await self._guard(pipelined)

    def _by_slot(self, indices: Sequence[int], keys: Sequence[str]) -> list[list[int]]:
        """`indices` grouped so that each group's keys share a Cluster slot (one group on a standalone)."""
        if not self.cluster:
            return [list(indices)]
        groups: dict[int, list[int]] = {}
        for i in indices:
            groups.setdefault(key_slot(keys[i].encode()), []).append(i)
        return list(groups.values())

    @contextlib.asynccontextmanager
    async def model_announcements(self) -> AsyncIterator[AsyncIterator[str]]:
        """Subscribed to the models channel: the versions announced on it from now on, as they come. A
        connection of its own (to the node the URL names: a Cluster passes every message to every node).
        A failed subscription or connection raises StateStoreError."""
        client = aioredis.Redis.from_url(self.url, socket_timeout=None, socket_connect_timeout=self.socket_timeout_s)
        pubsub = client.pubsub(ignore_subscribe_messages=True)

        async def versions() -> AsyncIterator[str]:
            try:
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        yield _text(message["data"])
            except (RedisError, OSError) as exc:
                raise StateStoreError(f"model announcements: {type(exc).__name__}: {exc}") from exc

        try:
            await self._guard(lambda: pubsub.subscribe(self.keys.models_channel))
            yield versions()
        finally:
            await pubsub.aclose()
            await client.aclose()

    async def ping(self) -> bool:
        """True when the store can serve: the server answers (on a Cluster: every slot is served)."""
        try:
            client = await self.client()
            if isinstance(client, RedisCluster):
                return bool((await client.cluster_info()).get("cluster_state") == "ok")
            return bool(await client.ping())
        except (StateStoreError, RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---- campaigns -------------------------------------------------------------------------------
    async def upsert_campaign(self, campaign_id: str, update: CampaignUpdate) -> CampaignState:
        """Create/replace (update.replace) or patch; patching an unknown campaign raises CampaignNotFound."""
        keys = [
            self.keys.campaign_key(campaign_id),
            self.keys.config_key(campaign_id),
            self.keys.pacing_key(campaign_id),
        ]
        args = [
            "1" if update.replace else "0",
            campaign_id,
            json.dumps(_settings_text(update)),
            ",".join(OPTIONAL_SETTINGS + CATALOG_SETTINGS),
        ]
        reply = await self._eval("upsert_campaign", keys, args)
        if reply is None:
            raise CampaignNotFound(campaign_id)
        flat, paced = reply
        client = await self.client()
        await self._guard(lambda: client.sadd(self.keys.campaigns_key, campaign_id))
        state = _parse_campaign(campaign_id, dict(zip(flat[::2], flat[1::2], strict=True)), paced or None)
        assert state is not None
        return state

    async def get_campaign(self, campaign_id: str) -> CampaignState | None:
        client = await self.client()
        fields = await self._guard(lambda: client.hgetall(self.keys.campaign_key(campaign_id)))
        paced = await self._guard(lambda: client.get(self.keys.pacing_key(campaign_id)))
        return _parse_campaign(campaign_id, fields, cast(bytes | None, paced), await self.log_length(campaign_id))

    async def pace(
        self,
        campaign_id: str,
        *,
        interval_ms: int,
        start_lambda: float,
        step: float,
        max_step: float,
        lambda_max: float,
        prior: int,
        prior_coupons: int = 0,
        step_share: float = 0.0,
        now_ms: int | None = None,
    ) -> tuple[float, int, int, bool] | None:
        """One pacing step (pace.lua), at most one per interval across every replica, or sooner once
        `step_share` of the plan's decisions or of the budget has gone since the last step: (lambda, plan
        cents, spend cents, whether it stepped); None for an unknown campaign. `prior`: cents at ratio 1 in
        the spend of outstanding reservations; `prior_coupons`: coupons of each action predicted right in the
        ratios of realised to predicted cost."""
        keys = [self.keys.campaign_key(campaign_id), self.keys.pacing_key(campaign_id)]
        clock = "" if now_ms is None else now_ms
        args = [clock, interval_ms, repr(start_lambda), repr(step), repr(max_step), repr(lambda_max)]
        args += [prior, prior_coupons, repr(float(step_share))]
        reply = await self._eval("pace", keys, args)
        if not reply:
            return None
        state = _parse_paced(reply[0] or None)
        lam = start_lambda if state is None else state.lam
        return lam, int(reply[1]), int(reply[2]), bool(reply[3])

    async def log_length(self, campaign_id: str) -> int:
        """Entries in the campaign's decision and outcome log."""
        client = await self.client()
        return int(await self._guard(lambda: client.xlen(self.keys.log_key(campaign_id))))

    async def log_status(self, campaign_id: str) -> LogStatus:
        """The campaign's log against its exporter: entries held, how many of them the group `export` has
        not read, how many were trimmed unread. The scripts keep the group's cursor past every entry they
        trim unread, so Redis's lag of the group is exact; should Redis not know it, every entry counts."""
        client = await self.client()
        key = self.keys.log_key(campaign_id)
        entries = int(await self._guard(lambda: client.xlen(key)))
        lag = entries
        if entries:
            groups = await self._guard(lambda: client.xinfo_groups(key))
            for group in cast(list[dict[str, Any]], groups):
                if _text(group["name"]) == LOG_GROUP and group.get("lag") is not None:
                    lag = min(entries, int(group["lag"]))
        lost = await self._guard(lambda: client.hget(self.keys.campaign_key(campaign_id), "log_lost"))
        return LogStatus(entries, lag, int(_text(cast(bytes | None, lost)) or 0))

    async def campaign_ids(self) -> list[str]:
        client = await self.client()
        members = await self._guard(lambda: client.smembers(self.keys.campaigns_key))
        return sorted(_text(cast(bytes, m)) for m in members)

    # ---- decisions -------------------------------------------------------------------------------
    async def _mget(self, keys: list[str]) -> list[bytes | None]:
        client = await self.client()
        if isinstance(client, RedisCluster):
            return cast(list[bytes | None], await self._guard(lambda: client.mget_nonatomic(keys)))
        return cast(list[bytes | None], await self._guard(lambda: client.mget(keys)))

    async def load_for_decision(
        self, campaign_id: str, user_ids: list[str]
    ) -> tuple[CampaignConfig | None, list[UserContext | None]]:
        """The campaign's configuration (None: no such campaign) and every user's context, in one round
        trip (on a Cluster, one per slot, in parallel)."""
        keys = [self.keys.config_key(campaign_id), self.keys.pacing_key(campaign_id)]
        keys += [self.keys.context_key(campaign_id, user_id) for user_id in user_ids]
        config, paced, *contexts = await self._mget(keys)
        return (None if config is None else _parse_config(campaign_id, config, paced)), contexts

    async def reserve(
        self,
        campaign_id: str,
        items: Sequence[ReserveItem] | ReserveBatch,
        *,
        model_version: str,
        lam: float,
        reservation_expiry_ms: int,
        decision_ttl_ms: int,
        now_ms: int | None = None,
        prior_coupons: int = 20,
        exploration_rate: float = 0.0,
        plan_lead: float = 0.1,
    ) -> ReserveResult:
        """Decide and reserve a whole batch atomically, users in priority order: each takes the first of
        its preferences that fits (the campaign's reservation mode says what fits and what is reserved:
        reserve.lua), unless it is a holdout user's (no coupon) or it explores (its draw picks among the
        coupons that fit and none, `exploration_rate` being the probability it had of exploring). Each new
        decision is logged with its features in the campaign's log stream, in the same script. A repeated
        request_id returns its first decision. `prior_coupons`: how many coupons of each action count as
        redeemed before outcomes say otherwise (expected mode); `plan_lead`: how far
        commitments may run ahead of a time plan (a fraction of the budget). `now_ms` (simulations and
        tests): the clock the script reads instead of the store's own."""
        batch = items if isinstance(items, ReserveBatch) else ReserveBatch.of(items)
        users = len(batch)
        if batch.features and len(batch.features) % max(1, users):
            raise ValueError("every user of a reservation must carry features of the same length (float32 rows)")
        batch_id = os.urandom(10).hex()
        keys = [
            self.keys.campaign_key(campaign_id),
            self.keys.pending_key(campaign_id),
            self.keys.batch_key(campaign_id, batch_id),
        ]
        requests = []
        tails = []
        for position, (user_id, request_id) in enumerate(zip(batch.user_ids, batch.request_ids, strict=True), 1):
            if request_id is None:
                tails.append("0\t\t" + user_id)
            else:
                tails.append(_record_tail(request_id, user_id))
                keys.append(self.keys.request_key(campaign_id, request_id))
                requests.append((position, len(keys), user_id))
        columns: dict[str, Any] = {
            "orderings": batch.orderings,
            "ordering": batch.ordering,  # 0-based here, 1-based in the script
            "tails": tails,
            "requests": requests,
        }
        if batch.expected_costs is not None:
            columns["expected"] = batch.expected_costs
        if batch.bundles is not None:
            columns["bundles"] = batch.bundles
        keys.append(self.keys.log_key(campaign_id))
        behaviour = {
            "holdout": [position + 1 for position in batch.holdout],
            "explore": [[position + 1, draw] for position, draw in batch.explore],
        }
        args = [
            "" if now_ms is None else now_ms,
            reservation_expiry_ms,
            decision_ttl_ms,
            model_version,
            repr(lam),
            batch_id,
            orjson.dumps(columns),
            prior_coupons,
            self.log_max_entries,
            batch.features,
            repr(float(exploration_rate)),
            orjson.dumps(behaviour),
            repr(float(plan_lead)),
        ]
        reply = await self._eval("reserve", keys, args)
        if reply[0] == b"missing":
            raise CampaignNotFound(campaign_id)
        if reply[0] == b"conflict":
            position = int(reply[1]) - 1
            raise RequestIdConflict(cast(str, batch.request_ids[position]), position)
        stride = 3 if batch.bundles is None else 4  # a catalog request's items end with their coupons
        end = stride * users + 1
        flags = reply[3:end:stride]
        result = ReserveResult(
            decision_ids=[f"d-{batch_id}-{i}" for i in range(users)],
            user_ids=list(batch.user_ids),
            actions=reply[1:end:stride],
            costs=reply[2:end:stride],
            versions=[model_version] * users,
            lams=[lam] * users,
            new=[flag != 0 for flag in flags],
            downgraded=[flag == 2 for flag in flags],
            remaining=int(reply[0]),
            components=None if batch.bundles is None else [_coupons(raw) for raw in reply[4:end:stride]],
        )
        if end < len(reply):  # the earlier decisions of repeated request ids (flag 0), in batch order
            replays = iter(reply[end:])
            for i in (i for i, flag in enumerate(flags) if flag == 0):
                decision_id, action, cost, version, earlier_lam, user_id = next(replays).decode().split("\t", 5)
                action, _, coupons = action.partition(";")
                result.decision_ids[i], result.user_ids[i], result.actions[i] = decision_id, user_id, int(action)
                result.costs[i], result.versions[i], result.lams[i] = int(cost), version, float(earlier_lam)
                if result.components is not None:  # a decision made before the campaign had a catalog: one coupon
                    single = [(int(action), int(cost))] if int(action) else []
                    result.components[i] = _coupons(coupons) if coupons else single
        return result

    # ---- contexts --------------------------------------------------------------------------------
    async def _update_contexts(
        self,
        keys: list[str],
        read: list[bytes | None],
        change: Callable[[list[int], list[bytes | None]], list[bytes | None]],
        ttl_ms: int,
    ) -> None:
        """Store change(indices, values)[j] at keys[indices[j]], `values` being those keys' values as last
        read (`read`); a context that changed since is read again and changed again (compare-and-set,
        `write_contexts.lua`). A change that gives None leaves that key alone."""
        todo = list(range(len(keys)))
        for _ in range(CAS_ATTEMPTS):
            changed = change(todo, [read[i] for i in todo])
            writes = [(i, value) for i, value in zip(todo, changed, strict=True) if value is not None]
            if not writes:
                return
            groups = self._by_slot(range(len(writes)), [keys[i] for i, _ in writes])
            replies = await self._eval_each(
                "write_contexts",
                [
                    (
                        [keys[writes[w][0]] for w in group],
                        [
                            ttl_ms,
                            HEADER.size,
                            b"".join([_header(read[writes[w][0]]) for w in group]),
                            b"".join([writes[w][1] for w in group]),
                            ",".join([str(len(writes[w][1])) for w in group]),
                        ],
                    )
                    for group in groups
                ],
            )
            todo = []
            for group, stale in zip(groups, replies, strict=True):
                for position, current in zip(stale[::2], stale[1::2], strict=True):
                    i = writes[group[position - 1]][0]
                    read[i] = current or None
                    todo.append(i)
            if not todo:
                return
        raise StateStoreError(f"{len(todo)} user contexts kept changing during {CAS_ATTEMPTS} attempts to write them")

    async def append_steps(
        self, campaign_id: str, steps: Sequence[NewStep] | NewSteps, *, capacity: int, ttl_ms: int
    ) -> None:
        """Append each decision as the newest step of its user's context, keeping the last `capacity`."""
        if not isinstance(steps, NewSteps):
            steps = NewSteps.of(steps)
        if not len(steps):
            return
        initial = empty_context(len(steps.features) // len(steps) // 4)
        rows = new_steps(steps.decision_ids, steps.actions, steps.features)
        if len(set(steps.user_ids)) == len(steps):  # the common case: each user once
            users, read, rounds = steps.user_ids, list(steps.reads), [list(range(len(steps)))]
        else:  # a user named twice gets both steps, in order: its k-th step in round k
            users, read, rounds = [], [], []
            taken: dict[str, int] = {}
            for position, user in enumerate(steps.user_ids):
                k = taken.get(user, 0)
                taken[user] = k + 1
                if k == 0:
                    users.append(user)
                    read.append(steps.reads[position])
                if k == len(rounds):
                    rounds.append([])
                rounds[k].append(position)
        position_of = {user: i for i, user in enumerate(users)} if len(rounds) > 1 else {}
        owner = [position_of[user] for user in steps.user_ids] if position_of else []

        def change(indices: list[int], values: list[bytes | None]) -> list[bytes | None]:
            if len(rounds) == 1 and len(indices) == len(users):  # every user, one step each, in order
                return list(append_context_steps(values, rows, capacity, initial))
            current = dict(zip(indices, values, strict=True))
            for positions in rounds:
                mine = [p for p in positions if (owner[p] if owner else p) in current]
                users_of = [owner[p] if owner else p for p in mine]
                appended = append_context_steps([current[u] for u in users_of], rows[mine], capacity, initial)
                current.update(zip(users_of, appended, strict=True))
            return [current[i] for i in indices]

        keys = [self.keys.context_key(campaign_id, user) for user in users]
        await self._update_contexts(keys, read, change, ttl_ms)

    async def apply_outcomes_to_contexts(
        self, campaign_id: str, updates: list[tuple[str, str, int, int]], *, ttl_ms: int
    ) -> None:
        """Write outcomes (user, decision id, reward and cost in cents) into their users' contexts."""
        by_user: dict[str, list[tuple[str, int, int]]] = {}
        for user_id, decision_id, reward, cost in updates:
            by_user.setdefault(user_id, []).append((decision_id, reward, cost))
        if not by_user:
            return
        users = list(by_user)
        keys = [self.keys.context_key(campaign_id, user) for user in users]

        def change(indices: list[int], values: list[bytes | None]) -> list[bytes | None]:
            changed = []
            for i, value in zip(indices, values, strict=True):
                for decision_id, reward, cost in by_user[users[i]]:
                    value = apply_outcome(value, decision_id, reward, cost)
                changed.append(value)
            return changed

        await self._update_contexts(keys, await self._mget(keys), change, ttl_ms)

    # ---- outcomes --------------------------------------------------------------------------------
    async def settle(self, campaign_id: str, outcomes: list[Outcome], *, now_ms: int | None = None) -> SettleResult:
        """Settle a batch of outcomes atomically (all or nothing: CostAboveReservation refuses all); each
        accepted outcome is logged in the campaign's log stream, settled at `now_ms` (default: the store's
        clock)."""
        keys = [self.keys.campaign_key(campaign_id)]
        key_index: dict[str, int] = {}
        args: list[Any] = []
        known: list[int] = []  # positions of the outcomes whose id is one this store made
        rewards = rounded_cents([outcome.reward for outcome in outcomes]).tolist()  # what the log holds
        for position, outcome in enumerate(outcomes):
            if outcome.coupons is not None and sum(c for _, c in outcome.coupons) != outcome.cost:
                raise ValueError(f"outcome {position}: its coupons' costs must sum to its cost")
            match = DECISION_ID.fullmatch(outcome.decision_id)
            if match is None:
                continue
            key = self.keys.batch_key(campaign_id, match[1])
            if key not in key_index:
                keys.append(key)
                key_index[key] = len(keys)
            coupons = "" if outcome.coupons is None else ",".join(f"{a}={c}" for a, c in outcome.coupons)
            args += [outcome.cost, rewards[position], key_index[key], match[2], coupons]
            known.append(position)
        keys.append(self.keys.log_key(campaign_id))
        args += ["" if now_ms is None else now_ms, self.log_max_entries]
        reply = await self._eval("settle", keys, args)
        if reply[0] == b"missing":
            raise CampaignNotFound(campaign_id)
        if reply[0] in (b"too_high", b"not_component", b"ambiguous"):
            index = known[int(reply[1])]
            outcome = outcomes[index]
            if reply[0] == b"too_high":
                coupon = int(reply[3]) if reply[3] and outcome.coupons is not None else None
                cost = outcome.cost if coupon is None else dict(outcome.coupons or [])[coupon]
                raise CostAboveReservation(index, cost, int(reply[2]), coupon)
            if reply[0] == b"not_component":
                raise CouponCostsRefused(index, f"coupon {int(reply[2])} is not one this decision granted")
            raise CouponCostsRefused(
                index,
                f"the decision granted a bundle of {int(reply[2])} coupons: give each one's realised cost in "
                "`coupons` (a cost above 0 cannot be split between them)",
            )
        result = SettleResult(remaining=int(reply[0]), unknown=len(outcomes) - len(known))
        for position, code, user_id in zip(known, reply[1::2], reply[2::2], strict=True):
            outcome = outcomes[position]
            if code == b"A":
                result.accepted += 1
                result.context_updates.append((user_id.decode(), outcome.decision_id, rewards[position], outcome.cost))
            elif code == b"D":
                result.duplicates += 1
            else:
                result.unknown += 1
        return result

    async def sweep_expired(self, campaign_id: str, now_ms: int | None = None, limit: int = 1000) -> int:
        """Release the reservations whose deadline passed by the store's clock (`now_ms`: another clock, for
        simulations and tests); returns how many were released. Up to `limit` due batches, 16 per script
        call: a batch holds up to max_batch records, and no single call should hold Redis for long."""
        client = await self.client()
        pending, released, taken = self.keys.pending_key(campaign_id), 0, 0
        clock: int | str = "" if now_ms is None else now_ms  # what the script reads
        if now_ms is None:  # which batches to hand the script (it checks each deadline on its own clock)
            now_ms = int(await self._eval("clock", [self.keys.campaign_key(campaign_id)], []))
        while taken < limit:
            chunk = min(16, limit - taken)
            due = await self._guard(
                lambda: client.zrangebyscore(pending, "-inf", now_ms, start=0, num=chunk)  # noqa: B023
            )
            if not due:
                break
            batches = [_text(cast(bytes, member)) for member in due]
            keys = [self.keys.campaign_key(campaign_id), pending] + [
                self.keys.batch_key(campaign_id, b) for b in batches
            ]
            released += int(await self._eval("sweep", keys, [clock, *batches]))
            taken += len(due)
            if len(due) < chunk:
                break
        return released


NO_HEADER = bytes(HEADER.size)  # what write_contexts.lua reads as "no context" (a header starts with its version, 1)


def _header(context: bytes | None) -> bytes:
    """A context's header as write_contexts.lua compares it: its first HEADER.size bytes, zero-padded."""
    return NO_HEADER if context is None else context[: HEADER.size].ljust(HEADER.size, b"\0")
