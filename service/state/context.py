"""A user's trajectory context as stored: one compact binary value. This module is the format's one
definition and holds its rules (append a step, apply an outcome, read a batch into model inputs); the
store writes their results compare-and-set (service/lua/write_contexts.lua knows only the header size).

    header  <B H I d d>   format version (1), step record size, next step index t,
                          running return-to-go, running cost-to-go (8-byte floats: outcomes accumulate)
    steps   oldest first, each a fixed-size record (little-endian, packed)::

        decision  32s     decision id, NUL-padded
        action    i4
        reward    f4      0 until the outcome arrives
        cost      f4      currency units
        rtg, ctg  f4 f4   return- and cost-to-go at this step (lowered when an earlier step's outcome arrives)
        t         i4      step index
        features  f4[d]   the state features of the decision

Fixed-size records let the decision path turn a whole batch of contexts into model inputs with a few array
operations. The header carries the running to-go values and the next step index, so a context keeps them
when capacity is 0.
A value that does not parse as this format (written for another feature size, or by another program) is
treated as no context.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, cast

import numpy as np

FORMAT_VERSION = 1
DECISION_BYTES = 32
HEADER = struct.Struct("<BHIdd")
# what the service sends for a new step: decision id and action; the features follow
STEP_PREFIX = struct.Struct(f"<{DECISION_BYTES}si")
# what the store fills in when it appends the step: reward, cost, rtg, ctg, t
STEP_RUNNING = struct.Struct("<ffffi")
REWARD_OFFSET = STEP_PREFIX.size  # reward and cost: two f4 at this offset within a record
TOGO_OFFSET = STEP_PREFIX.size + 8  # rtg and ctg: two f4 at this offset within a record
PAIR = struct.Struct("<ff")


def record_size(feature_dim: int) -> int:
    return STEP_PREFIX.size + STEP_RUNNING.size + 4 * feature_dim


@lru_cache(maxsize=8)
def step_dtype(feature_dim: int) -> np.dtype:
    dtype = np.dtype(
        [
            ("decision", f"S{DECISION_BYTES}"),
            ("action", "<i4"),
            ("reward", "<f4"),
            ("cost", "<f4"),
            ("rtg", "<f4"),
            ("ctg", "<f4"),
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


def empty_context(feature_dim: int, initial_rtg: float, initial_ctg: float) -> bytes:
    return HEADER.pack(FORMAT_VERSION, record_size(feature_dim), 0, initial_rtg, initial_ctg)


class Header(NamedTuple):
    t: int
    rtg: float
    ctg: float
    record_size: int
    steps: int


def read_header(raw: bytes | None) -> Header | None:
    """The header of a well-formed context value, else None."""
    if raw is None or len(raw) < HEADER.size:
        return None
    version, size, t, rtg, ctg = HEADER.unpack_from(raw)
    fixed = STEP_PREFIX.size + STEP_RUNNING.size
    if version != FORMAT_VERSION or size < fixed or (size - fixed) % 4 or (len(raw) - HEADER.size) % size:
        return None
    return Header(t, rtg, ctg, size, (len(raw) - HEADER.size) // size)


def append_step(raw: bytes | None, step: bytes, capacity: int, initial: bytes) -> bytes:
    """`raw` with the new step appended, keeping the last `capacity` steps.

    `step` is `new_step_bytes(...)`; `initial` is the `empty_context(...)` used when `raw` is absent or
    unreadable (or written for another feature size)."""
    size = len(step) + STEP_RUNNING.size
    header = read_header(raw)
    if raw is None or header is None or header.record_size != size:
        raw, header = initial, read_header(initial)
        assert header is not None
    record = (
        step[: STEP_PREFIX.size]
        + STEP_RUNNING.pack(0.0, 0.0, header.rtg, header.ctg, header.t)
        + step[STEP_PREFIX.size :]
    )
    body = raw[HEADER.size :] + record
    body = body[max(0, len(body) - capacity * size) :] if capacity > 0 else b""
    return HEADER.pack(FORMAT_VERSION, size, header.t + 1, header.rtg, header.ctg) + body


HEADER_DTYPE = np.dtype([("version", "u1"), ("record_size", "<u2"), ("t", "<u4"), ("rtg", "<f8"), ("ctg", "<f8")])
assert HEADER_DTYPE.itemsize == HEADER.size


def apply_outcome(raw: bytes | None, decision_id: str, reward: float, cost: float) -> bytes | None:
    """`raw` with an outcome written into its step; that step's successors and the running to-go values
    drop by the realized reward and cost (RTG_{t+1} = RTG_t - r_t). None when there is no readable context.
    A decision no longer in the context (trimmed) still lowers the running values."""
    header = read_header(raw)
    if raw is None or header is None:
        return None
    out = bytearray(raw)
    HEADER.pack_into(out, 0, FORMAT_VERSION, header.record_size, header.t, header.rtg - reward, header.ctg - cost)
    wanted = encode_decision_id(decision_id)
    found = False
    for offset in range(HEADER.size, len(raw), header.record_size):
        if found:
            rtg, ctg = PAIR.unpack_from(raw, offset + TOGO_OFFSET)
            PAIR.pack_into(out, offset + TOGO_OFFSET, rtg - reward, ctg - cost)
        elif raw[offset : offset + DECISION_BYTES] == wanted:
            PAIR.pack_into(out, offset + REWARD_OFFSET, reward, cost)
            found = True
    return bytes(out)


@dataclass(frozen=True)
class ContextView:
    """A decoded context (for tests, debugging and tools; the decision path reads the bytes directly)."""

    t: int
    rtg: float
    ctg: float
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
    return ContextView(header.t, header.rtg, header.ctg, steps)


@dataclass(frozen=True)
class ContextBatch:
    """The recent steps of a batch of users, ready for the model inputs."""

    # structured step_dtype [B, capacity]: each user's kept steps oldest first, right-aligned after zero records
    steps: np.ndarray
    counts: np.ndarray  # i64 [B]: steps per user
    t: np.ndarray  # i64 [B]: each user's next step index
    rtg: np.ndarray  # f32 [B]: running return-to-go (the initial value for a user without context)
    ctg: np.ndarray  # f32 [B]


def gather(
    contexts: list[bytes | None], feature_dim: int, capacity: int, initial_rtg: float, initial_ctg: float
) -> ContextBatch:
    """Each user's last `capacity` steps and running values; absent or unreadable contexts count as empty.
    Contexts of one length (the common case: every context full) are read together by array operations,
    so the per-user Python is a length lookup."""
    rows = len(contexts)
    size = record_size(feature_dim)
    steps = np.zeros((rows, capacity * size), np.uint8)  # bytes: copied as such, read as `dtype` at the end
    t = np.zeros(rows, np.int64)
    rtg = np.empty(rows, np.float32)
    ctg = np.empty(rows, np.float32)
    rtg.fill(initial_rtg)
    ctg.fill(initial_ctg)
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
        t[users], rtg[users], ctg[users] = headers["t"], headers["rtg"], headers["ctg"]
        kept = min((length - HEADER.size) // size, capacity)
        if kept:
            steps[users, (capacity - kept) * size :] = block[:, length - kept * size :]
            counts[users] = kept
    return ContextBatch(steps.view(step_dtype(feature_dim)), counts, t, rtg, ctg)
