"""Pure user-model math: decayed long-term and session pooling, mix, bounded influence. No I/O, no locks.

Notation: event i has the L2-normalized item vector v_i, a weight w_i (per event type; negative for
dislike/skip) and an event time t_i; lambda = ln 2 / half_life, mu = ln 2 / session_half_life.

* long-term  L = sum_i w_i * exp(-lambda * (T - t_i)) * v_i, kept relative to T = the newest event
  time seen. A newer event rescales L once and adds; an older (out-of-order) one is added with its
  own decay factor. Both are O(d) and give exactly the L a recomputation from scratch would.
* session    S = sum_i w_i * exp(-mu * (T - t_i)) * v_i: the same fold with a short half-life (5
  minutes by default), kept next to L relative to the same T. A user who comes back after a pause
  and clicks something new has a session about that click at once (the older terms have decayed).
* user       u = normalize((1 - m) * L / |L| + m * S / |S|), m = `session_mix`; a zero part adds
  nothing, and u is None (cold user) when the sum is zero.

Only directions matter (cosine scoring), so L and S never need rescaling to "now": the user vector
of a profile does not change while nothing happens, and replaying history gives the same result.

Bounded influence. The service accepts an event only with |w| <= W (`max_event_weight`)
and t <= now (later times up to `max_event_skew_seconds` are clamped to now, the rest refused).
Because L and S are exponentially decayed sums, the only change one event makes to either is its
own term c * v; no other event's term changes relative to the others (there is no session
membership an event could bridge or push another event out of). Relative to T its coefficient is
w * exp(rate * (t - T)), and since t <= now and |w| <= W that is at most W * exp(rate * (now - T))
in magnitude, the coefficient of an event of weight W at "now" on the same item, with the same
sign. Along the ray X + c * v the angle to X grows with |c|, so:

    angle(X, X') <= angle(X, X''_s)   for X in {L, S}, s = sign(w),

where X'' is the part after an event of weight s * W at now on the same item. The user vector
with m = 0 is L/|L| and with m = 1 is S/|S|, so there one event moves u by no more than that
max-weight event at now would (tight). For 0 < m < 1 the mix of two unit vectors is not monotone
in that way (counterexamples exist in 2-3 dimensions), and the bound that holds is the one the
parts imply: with M = (1 - m) L/|L| + m S/|S| (|u - u'| <= 2 |M - M'| / |M|),

    |u' - u| <= min(2, 2 * ((1 - m) * |Lh''_s - Lh| + m * |Sh''_s - Sh|) / |M|)

(Lh, Sh: the unit parts). `influence_bound` computes it; tests/test_event_hygiene.py checks all
three through a real server on every write path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_EPS = 1e-9
_TINY = 1e-290  # parts smaller than this are zero (their float64 components would be subnormal)
_CANCELLED = 1e-5  # a leave-one-out remainder below this share of its part is empty (see mix_without)


def decay_rate(half_life_seconds: float) -> float:
    """lambda such that exp(-lambda * half_life) = 1/2."""
    return math.log(2.0) / half_life_seconds


def fold(long_term: np.ndarray, ref_time: float, first: bool, timestamp: float, weight: float,
         vector: np.ndarray, rate: float, session: np.ndarray | None = None, session_rate: float = 0.0) -> float:
    """Add one event to the float64 `long_term` (and `session`, when given) in place (O(d));
    returns the new reference time.

    `first` is True when no event with a vector was folded before (the reference time is unset).
    The arithmetic is in float64 in this exact order; the Redis Lua script does the same steps.
    """
    v = np.asarray(vector, dtype=np.float32).astype(np.float64)  # item vectors are float32 everywhere
    if first:
        ref_time = timestamp
    parts = ((long_term, rate),) if session is None else ((long_term, rate), (session, session_rate))
    if timestamp >= ref_time:
        for part, part_rate in parts:
            if timestamp > ref_time:
                part *= math.exp(-part_rate * (timestamp - ref_time))
            part += weight * v
        return timestamp
    for part, part_rate in parts:
        part += (weight * math.exp(-part_rate * (ref_time - timestamp))) * v
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


def decayed_sum(history: History, ref_time: float, rate: float) -> np.ndarray:
    """sum_i w_i * exp(-rate * (T - t_i)) * v_i over the history rows (float64; zeros when empty).

    What L or S would be if the history were all the user ever did: the repair of a profile whose
    clock ran ahead rebuilds from it, and a profile saved before S was kept gets its S from it."""
    if not len(history):
        return np.zeros(history.vectors.shape[1])
    return decayed_weights(history, ref_time, rate) @ history.vectors.astype(np.float64)


def mix(long_term: np.ndarray, session: np.ndarray, session_mix: float) -> np.ndarray | None:
    """u = normalize((1 - m) * L/|L| + m * S/|S|) as float32, or None when it is zero."""
    out = np.zeros(long_term.shape, dtype=np.float64)
    for part, share in ((long_term, 1.0 - session_mix), (session, session_mix)):
        norm = float(np.linalg.norm(part))
        # Zero only when it is (all its terms decayed below float range): an absolute threshold such
        # as 1e-9 made a profile go cold when its newest event had weight ~0 and the older terms
        # were decayed against it, though the direction was still well defined.
        if norm > _TINY and share > 0.0:
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
    because the user's own past events on it are in the pooled vector. A remainder below 1e-5 of
    its part counts as zero: the rest is negligible next to the item, and its direction would be
    rounding noise of the sum."""
    v = np.asarray(vectors, dtype=np.float32).astype(np.float64)
    out = np.zeros(v.shape)
    for part, mass, share in ((long_term, long_term_mass, 1.0 - session_mix), (session, session_mass, session_mix)):
        if share <= 0.0:
            continue
        rows = part[None, :] - np.asarray(mass, dtype=np.float64)[:, None] * v
        norms = _row_norms(rows)
        # What is left of a part once the item is taken out is empty below 1e-5 of the part: the
        # rest then weighs less than the item 1 : 100,000 (e.g. it is 17 half-lives older), and its
        # direction is within the rounding of the sum it was taken from (a float32 L, as a compact
        # profile stores it, holds ~1e-7 of its norm; a float64 sum folded event by event ~1e-16
        # per event), so both layouts call it empty rather than rank by rounding noise.
        floor = max(_TINY, _CANCELLED * float(np.sqrt(np.dot(part, part))))
        out += np.where(norms > floor, share * rows / np.maximum(norms, _TINY), 0.0)
    norms = _row_norms(out)
    return np.where(norms > _EPS, out / np.maximum(norms, _EPS), 0.0).astype(np.float32)


