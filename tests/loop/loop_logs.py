"""Decision and outcome log entries of the synthetic world, in the service's stream format, for tests.

A decision's outcome (a purchase: reward or cost above zero) arrives `delay` after it; a decision without a
purchase gets no outcome entry, as when a caller reports only conversions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import redis

from contract.catalog import Catalog
from contract.keys import Keys
from contract.log_entry import decision_fields, decisions_fields, outcome_fields
from research.simulate import simulate_logs
from research.world import WorldConfig

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Entry:
    at_ms: int
    fields: dict[str, str | bytes]


def world_entries(
    users: int,
    rounds: int,
    seed: int,
    *,
    campaign: str = "c1",
    start_ms: int = 20_600 * DAY_MS,  # midnight UTC, 2026-05-27
    round_ms: int = DAY_MS,
    delay_mean_ms: float = 0.0,
    model_version: str = "v-logging",
    lam: float = 0.0,
) -> list[Entry]:
    """Entries of `users` users of the world for `rounds` rounds under its uniform random logging policy,
    sorted by time; decision ids are "<campaign>-<row>"."""
    table = simulate_logs(WorldConfig(users=users, rounds=rounds, seed=seed)).to_pydict()
    rng = np.random.default_rng(seed + 1)
    feature_names = sorted((n for n in table if n.startswith("f") and n[1:].isdigit()), key=lambda n: int(n[1:]))
    out: list[Entry] = []
    jitter = rng.uniform(0, round_ms / 2, size=users)
    for i in range(len(table["t"])):
        user = table["user_id"][i]
        decided = start_ms + int(table["t"][i]) * round_ms + int(jitter[int(user[1:])])
        decision_id = f"{campaign}-{i}"
        action = int(table["action"][i])
        reward_cents = round(table["reward"][i] * 100)
        cost_cents = round(table["cost"][i] * 100)
        features = np.array([table[n][i] for n in feature_names], dtype=np.float32)
        face_cents = max(cost_cents, 100 * action)
        out.append(
            Entry(
                decided,
                decision_fields(
                    decision_id=decision_id,
                    user_id=user,
                    action=action,
                    cost_cents=face_cents,
                    probability=float(table["propensity"][i]),
                    features=features,
                    at_ms=decided,
                    model_version=model_version,
                    lam=lam,
                ),
            )
        )
        if reward_cents > 0 or cost_cents > 0:
            delay = int(rng.exponential(delay_mean_ms)) if delay_mean_ms > 0 else 1
            out.append(
                Entry(
                    decided + delay,
                    outcome_fields(
                        decision_id=decision_id,
                        user_id=user,
                        action=action,
                        reward_cents=reward_cents,
                        cost_cents=cost_cents,
                        at_ms=decided + delay,
                        decided_at_ms=decided,
                    ),
                )
            )
    out.sort(key=lambda e: e.at_ms)
    return out


def catalog_entries(
    users: int,
    rounds: int,
    seed: int,
    catalog: Catalog,
    *,
    campaign: str = "c1",
    start_ms: int = 20_600 * DAY_MS,
    round_ms: int = DAY_MS,
    model_version: str = "v-logging",
) -> list[Entry]:
    """Entries of `users` users of the bundle world of `catalog` for `rounds` rounds under its uniform random
    logging policy, as a catalog campaign's service writes them: each decision a `decisions` entry naming its
    coupons and their worst-case costs (its action the bundle's: a coupon's own, BUNDLE_ACTIONS + position for a
    bundle of several), a purchase an `outcome` entry 1 ms later."""
    table = simulate_logs(WorldConfig(users=users, rounds=rounds, seed=seed, catalog=catalog)).to_pydict()
    rng = np.random.default_rng(seed + 1)
    feature_names = sorted((n for n in table if n.startswith("f") and n[1:].isdigit()), key=lambda n: int(n[1:]))
    jitter = rng.uniform(0, round_ms / 2, size=users)
    out: list[Entry] = []
    for i in range(len(table["t"])):
        user = table["user_id"][i]
        decided = start_ms + int(table["t"][i]) * round_ms + int(jitter[int(user[1:])])
        j = int(table["action"][i])
        bundle = catalog.bundles[j - 1] if j else None
        coupons = [] if bundle is None else [(a, catalog.by_action[a].worst_case) for a in bundle.coupons]
        features = np.array([[table[n][i] for n in feature_names]], dtype=np.float32)
        action = 0 if bundle is None else bundle.action
        fields = decisions_fields(
            batch_id=f"{campaign}-{i}",
            items=[0],
            user_ids=[user],
            actions=[action],
            cost_cents=[sum(c for _, c in coupons)],
            probabilities=[float(table["propensity"][i])],
            features=features,
            at_ms=decided,
            model_version=model_version,
            lam=0.0,
            coupons=[coupons],
        )
        out.append(Entry(decided, fields))
        reward_cents, cost_cents = round(table["reward"][i] * 100), round(table["cost"][i] * 100)
        if reward_cents > 0 or cost_cents > 0:
            outcome = outcome_fields(
                decision_id=f"d-{campaign}-{i}-0",
                user_id=user,
                action=action,
                reward_cents=reward_cents,
                cost_cents=cost_cents,
                at_ms=decided + 1,
                decided_at_ms=decided,
            )
            out.append(Entry(decided + 1, outcome))
    out.sort(key=lambda e: e.at_ms)
    return out


def write_entries(url: str, prefix: str, campaign: str, entries: list[Entry]) -> int:
    """XADD the entries to the campaign's stream, in order; returns how many."""
    client = redis.Redis.from_url(url)
    keys = Keys(prefix)
    client.sadd(keys.campaigns_key, campaign)
    key = keys.log_key(campaign)
    pipe = client.pipeline(transaction=False)
    written = 0
    for entry in entries:
        pipe.xadd(key, entry.fields)  # type: ignore[arg-type]
        written += 1
        if written % 2000 == 0:
            pipe.execute()
    pipe.execute()
    client.close()
    return written
