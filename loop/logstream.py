"""The service's decision and outcome log streams, and their export to Parquet partitions.

One Redis stream per campaign (its key and the set of campaign ids: contract/keys.py). The service writes
one ``decisions`` entry per reservation call (a request's new decisions) and one ``outcome`` entry per
accepted outcome (the entry format: contract/log_entry.py).

The exporter reads every stream through the consumer group ``export``: first the entries it was given
before and did not acknowledge (a previous run that died), then new ones. Each batch is written as Parquet
files, one per (kind, campaign, date) it touches, named by the batch's first and last entry ids::

    <out>/decisions/campaign=<C>/date=<YYYY-MM-DD>/part-<first id>_<last id>.parquet
    <out>/outcomes/campaign=<C>/date=<YYYY-MM-DD>/part-<first id>_<last id>.parquet

Every file is written to a hidden temporary name and renamed into place; the batch is acknowledged only
after all its files are in place. A run killed at any point loses nothing (its batch stays pending and
is read again first) and duplicates nothing (the same batch gives the same file names, which the rerun
replaces). Readers still deduplicate by ``decision_id``: an exporter restarted with another batch size
re-reads the unacknowledged batch with other boundaries.

What the stream's bound took before it was exported is counted, never skipped in silence: the service's
scripts count each entry they trim before the group was given it in the campaign hash's ``log_lost``
(docs/state.md), and the exporter adds the entries it was given, did not acknowledge (a run that died) and
finds trimmed when it reads them again. Each run reports what was lost since the previous run
(``trimmed``, by campaign in ``trimmed_by_campaign``): the hash's ``log_lost_reported`` remembers what was
reported, across runs and exporters.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis
import redis.cluster

from contract.keys import LOG_GROUP, Keys
from contract.log_entry import LogEntryError, decode_decision, decode_decisions, decode_outcome

Client = redis.Redis | redis.cluster.RedisCluster
DEFAULT_CONSUMER = "exporter"
DECISIONS = "decisions"
OUTCOMES = "outcomes"
_TMP_PREFIX = ".tmp-"

# the columns every partition carries besides the features (decisions) - in this order
DECISION_COLUMNS: dict[str, pa.DataType] = {
    "decision_id": pa.string(),
    "campaign_id": pa.string(),
    "user_id": pa.string(),
    "t": pa.int64(),
    "action": pa.int64(),
    "cost": pa.float64(),
    "probability": pa.float64(),
    "explored": pa.bool_(),
    "holdout": pa.bool_(),
    "lambda": pa.float64(),
    "model_version": pa.string(),
    "decided_at_ms": pa.int64(),
    "coupons": pa.list_(pa.int64()),  # the bundle's coupon actions ([] no coupon; [action] a single coupon)
    "coupon_costs": pa.list_(pa.float64()),  # their costs
}
OUTCOME_COLUMNS: dict[str, pa.DataType] = {
    "decision_id": pa.string(),
    "campaign_id": pa.string(),
    "user_id": pa.string(),
    "t": pa.int64(),
    "action": pa.int64(),
    "reward": pa.float64(),
    "cost": pa.float64(),
    "decided_at_ms": pa.int64(),
    "outcome_at_ms": pa.int64(),
    "coupons": pa.list_(pa.int64()),
    "coupon_costs": pa.list_(pa.float64()),  # each coupon's realised cost
}


def connect(redis_url: str) -> Client:
    """A client of the service's Redis: a Cluster client when the server is a Cluster node."""
    client = redis.Redis.from_url(redis_url)
    try:
        if not client.info("cluster").get("cluster_enabled"):
            return client
    except BaseException:
        client.close()
        raise
    client.close()
    return redis.cluster.RedisCluster.from_url(redis_url)


# KEYS[1] the campaign hash; ARGV[1] entries this run found trimmed while pending. Adds them to log_lost,
# returns what log_lost gained since the last report and marks it reported (a stream without its campaign,
# written by a test or a tool: just ARGV[1]).
_REPORT_LOST = """
if redis.call('EXISTS', KEYS[1]) == 0 then return tonumber(ARGV[1]) end
if tonumber(ARGV[1]) > 0 then redis.call('HINCRBY', KEYS[1], 'log_lost', ARGV[1]) end
local lost = tonumber(redis.call('HGET', KEYS[1], 'log_lost') or '0')
local reported = tonumber(redis.call('HGET', KEYS[1], 'log_lost_reported') or '0')
redis.call('HSET', KEYS[1], 'log_lost_reported', lost)
return lost - reported
"""


