"""Pure user-model math: decayed long-term pooling, session vector, mix. No I/O, no locks.

Notation: event i has the L2-normalized item vector v_i, a weight w_i (per event type; negative for
dislike/skip) and an event time t_i; lambda = ln 2 / half_life.

* long-term  L = sum_i w_i * exp(-lambda * (T - t_i)) * v_i, kept relative to T = the newest event
  time seen. A newer event rescales L once and adds; an older (out-of-order) one is added with its
  own decay factor. Both are O(d) and give exactly the L a recomputation from scratch would.
* session    S = sum_{i in session} w_i * v_i, where the session is the newest events (by event
  time, at most `session_size`) with no pause longer than `session_gap_seconds` between two of them.
* user       u = normalize((1 - m) * L / |L| + m * S / |S|), m = `session_mix`; a zero part adds
  nothing, and u is None (cold user) when the sum is zero.

Only directions matter (cosine scoring), so L never needs rescaling to "now": the user vector of a
profile does not change while nothing happens, and replaying history gives the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_EPS = 1e-9


def decay_rate(half_life_seconds: float) -> float:
    """lambda such that exp(-lambda * half_life) = 1/2."""
    return math.log(2.0) / half_life_seconds


def fold(long_term: np.ndarray, ref_time: float, first: bool, timestamp: float, weight: float,
         vector: np.ndarray, rate: float) -> float:
    """Add one event to the float64 `long_term` in place (O(d)); returns the new reference time.

    `first` is True when no event with a vector was folded before (the reference time is unset).
    The arithmetic is in float64 in this exact order; the Redis Lua script does the same steps.
    """
    v = np.asarray(vector, dtype=np.float32).astype(np.float64)  # item vectors are float32 everywhere
    if first:
        ref_time = timestamp
    if timestamp >= ref_time:
        if timestamp > ref_time:
            long_term *= math.exp(-rate * (timestamp - ref_time))
        long_term += weight * v
        return timestamp
    long_term += (weight * math.exp(-rate * (ref_time - timestamp))) * v
    return ref_time


def frame_factor(time: float, ref_time: float, first: bool, rate: float) -> float:
    """exp(-lambda (ref_time - time)): what a weight at `time` counts in L's frame at `ref_time`
    (1 for the first event, which sets the frame). Used to keep per-item masses in step with L."""
    if first or time >= ref_time:
        return 1.0
    return math.exp(-rate * (ref_time - time))


@dataclass(frozen=True, slots=True)
class History:
    """The newest events of a user that had an item vector, oldest first (sorted by event time)."""

    item_ids: tuple[str, ...]
    timestamps: np.ndarray  # float64 (k,)
    weights: np.ndarray  # float64 (k,), event weights (signed, not decayed)
    vectors: np.ndarray  # float32 (k, d)

    @staticmethod
    def empty(dim: int) -> History:
        return History((), np.zeros(0), np.zeros(0), np.zeros((0, dim), dtype=np.float32))

    def __len__(self) -> int:
        return len(self.item_ids)


def session_start(timestamps: np.ndarray, size: int, gap_seconds: float) -> int:
    """Index of the first event of the current session in ascending `timestamps`."""
    n = len(timestamps)
    start = n - 1 if n else 0
    while start > 0 and n - start < size and timestamps[start] - timestamps[start - 1] <= gap_seconds:
        start -= 1
    return start


def session_vector(history: History, size: int, gap_seconds: float) -> np.ndarray:
    """S = sum of w_i * v_i over the session (float64; zeros when there is no history)."""
    start = session_start(history.timestamps, size, gap_seconds)
    rows = history.vectors[start:].astype(np.float64)
    return history.weights[start:] @ rows if len(rows) else np.zeros(history.vectors.shape[1])


def mix(long_term: np.ndarray, session: np.ndarray, session_mix: float) -> np.ndarray | None:
    """u = normalize((1 - m) * L/|L| + m * S/|S|) as float32, or None when it is zero."""
    out = np.zeros(long_term.shape, dtype=np.float64)
    for part, share in ((long_term, 1.0 - session_mix), (session, session_mix)):
        norm = float(np.linalg.norm(part))
        if norm > _EPS and share > 0.0:
            out += (share / norm) * part
    norm = float(np.linalg.norm(out))
    if norm <= _EPS:
        return None
    return (out / norm).astype(np.float32)


def decayed_weights(history: History, ref_time: float, rate: float) -> np.ndarray:
    """b_i = w_i * exp(-lambda * (T - t_i)) for the history rows (attention pooling weights)."""
    return history.weights * np.exp(-rate * np.maximum(ref_time - history.timestamps, 0.0))


def mix_without(
    long_term: np.ndarray,
    session: np.ndarray,
    session_mix: float,
    vectors: np.ndarray,
    long_term_mass: np.ndarray,
    session_mass: np.ndarray,
) -> np.ndarray:
    """The user vector without one item each: row c is `mix(L - a_c v_c, S - b_c v_c)` (float32,
    zeros where that is zero), with v_c = vectors[c], a_c its decayed mass in L and b_c its summed
    weight in the session. Leave-one-out pooling: a candidate is never similar to the user merely
    because the user's own past events on it are in the pooled vector."""
    v = np.asarray(vectors, dtype=np.float32).astype(np.float64)
    out = np.zeros(v.shape)
    for part, mass, share in ((long_term, long_term_mass, 1.0 - session_mix), (session, session_mass, session_mix)):
        if share <= 0.0:
            continue
        rows = part[None, :] - np.asarray(mass, dtype=np.float64)[:, None] * v
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        out += np.where(norms > _EPS, share * rows / np.maximum(norms, _EPS), 0.0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norms > _EPS, out / np.maximum(norms, _EPS), 0.0).astype(np.float32)
