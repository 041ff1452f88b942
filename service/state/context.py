"""A user's trajectory context as stored: one compact binary value. This module is the format's one
definition and holds its rules (append a step, apply an outcome, read a batch into the arrays of the
history rule, contract/inputs.py); the store writes their results compare-and-set
(service/lua/write_contexts.lua knows only the header size).

    header  <B H I q q>   format version (2), step record size, next step index t,
                          the user's rewards and costs so far (sums of every applied outcome, cents)
    steps   oldest first, each a fixed-size record (little-endian, packed)::

        decision  32s     decision id, NUL-padded
        action    i4
        reward    i8      cents, 0 until the outcome arrives
        cost      i8      cents
        t         i4      step index
        features  f4[d]   the state features of the decision

Outcomes are integer cents so that the to-go inputs (targets minus what happened before each step) are
exact, whatever order outcomes arrive in, and equal those training computes from the logged steps.
Fixed-size records let the decision path turn a whole batch of contexts into model inputs with a few array
operations. The header carries the sums and the next step index, so a context keeps them when capacity
is 0 or its steps are trimmed.
A value that does not parse as this format (written for another feature size, by another program or by
format 1, which stored float to-go values) is treated as no context.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, cast

import numpy as np

FORMAT_VERSION = 2
DECISION_BYTES = 32
HEADER = struct.Struct("<BHIqq")
# what the service sends for a new step: decision id and action; the features follow
STEP_PREFIX = struct.Struct(f"<{DECISION_BYTES}si")
# what the store fills in when it appends the step: reward, cost, t
STEP_RUNNING = struct.Struct("<qqi")
REWARD_OFFSET = STEP_PREFIX.size  # reward and cost: two i8 at this offset within a record
PAIR = struct.Struct("<qq")


def record_size(feature_dim: int) -> int:
    return STEP_PREFIX.size + STEP_RUNNING.size + 4 * feature_dim


@lru_cache(maxsize=8)
def step_dtype(feature_dim: int) -> np.dtype:
    dtype = np.dtype(
        [
            ("decision", f"S{DECISION_BYTES}"),
            ("action", "<i4"),
            ("reward", "<i8"),
            ("cost", "<i8"),
            ("t", "<i4"),
            ("features", "<f4", (feature_dim,)),
        ]
    )
    assert dtype.itemsize == record_size(feature_dim)
    return dtype


def encode_decision_id(decision_id: str) -> bytes:
    raw = decision_id.encode()
    if len(raw) > DECISION_BYTES:
        raise ValueError(f"decision id longer than {DECISION_BYTES} bytes: {decision_id!r}")
    return raw.ljust(DECISION_BYTES, b"\0")


def new_step_bytes(decision_id: str, action: int, features: bytes) -> bytes:
    """What a store receives for a new step: prefix + float32 little-endian features."""
    return STEP_PREFIX.pack(encode_decision_id(decision_id), action) + features


def new_steps(decision_ids: list[str], actions: list[int], features: bytes) -> np.ndarray:
    """`new_step_bytes` of each decision, as the rows [n, step bytes] of one uint8 array (`features`: the
    float32 little-endian rows, concatenated)."""
    rows = len(decision_ids)
    encoded = [decision_id.encode() for decision_id in decision_ids]
    if any(len(raw) > DECISION_BYTES for raw in encoded):
        longest = max(decision_ids, key=lambda d: len(d.encode()))
        raise ValueError(f"decision id longer than {DECISION_BYTES} bytes: {longest!r}")
    steps = np.empty((rows, STEP_PREFIX.size + len(features) // max(1, rows)), np.uint8)
    steps[:, :DECISION_BYTES] = np.array(encoded, f"S{DECISION_BYTES}").view(np.uint8).reshape(rows, DECISION_BYTES)
    steps[:, DECISION_BYTES : STEP_PREFIX.size] = np.asarray(actions, "<i4").view(np.uint8).reshape(rows, 4)
    steps[:, STEP_PREFIX.size :] = np.frombuffer(features, np.uint8).reshape(rows, -1)
    return steps


def empty_context(feature_dim: int) -> bytes:
    return HEADER.pack(FORMAT_VERSION, record_size(feature_dim), 0, 0, 0)


class Header(NamedTuple):
    t: int
    reward: int  # cents
    cost: int
    record_size: int
    steps: int


def read_header(raw: bytes | None) -> Header | None:
    """The header of a well-formed context value, else None."""
    if raw is None or len(raw) < HEADER.size:
        return None
    version, size, t, reward, cost = HEADER.unpack_from(raw)
    fixed = STEP_PREFIX.size + STEP_RUNNING.size
    if version != FORMAT_VERSION or size < fixed or (size - fixed) % 4 or (len(raw) - HEADER.size) % size:
        return None
    return Header(t, reward, cost, size, (len(raw) - HEADER.size) // size)


def append_step(raw: bytes | None, step: bytes, capacity: int, initial: bytes) -> bytes:
    """`raw` with the new step appended, keeping the last `capacity` steps (the rule; `append_steps`
    applies it to a batch).

    `step` is `new_step_bytes(...)`; `initial` is the `empty_context(...)` used when `raw` is absent or
    unreadable (or written for another feature size)."""
    size = len(step) + STEP_RUNNING.size
    header = read_header(raw)
    if raw is None or header is None or header.record_size != size:
        raw, header = initial, read_header(initial)
        assert header is not None
    record = step[: STEP_PREFIX.size] + STEP_RUNNING.pack(0, 0, header.t) + step[STEP_PREFIX.size :]
    body = raw[HEADER.size :] + record
    body = body[max(0, len(body) - capacity * size) :] if capacity > 0 else b""
    return HEADER.pack(FORMAT_VERSION, size, header.t + 1, header.reward, header.cost) + body


ARRAY_ROWS = 16  # from this many contexts of one length, `append_steps` works on them as one array
HEADER_DTYPE = np.dtype([("version", "u1"), ("record_size", "<u2"), ("t", "<u4"), ("reward", "<i8"), ("cost", "<i8")])
assert HEADER_DTYPE.itemsize == HEADER.size


def append_steps(raws: list[bytes | None], steps: np.ndarray, capacity: int, initial: bytes) -> list[bytes]:
    """`append_step` of each step (`steps[i]`: the uint8 row of `new_step_bytes`, see `new_steps`) to
    `raws[i]`: by array operations over the contexts of one length (the common case: every context full),
    so the per-user Python is a length lookup and a slice; a group too small to repay them (a request of
    a few users) by `append_step` itself. Tests hold both ways equal."""
    if not len(steps):
        return []
    size = steps.shape[1] + STEP_RUNNING.size
    out: list[bytes] = [b""] * len(steps)
    by_length: dict[int, list[int]] = {}
    for i, raw in enumerate(raws):
        by_length.setdefault(-1 if raw is None else len(raw), []).append(i)
    fresh = by_length.pop(-1, [])  # no context, or not one of ours: appended to `initial`
    for length, members in by_length.items():
        if length < HEADER.size or (length - HEADER.size) % size:
            fresh += members
            continue
        if len(members) < ARRAY_ROWS:
            for i in members:
                out[i] = append_step(raws[i], steps[i].tobytes(), capacity, initial)
            continue
        block = np.frombuffer(b"".join([cast(bytes, raws[i]) for i in members]), np.uint8).reshape(len(members), -1)
        headers = block[:, : HEADER.size].copy().view(HEADER_DTYPE)[:, 0]
        ours = (headers["version"] == FORMAT_VERSION) & (headers["record_size"] == size)
        if not ours.all():
            fresh += [i for i, mine in zip(members, ours.tolist(), strict=True) if not mine]
            members = [i for i, mine in zip(members, ours.tolist(), strict=True) if mine]
            block, headers = block[ours], headers[ours]
        _append_block(out, members, block, headers, steps, capacity, size)
    if 0 < len(fresh) < ARRAY_ROWS:
        for i in fresh:
            out[i] = append_step(None, steps[i].tobytes(), capacity, initial)
    elif fresh:
        block = np.frombuffer(initial, np.uint8)[None, :].repeat(len(fresh), axis=0)
        headers = block[:, : HEADER.size].copy().view(HEADER_DTYPE)[:, 0]
        _append_block(out, fresh, block, headers, steps, capacity, size)
    return out


def _append_block(
    out: list[bytes],
    members: list[int],
    block: np.ndarray,
    headers: np.ndarray,
    steps: np.ndarray,
    capacity: int,
    size: int,
) -> None:
    """out[members[j]] = block[j] (contexts of one length, `headers` theirs) with steps[members[j]] appended."""
    rows = len(members)
    if not rows:
        return
    given = steps[members]
    records = np.zeros((rows, size), np.uint8)  # reward and cost 0 until the outcome arrives
    records[:, : STEP_PREFIX.size] = given[:, : STEP_PREFIX.size]
    t_at = STEP_PREFIX.size + STEP_RUNNING.size - 4  # the step index: the last i4 of the running part
    records[:, t_at : t_at + 4] = headers["t"].astype("<i4").view(np.uint8).reshape(rows, 4)
    records[:, STEP_PREFIX.size + STEP_RUNNING.size :] = given[:, STEP_PREFIX.size :]
    headers = headers.copy()
    headers["t"] += 1
    kept = min((block.shape[1] - HEADER.size) // size + 1, capacity) if capacity > 0 else 0
    body = np.concatenate([block[:, HEADER.size :], records], axis=1)
    body = body[:, body.shape[1] - kept * size :]
    values = np.concatenate([headers.view(np.uint8).reshape(rows, HEADER.size), body], axis=1)
    width, data = values.shape[1], values.tobytes()
    for j, i in enumerate(members):
        out[i] = data[j * width : (j + 1) * width]


def apply_outcome(raw: bytes | None, decision_id: str, reward: int, cost: int) -> bytes | None:
    """`raw` with an outcome (cents) written into its step and added to the user's sums. None when there is
    no readable context. A decision no longer in the context (trimmed) still counts in the sums."""
    header = read_header(raw)
    if raw is None or header is None:
        return None
    out = bytearray(raw)
    HEADER.pack_into(out, 0, FORMAT_VERSION, header.record_size, header.t, header.reward + reward, header.cost + cost)
    wanted = encode_decision_id(decision_id)
    for offset in range(HEADER.size, len(raw), header.record_size):
        if raw[offset : offset + DECISION_BYTES] == wanted:
            PAIR.pack_into(out, offset + REWARD_OFFSET, reward, cost)
            break
    return bytes(out)


@dataclass(frozen=True)
class ContextView:
    """A decoded context (for tests, debugging and tools; the decision path reads the bytes directly)."""

    t: int
    reward: int  # cents: the sum of every applied outcome
    cost: int
    steps: np.ndarray  # structured, step_dtype(feature_dim)

    @property
    def decision_ids(self) -> list[str]:
        return [d.decode() for d in self.steps["decision"]]


def decode_context(raw: bytes | None) -> ContextView | None:
    header = read_header(raw)
    if raw is None or header is None:
        return None
    dim = (header.record_size - STEP_PREFIX.size - STEP_RUNNING.size) // 4
    steps = np.frombuffer(raw, step_dtype(dim), offset=HEADER.size) if header.steps else np.empty(0, step_dtype(dim))
    return ContextView(header.t, header.reward, header.cost, steps)


@dataclass(frozen=True)
class ContextBatch:
    """The recent steps of a batch of users, ready for the model inputs."""

    # structured step_dtype [B, capacity]: each user's kept steps oldest first, right-aligned after zero records
    steps: np.ndarray
    counts: np.ndarray  # i64 [B]: steps per user
    t: np.ndarray  # i64 [B]: each user's next step index
    reward: np.ndarray  # i64 [B] cents: the sum of the user's applied outcomes (0 without context)
    cost: np.ndarray  # i64 [B] cents


def gather(contexts: list[bytes | None], feature_dim: int, capacity: int) -> ContextBatch:
    """Each user's last `capacity` steps and running values; absent or unreadable contexts count as empty.
    Contexts of one length (the common case: every context full) are read together by array operations,
    so the per-user Python is a length lookup."""
    rows = len(contexts)
    size = record_size(feature_dim)
    steps = np.zeros((rows, capacity * size), np.uint8)  # bytes: copied as such, read as `dtype` at the end
    t = np.zeros(rows, np.int64)
    reward = np.zeros(rows, np.int64)
    cost = np.zeros(rows, np.int64)
    counts = np.zeros(rows, np.int64)
    by_length: dict[int, list[int]] = {}
    for i, raw in enumerate(contexts):
        if raw is not None:
            by_length.setdefault(len(raw), []).append(i)
    for length, members in by_length.items():
        if length < HEADER.size or (length - HEADER.size) % size:
            continue  # not ours: start afresh
        block = np.frombuffer(b"".join([cast(bytes, contexts[i]) for i in members]), np.uint8)
        block = block.reshape(len(members), length)
        headers = block[:, : HEADER.size].copy().view(HEADER_DTYPE)[:, 0]
        ours = (headers["version"] == FORMAT_VERSION) & (headers["record_size"] == size)
        users = np.array(members)
        if not ours.all():
            users, block, headers = users[ours], block[ours], headers[ours]
        t[users], reward[users], cost[users] = headers["t"], headers["reward"], headers["cost"]
        kept = min((length - HEADER.size) // size, capacity)
        if kept:
            steps[users, (capacity - kept) * size :] = block[:, length - kept * size :]
            counts[users] = kept
    return ContextBatch(steps.view(step_dtype(feature_dim)), counts, t, reward, cost)