def _row_norms(rows: np.ndarray) -> np.ndarray:
    """np.linalg.norm(rows, axis=1, keepdims=True) of a real 2-d array, the same operations without
    its argument handling (a dozen Python calls per use on the Rerank path)."""
    return np.sqrt(np.add.reduce(rows * rows, axis=1, keepdims=True))
# A profile clock ahead of now by more than this many decay lengths (rate * ahead) is rebuilt from
# its history rows instead of rescaled: exp(20) ~ 5e8 keeps the subtraction below accurate to ~1e-7.
_EXACT_REPAIR_LIMIT = 20.0


@dataclass(frozen=True, slots=True)
class Repaired:
    long_term: np.ndarray
    session: np.ndarray
    ref_time: float
    history: History
    exact: bool  # False: L was rebuilt from the history rows (older terms were lost to the future clock anyway)


def repair_future_clock(long_term: np.ndarray, session: np.ndarray, ref_time: float, history: History, now: float,
                        rate: float, session_rate: float) -> Repaired:
    """A profile whose reference time T is after `now` (a future event folded by an older build, or
    a server clock that jumped back): every event at or before now would be decayed against T and
    count for almost nothing. The repair moves the events after now to now and re-expresses L and S
    relative to now, as if those events had come in at now:

    * their terms (they are the newest, so they are in the history rows) are taken out of L and S,
      the rest is rescaled by exp(rate * (T - now)), and the events are added back at now;
    * when T is so far ahead that the older terms have decayed below float precision (rate * (T -
      now) > 20), L and S are rebuilt from the history rows instead, with times clamped to now.
    """
    times = np.minimum(history.timestamps, now)
    future = history.timestamps > now
    fixed_history = History(history.item_ids, times, history.weights, history.vectors)
    ahead = ref_time - now
    exact = rate * ahead <= _EXACT_REPAIR_LIMIT and session_rate * ahead <= _EXACT_REPAIR_LIMIT
    parts = []
    for part, part_rate in ((long_term, rate), (session, session_rate)):
        if exact:
            taken = decayed_weights(history, ref_time, part_rate) * future
            rest = np.asarray(part, dtype=np.float64) - taken @ history.vectors.astype(np.float64)
            rest = rest * math.exp(part_rate * ahead)
            parts.append(rest + (history.weights * future) @ history.vectors.astype(np.float64))
        else:
            parts.append(decayed_sum(fixed_history, now, part_rate))
    return Repaired(parts[0], parts[1], now, fixed_history, exact)


def influence_bound(before_long: np.ndarray | None, before_session: np.ndarray | None,
                    after_long: np.ndarray | None, after_session: np.ndarray | None, session_mix: float) -> float:
    """The bound on |u' - u| for 0 < m < 1 (module docstring), from unit parts before (Lh, Sh) and
    after the max-weight event at now (Lh'', Sh''); None = a zero part. 2 when u was None."""
    def moved(a: np.ndarray | None, b: np.ndarray | None) -> float:
        if a is None and b is None:
            return 0.0
        if a is None or b is None:
            return 1.0
        return float(np.linalg.norm(np.asarray(b, np.float64) - np.asarray(a, np.float64)))

    m = session_mix
    mixed = np.zeros(0)
    for part, share in ((before_long, 1.0 - m), (before_session, m)):
        if part is not None and share > 0:
            mixed = share * np.asarray(part, np.float64) + (mixed if len(mixed) else 0.0)
    norm = float(np.linalg.norm(mixed)) if len(mixed) else 0.0
    if norm <= _EPS:
        return 2.0
    spread = (1.0 - m) * moved(before_long, after_long) + m * moved(before_session, after_session)
    return min(2.0, 2.0 * spread / norm)