@dataclass
class _Rows:
    """Decoded entries of one (kind, date) of one batch, column by column."""

    ids: list[str] = field(default_factory=list)
    columns: dict[str, list[object]] = field(default_factory=dict)
    features: list[np.ndarray] = field(default_factory=list)  # [decisions, feature_dim] blocks, in row order

    def add(self, entry_id: str, values: Mapping[str, object]) -> None:
        self.ids.append(entry_id)
        for name, value in values.items():
            self.columns.setdefault(name, []).append(value)


def _date(at_ms: int) -> str:
    return dt.datetime.fromtimestamp(at_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d")


def _table(rows: _Rows, schema: dict[str, pa.DataType], where: str) -> pa.Table:
    data = {name: pa.array(rows.columns[name], type=kind) for name, kind in schema.items()}
    if rows.features:
        dims = {f.shape[1] for f in rows.features}
        if len(dims) > 1:
            raise LogEntryError(f"{where}: decisions have different feature lengths {sorted(dims)}")
        stacked = np.concatenate(rows.features)
        for j in range(stacked.shape[1]):
            data[f"f{j}"] = pa.array(stacked[:, j], type=pa.float64())
    return pa.table(data)


def _file_name(first_id: str, last_id: str) -> str:
    return f"part-{first_id}_{last_id}.parquet"


def write_partition(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` atomically: a hidden temporary file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".parquet", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_stale_temporaries(out: Path) -> int:
    removed = 0
    for kind in (DECISIONS, OUTCOMES):
        for stale in (out / kind).glob(f"campaign=*/date=*/{_TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


@dataclass
class ExportSummary:
    """What one export run did (the JSON line of `saco export`)."""

    out: str
    campaigns: int = 0
    decisions: int = 0
    outcomes: int = 0
    entries: int = 0
    redelivered: int = 0  # entries a previous, interrupted run had read and not acknowledged
    trimmed: int = 0  # entries lost since the previous run: trimmed before they were exported
    trimmed_by_campaign: dict[str, int] = field(default_factory=dict)  # the campaigns that lost any
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "out": self.out,
            "campaigns": self.campaigns,
            "entries": self.entries,
            "decisions": self.decisions,
            "outcomes": self.outcomes,
            "redelivered": self.redelivered,
            "trimmed": self.trimmed,
            "trimmed_by_campaign": dict(sorted(self.trimmed_by_campaign.items())),
            "files": len(self.files),
            "seconds": round(self.seconds, 2),
        }


def _write_batch(
    campaign_id: str, entries: list[tuple[bytes, dict[bytes, bytes] | None]], out: Path, summary: ExportSummary
) -> int:
    """Decode one batch and write its partitions; raises LogEntryError before writing anything if any
    entry is malformed. Returns how many of its entries the stream had trimmed (pending ones)."""
    groups: dict[tuple[str, str], _Rows] = {}
    trimmed = 0
    for raw_id, fields in entries:
        entry_id = raw_id.decode()
        if not fields:  # trimmed by the stream's bound while pending
            trimmed += 1
            continue
        kind = fields.get(b"kind", b"").decode(errors="replace")
        if kind == "decisions":
            decided, features = decode_decisions(campaign_id, entry_id, fields)
            rows = groups.setdefault((DECISIONS, _date(int(decided[0]["decided_at_ms"]))), _Rows())  # type: ignore[call-overload]
            for values in decided:
                rows.add(entry_id, values)
            rows.features.append(features)
        elif kind == "decision":  # one decision (earlier service versions)
            values, features = decode_decision(campaign_id, entry_id, fields)
            rows = groups.setdefault((DECISIONS, _date(int(values["decided_at_ms"]))), _Rows())  # type: ignore[call-overload]
            rows.add(entry_id, values)
            rows.features.append(features[None, :])
        elif kind == "outcome":
            values = decode_outcome(campaign_id, entry_id, fields)
            groups.setdefault((OUTCOMES, _date(int(values["outcome_at_ms"]))), _Rows()).add(entry_id, values)  # type: ignore[call-overload]
        else:
            raise LogEntryError(f"campaign {campaign_id!r} log entry {entry_id}: unknown kind {kind!r}")
    tables = []
    for (kind, date), rows in groups.items():
        schema = DECISION_COLUMNS if kind == DECISIONS else OUTCOME_COLUMNS
        where = f"campaign {campaign_id!r} entries {rows.ids[0]}..{rows.ids[-1]}"
        path = out / kind / f"campaign={campaign_id}" / f"date={date}" / _file_name(rows.ids[0], rows.ids[-1])
        tables.append((kind, path, _table(rows, schema, where)))
    for kind, path, table in tables:
        write_partition(table, path)
        summary.files.append(str(path))
        if kind == DECISIONS:
            summary.decisions += table.num_rows
        else:
            summary.outcomes += table.num_rows
    return trimmed


_CAMPAIGN_RE = re.compile(r"^[^/\\\x00]+$")


def export_campaign(
    client: Client,
    prefix: str,
    campaign_id: str,
    out: Path,
    summary: ExportSummary,
    *,
    consumer: str = DEFAULT_CONSUMER,
    batch_size: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Export everything the campaign's stream holds for the group that this consumer has not
    acknowledged: its pending entries first, then new ones, one batch at a time; then count what the
    campaign lost since the previous run (module docstring)."""
    if not _CAMPAIGN_RE.match(campaign_id) or campaign_id in (".", ".."):
        raise LogEntryError(f"campaign id {campaign_id!r} cannot name a partition directory")
    keys = Keys(prefix)
    key = keys.log_key(campaign_id)
    trimmed = 0
    if client.exists(key):
        trimmed = _read_stream(client, key, campaign_id, out, summary, consumer, batch_size, progress)
    lost = int(client.eval(_REPORT_LOST, 1, keys.campaign_key(campaign_id), trimmed))
    if lost:
        summary.trimmed += lost
        summary.trimmed_by_campaign[campaign_id] = lost


def _read_stream(
    client: Client,
    key: str,
    campaign_id: str,
    out: Path,
    summary: ExportSummary,
    consumer: str,
    batch_size: int,
    progress: Callable[[str], None] | None,
) -> int:
    """Export the stream's entries through the group; returns how many pending ones it found trimmed."""
    trimmed = 0
    try:
        client.xgroup_create(key, LOG_GROUP, id="0")
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    summary.campaigns += 1
    start = "0"  # the consumer's pending entries; then ">" (new ones)
    while True:
        reply: Any = client.xreadgroup(LOG_GROUP, consumer, {key: start}, count=batch_size)
        entries: list[tuple[bytes, dict[bytes, bytes] | None]] = reply[0][1] if reply else []
        if not entries:
            if start == ">":
                return trimmed
            start = ">"
            continue
        trimmed += _write_batch(campaign_id, entries, out, summary)
        client.xack(key, LOG_GROUP, *[entry_id for entry_id, _ in entries])
        summary.entries += len(entries)
        if start == "0":
            summary.redelivered += len(entries)
        if progress is not None:
            progress(
                f"campaign {campaign_id}: {summary.entries} entries exported "
                f"({summary.decisions} decisions, {summary.outcomes} outcomes)"
            )


def export_logs(
    redis_url: str,
    out: str | os.PathLike[str],
    *,
    prefix: str = "saco:",
    campaigns: Iterable[str] | None = None,
    consumer: str = DEFAULT_CONSUMER,
    batch_size: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> ExportSummary:
    """Export every campaign's log stream (default: the campaigns in ``P campaigns``) into `out`.

    At-least-once and idempotent: see the module docstring. Returns counts of what was written."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    started = time.time()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    summary = ExportSummary(out=str(root))
    client = connect(redis_url)
    try:
        names = (
            sorted(c.decode() for c in client.smembers(Keys(prefix).campaigns_key))  # type: ignore[union-attr]
            if campaigns is None
            else list(campaigns)
        )
        for campaign_id in names:
            export_campaign(
                client, prefix, campaign_id, root, summary, consumer=consumer, batch_size=batch_size, progress=progress
            )
    finally:
        client.close()
    summary.seconds = time.time() - started
    return summary


def follow(
    redis_url: str,
    out: str | os.PathLike[str],
    *,
    every_s: float,
    prefix: str = "saco:",
    consumer: str = DEFAULT_CONSUMER,
    batch_size: int = 1000,
    emit: Callable[[ExportSummary], None],
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Export again every `every_s` seconds until `stop()` (the exporter service of the deployment)."""
    while not stop():
        emit(export_logs(redis_url, out, prefix=prefix, consumer=consumer, batch_size=batch_size))
        deadline = time.monotonic() + every_s
        while time.monotonic() < deadline and not stop():
            time.sleep(min(0.5, every_s))
