"""Compact user profiles: one small byte string per user, item vectors looked up, not copied. The
only profile layout, and `fold_events` the only fold, for every store (in process, Redis, snapshots).

The full layout that came before (legacy.py reads it, to convert it) kept a float32 copy of every
history row's item vector and L and S in float64: ~45 KB per user at 20 events. A compact profile
keeps the same user model in ~2-4 KB:

* L (the long-term sum) in float32: rounding it once per event moves scores by ~1e-7;
* the history rows as item ids, times, weights and event types, without vectors: their vectors
  come from the item cache or the shared catalog when the profile is read (`VectorLookup`);
* S (the session sum) as S_hist + S_tail: S_hist is rebuilt from the history rows when read, and
  only S_tail, the part of the events that left the history rows, is stored (float32), and only
  while it still counts (its session mass above 1e-6 of the rows'; with a 5-minute session
  half-life it fades within about two hours of the last burst);
* the consumed-item memory (consumed.py) only for items no longer in the history rows: an item in
  the rows has its count, newest time and masses computed from them;
* the event-id ring for idempotency (8 bytes per id) and the counters.

A row whose item vector cannot be found when the profile is read (evicted from the item cache and
absent from the catalog) simply does not count: it leaves attention, the session sum and the head's
history features; L keeps what was folded while the vector was known. A row evicted from the history
while its vector is missing leaves the session sum the same way.

The layout is plain bytes (`encode` / `decode`), so the in-process store, the Redis store
(compact_redis.py) and snapshots hold exactly the same thing, and one fold (`fold_events`) serves
them all. Pure numpy, no I/O, no locks.
"""

from __future__ import annotations

import bisect
import math
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reranker.types import Event, EventType, RecordResult
from reranker.users import usermodel
from reranker.itemkeys import item_key, item_keys
from reranker.users.consumed import ConsumedItems
from reranker.users.profiles import (
    LocalStore, ProfileConfig, UnreadableProfile, UserState, event_id_hash, export_in_chunks, log_repair,
)

# (vectors (n, d) float32, found (n,) bool) for item ids; rows not found are ignored.
VectorLookup = Callable[[Sequence[str]], "tuple[np.ndarray, np.ndarray]"]

VERSION = 1
FLAG_SESSION_TAIL = 1
# seq, version, flags, rows, ids, ids_next, tail items, ref_time, updated_at, session-tail mass,
# event count, folded, repeats, consumed events. `seq` comes first: the Redis store's
# compare-and-set reads bytes 1-8.
_HEADER = struct.Struct("<QBBHIII ddd QQQQ".replace(" ", ""))
# The session tail is dropped once its mass is below this share of the session mass the history rows
# keep when any one item is left out (`_session_reference_mass`); an event leaving the rows with a
# smaller session term is not added to it (nor its vector looked up).
SESSION_TAIL_NEGLIGIBLE = 1e-6
_UPDATED_AT = 8  # the header field


class ProfileFormatError(UnreadableProfile):
    """A byte string that is not a compact profile of this dimension (`reason`: see UnreadableProfile)."""


_EVENT_TYPES = max(EventType) + 1  # row types are EventType values 0 .. _EVENT_TYPES - 1


@dataclass(slots=True)
class CompactProfile:
    """A decoded compact profile (mutable working copy; `encode` turns it back into bytes)."""

    long_term: np.ndarray  # float64 (d,): L relative to ref_time (stored float32)
    seq: int = 0  # bumped on every write (the Redis compare-and-set)
    ref_time: float = 0.0
    updated_at: float = 0.0
    event_count: int = 0
    folded: int = 0
    repeats: int = 0  # events on an item already consumed
    consumed_events: int = 0
    session_tail: np.ndarray | None = None  # float64 (d,): S of the events no longer in the rows
    session_tail_mass: float = 0.0  # sum of |w| exp(-mu (T - t)) over those events
    row_times: list[float] = field(default_factory=list)  # oldest first (event time)
    row_weights: list[float] = field(default_factory=list)
    row_types: list[int] = field(default_factory=list)
    row_ids: list[str] = field(default_factory=list)
    row_keys: list[int] = field(default_factory=list)  # itemkeys.item_keys of row_ids (hashed once, at the event)
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))  # event-id hashes (a ring)
    ids_next: int = 0  # where the next id goes once the ring is full
    tail: ConsumedItems = field(default_factory=ConsumedItems.empty)  # items no longer in the rows

    @staticmethod
    def new(dim: int) -> CompactProfile:
        return CompactProfile(np.zeros(dim))

    def has_id(self, hashed: int) -> bool:
        return bool(self.ids.size) and bool((self.ids == np.uint64(hashed)).any())

    def add_id(self, hashed: int, capacity: int) -> None:
        if capacity <= 0:
            return
        if self.ids.size < capacity:
            self.ids = np.append(self.ids, np.uint64(hashed))
            self.ids_next = self.ids.size % capacity
        else:
            if self.ids.size > capacity:  # the setting was lowered: keep the newest
                self.ids = np.concatenate([self.ids[self.ids_next :], self.ids[: self.ids_next]])[-capacity:]
                self.ids_next = 0
            elif self.ids_next >= capacity:  # filled under a larger setting: the oldest is at 0
                self.ids_next = 0
            self.ids[self.ids_next] = hashed
            self.ids_next = (self.ids_next + 1) % capacity


def encode(p: CompactProfile) -> bytes:
    """The profile as bytes (little-endian): header, float64 / uint64 arrays, float32 arrays, then
    the rows' id offsets, types and UTF-8 ids."""
    ids_utf8 = [item_id.encode("utf-8", "surrogatepass") for item_id in p.row_ids]
    n, t = len(p.row_ids), len(p.tail)
    flags = FLAG_SESSION_TAIL if p.session_tail is not None else 0
    parts = [
        _HEADER.pack(p.seq, VERSION, flags, n, p.ids.size, p.ids_next, t, float(p.ref_time), float(p.updated_at),
                     float(p.session_tail_mass), p.event_count, p.folded, p.repeats, p.consumed_events),
        np.asarray(p.row_times, dtype="<f8").tobytes(),
        np.asarray(p.row_keys, dtype="<u8").tobytes(),
        np.asarray(p.ids, dtype="<u8").tobytes(),
        np.asarray(p.tail.keys, dtype="<u8").tobytes(),
        np.asarray(p.tail.last, dtype="<f8").tobytes(),
        np.asarray(p.tail.mass, dtype="<f8").tobytes(),
        np.asarray(p.tail.session_mass, dtype="<f8").tobytes(),
        np.asarray(p.long_term, dtype="<f4").tobytes(),
    ]
    if p.session_tail is not None:
        parts.append(np.asarray(p.session_tail, dtype="<f4").tobytes())
    parts += [
        np.asarray(p.row_weights, dtype="<f4").tobytes(),
        np.asarray(p.tail.counts, dtype="<u4").tobytes(),
        np.cumsum([len(b) for b in ids_utf8], dtype=np.int64).astype("<u4").tobytes(),
        np.asarray(p.row_types, dtype=np.uint8).tobytes(),
        b"".join(ids_utf8),
    ]
    return b"".join(parts)


def decode(blob: bytes, dim: int) -> CompactProfile:
    """The working copy of a profile written by `encode`. Raises ProfileFormatError, with its
    `reason`, for anything else: a wrong size or layout, an unknown version, flag or event type, a
    row id that is not UTF-8, a number that is not finite, a history row after the profile's clock."""
    header = _read_header(blob, dim)
    (seq, _, flags, n, n_ids, ids_next, t, ref_time, updated_at, session_tail_mass, count, folded, repeats,
     consumed_events) = header
    reader = _Reader(blob, _HEADER.size)
    row_times, row_keys = reader.take("<f8", n), reader.take("<u8", n)
    ids = reader.take("<u8", n_ids).astype(np.uint64)
    tail_keys = reader.take("<u8", t)
    tail_floats = reader.take("<f8", 3 * t)  # newest times, masses, session masses
    long_term = reader.take("<f4", dim).astype(np.float64)
    session_tail = reader.take("<f4", dim).astype(np.float64) if flags & FLAG_SESSION_TAIL else None
    row_weights, tail_counts = reader.take("<f4", n), reader.take("<u4", t)
    ends, types = reader.take("<u4", n).tolist(), reader.take("u1", n).tolist()
    times, weights = row_times.tolist(), row_weights.astype(np.float64).tolist()
    # NaN and inf carry through a sum, which the finite numbers of a profile cannot overflow (times,
    # and masses and sums of weights up to float32's max: far below float64's).
    total = ref_time + updated_at + session_tail_mass + sum(times) + sum(weights) + float(long_term.sum())
    total += float(tail_floats.sum()) + (0.0 if session_tail is None else float(session_tail.sum()))
    if not math.isfinite(total):
        raise ProfileFormatError("compact profile holds a number that is not finite", "non_finite")
    if n and (max(types) >= _EVENT_TYPES or max(times) > ref_time):
        raise ProfileFormatError("compact profile rows: an unknown event type, or an event after the profile's clock")
    row_ids = _row_ids(blob[reader.at:], ends)
    tail = ConsumedItems(tail_keys.astype(np.uint64), tail_counts.astype(np.int64), *(column.copy() for column in
                                                                                      tail_floats.reshape(3, t)))
    return CompactProfile(
        long_term, seq, ref_time, updated_at, count, folded, repeats, consumed_events, session_tail, session_tail_mass,
        times, weights, types, row_ids, row_keys.tolist(), ids, ids_next, tail,
    )


def _read_header(blob: bytes, dim: int) -> tuple:
    """The header fields, once the version, flags and sizes it states are checked against the blob."""
    if len(blob) < _HEADER.size:
        raise ProfileFormatError(f"a compact profile is at least {_HEADER.size} bytes, got {len(blob)}")
    header = _HEADER.unpack_from(blob)
    _, version, flags, n, n_ids, ids_next, t = header[:7]
    if version != VERSION:
        raise ProfileFormatError(f"compact profile version {version}; this build reads {VERSION}")
    if flags & ~FLAG_SESSION_TAIL:
        raise ProfileFormatError(f"compact profile flags {flags:#x}; this build knows {FLAG_SESSION_TAIL:#x}")
    vectors = dim * (2 if flags & FLAG_SESSION_TAIL else 1)
    fixed = _HEADER.size + 8 * (2 * n + n_ids + 4 * t) + 4 * (vectors + n + t + n) + n  # all but the ids' text
    if len(blob) < fixed:
        raise ProfileFormatError(f"truncated compact profile: {len(blob)} bytes, its header says at least {fixed}")
    if ids_next > n_ids:
        raise ProfileFormatError(f"compact profile's id ring has {n_ids} ids, its next slot is {ids_next}")
    return header


class _Reader:
    """Arrays read one after the other from a blob (views, no copies)."""

    __slots__ = ("blob", "at")

    def __init__(self, blob: bytes, at: int) -> None:
        self.blob, self.at = blob, at

    def take(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.blob, dtype=dtype, count=count, offset=self.at)
        self.at += out.nbytes
        return out


def _row_ids(text: bytes, ends: list[int]) -> list[str]:
    """The rows' item ids from their UTF-8 text and where each ends."""
    slices = [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]
    if sum(map(len, slices)) != len(text) or (ends and ends[-1] != len(text)):  # offsets that go back read more
        raise ProfileFormatError(f"compact profile ids take {len(text)} bytes, the offsets say otherwise")
    try:
        return [item_id.decode("utf-8", "surrogatepass") for item_id in slices]
    except UnicodeDecodeError as exc:
        raise ProfileFormatError(f"a compact profile row id is not UTF-8 ({exc.reason})", "bad_utf8") from None


def fold_events(
    p: CompactProfile, events: Sequence[tuple[Event, np.ndarray | None]], now: float, config: ProfileConfig,
    lookup: VectorLookup,
) -> tuple[RecordResult, int]:
    """Fold one user's events into `p` in order; returns (counts, repeats among them). The same
    arithmetic as the full profile's fold for L (float64, stored float32); S and the consumed
    memory are split between the history rows and their tail (module docstring)."""
    c = config
    accepted = duplicates = without = repeats = 0
    for event, vector in events:
        if event.event_id:
            hashed = event_id_hash(event.event_id)
            if p.has_id(hashed):
                duplicates += 1
                continue
            p.add_id(hashed, c.max_event_ids)
        accepted += 1
        p.event_count += 1
        p.updated_at = now
        key = item_key(event.item_id)
        repeat = key in p.row_keys or bool(len(p.tail)) and bool(p.tail.positions(np.array([key], np.uint64))[1][0])
        p.consumed_events += 1
        p.repeats += repeat
        repeats += repeat
        if vector is None:
            without += 1
            p.tail.add(key, event.timestamp, 0.0, tail_capacity(c))
            continue
        weight = c.weight_of(event)
        previous, first = p.ref_time, p.folded == 0
        p.ref_time = usermodel.fold(p.long_term, p.ref_time, first, event.timestamp, weight, vector, c.decay_rate)
        session_factor = usermodel.frame_factor(previous, p.ref_time, first, c.session_rate)
        p.tail.rescale(usermodel.frame_factor(previous, p.ref_time, first, c.decay_rate), session_factor)
        if p.session_tail is not None and session_factor != 1.0:
            p.session_tail *= session_factor
            p.session_tail_mass *= session_factor
        p.folded += 1
        at = bisect.bisect_right(p.row_times, event.timestamp)
        for column, value in ((p.row_times, event.timestamp), (p.row_weights, weight), (p.row_types, int(event.type)),
                              (p.row_ids, event.item_id), (p.row_keys, key)):
            column.insert(at, value)  # type: ignore[attr-defined]
        while len(p.row_ids) > c.max_history:
            _evict_oldest_row(p, vector if at == 0 else None, c, lookup)
            at -= 1
    _drop_negligible_session_tail(p, c)
    return RecordResult(accepted, duplicates, without), repeats


def _evict_oldest_row(p: CompactProfile, vector: np.ndarray | None, c: ProfileConfig, lookup: VectorLookup) -> None:
    """Move the oldest history row into the tail: its masses into the consumed memory, its session
    term into S_tail (its vector looked up; `vector` when it is the event just folded)."""
    t, w, item_id, key = p.row_times.pop(0), p.row_weights.pop(0), p.row_ids.pop(0), p.row_keys.pop(0)
    p.row_types.pop(0)
    mass = w * math.exp(-c.decay_rate * max(p.ref_time - t, 0.0))
    session_mass = w * math.exp(-c.session_rate * max(p.ref_time - t, 0.0))
    if abs(session_mass) <= SESSION_TAIL_NEGLIGIBLE * _session_reference_mass(p, c):
        session_mass = 0.0  # a negligible session term: not kept, no vector needed
    elif vector is None:
        found_vectors, found = lookup([item_id])
        vector = found_vectors[0] if found[0] else None
    if vector is None:
        session_mass = 0.0  # no vector: this event leaves the session sum (it does not count)
    elif session_mass != 0.0:
        if p.session_tail is None:
            p.session_tail = np.zeros(p.long_term.shape[0])
        p.session_tail += session_mass * np.asarray(vector, dtype=np.float32).astype(np.float64)
        p.session_tail_mass += abs(session_mass)
    p.tail.add(key, t, mass, tail_capacity(c), session_mass)


def tail_capacity(c: ProfileConfig) -> int:
    """Consumed items remembered beyond the history rows: with the rows, the `max_consumed` most
    recently consumed items, as the full layout remembers."""
    return max(0, c.max_consumed - c.max_history)


def _session_reference_mass(p: CompactProfile, c: ProfileConfig) -> float:
    """The session mass (sum of |w| exp(-mu (T - t))) of the history rows less the largest share one
    item has in it: what is left of the session when any one item is left out, as the leave-one-out
    similarities leave out a consumed candidate. 0 when the rows are one item (or none)."""
    if not p.row_times:
        return 0.0
    masses = np.abs(p.row_weights) * np.exp(-c.session_rate * np.maximum(p.ref_time - np.asarray(p.row_times), 0.0))
    _, item = np.unique(np.asarray(p.row_keys, dtype=np.uint64), return_inverse=True)
    return float(masses.sum() - np.bincount(item, weights=masses).max())


def _drop_negligible_session_tail(p: CompactProfile, c: ProfileConfig) -> None:
    """Stop storing S_tail once it is negligible next to the session that is left when any one item
    is left out (a user whose newest event follows a long pause keeps it until the next event)."""
    if p.session_tail is not None and p.session_tail_mass <= SESSION_TAIL_NEGLIGIBLE * _session_reference_mass(p, c):
        p.session_tail, p.session_tail_mass = None, 0.0


def stored_updated_at(blob: bytes) -> float:
    """When a stored profile last took an event (its header only, no decoding)."""
    return float(_HEADER.unpack_from(blob)[_UPDATED_AT])


def repair_future_clock(p: CompactProfile, now: float, config: ProfileConfig, lookup: VectorLookup) -> bool:
    """Re-anchor a reference time more than `max_clock_ahead` after `now` (usermodel.repair_future_clock
    on L and S; the tail follows: rescaled with an exact repair, dropped with a rebuild); True when repaired."""
    c = config
    if p.folded == 0 or not p.ref_time > now + c.max_clock_ahead:
        return False
    history, _ = _rows_history(p, lookup, found_only=False)
    session = usermodel.decayed_sum(history, p.ref_time, c.session_rate)
    if p.session_tail is not None:
        session = session + p.session_tail
    fixed = usermodel.repair_future_clock(p.long_term, session, p.ref_time, history, now, c.decay_rate, c.session_rate)
    ahead = p.ref_time - now
    if fixed.exact:
        p.tail.rescale(math.exp(c.decay_rate * ahead), math.exp(c.session_rate * ahead))
        if p.session_tail is not None:
            p.session_tail = p.session_tail * math.exp(c.session_rate * ahead)
            p.session_tail_mass *= math.exp(c.session_rate * ahead)
    else:  # L and S were rebuilt from the rows: the tail's terms are gone from them
        p.tail.mass[:] = 0.0
        p.tail.session_mass[:] = 0.0
        p.session_tail, p.session_tail_mass = None, 0.0
    p.tail.last = np.minimum(p.tail.last, now)
    p.long_term = np.asarray(fixed.long_term, dtype=np.float64)
    p.ref_time = now
    p.row_times = [min(t, now) for t in p.row_times]
    return True


def _rows_history(p: CompactProfile, lookup: VectorLookup, *, found_only: bool = True
                  ) -> tuple[usermodel.History, np.ndarray]:
    """The history rows with their looked-up vectors (rows without one dropped, or zero with
    `found_only=False`), and which rows had one."""
    dim = p.long_term.shape[0]
    if not p.row_ids:
        return usermodel.History.empty(dim), np.zeros(0, dtype=bool)
    vectors, found = lookup(p.row_ids)
    found = np.asarray(found, dtype=bool)
    times, weights = np.asarray(p.row_times, dtype=np.float64), np.asarray(p.row_weights, dtype=np.float64)
    vectors = np.asarray(vectors, dtype=np.float32)
    if found.all():
        return usermodel.History(tuple(p.row_ids), times, weights, vectors), found
    if not found_only:
        return usermodel.History(tuple(p.row_ids), times, weights, np.where(found[:, None], vectors, np.float32(0.0))), found
    keep = np.flatnonzero(found)
    history = usermodel.History(tuple(p.row_ids[i] for i in keep.tolist()), times[keep], weights[keep], vectors[keep])
    return history, found


def user_state(user_id: str, p: CompactProfile, config: ProfileConfig, lookup: VectorLookup, *,
               recent: bool = True) -> UserState:
    """The scoring state of a compact profile: the rows' vectors looked up (rows without one left
    out), S = S_hist + S_tail, the consumed memory of the rows and the tail merged. `recent` events
    are the history rows (event-time order; ids of the events are not kept)."""
    c = config
    history, found = _rows_history(p, lookup)
    session = usermodel.decayed_sum(history, p.ref_time, c.session_rate)
    if p.session_tail is not None:
        session = session + p.session_tail
    consumed = _merged_consumed(p, found, c)
    recent_events: tuple[Event, ...] = ()
    if recent and c.max_recent > 0:
        rows = list(zip(p.row_ids, p.row_types, p.row_times, p.row_weights))[-c.max_recent :]
        recent_events = tuple(Event(user_id, item_id, EventType(kind), ts, "", None, weight)
                              for item_id, kind, ts, weight in rows)
    long_term = p.long_term.copy()
    for array in (long_term, session, history.timestamps, history.weights, history.vectors):
        array.flags.writeable = False
    state = UserState(user_id, long_term, p.ref_time, p.event_count, p.updated_at, recent_events, history, session,
                      consumed)
    if found.all():  # the history is the rows: their keys are known (profiles.candidate_history reads them)
        state.derived["history_keys"] = np.asarray(p.row_keys, dtype=np.uint64)
    return state


def _merged_consumed(p: CompactProfile, found: np.ndarray, c: ProfileConfig) -> ConsumedItems:
    """The consumed memory a full profile would hold: the tail plus every history row (its mass in L
    always; in S only when its vector was `found`, as S_hist was rebuilt from those rows only)."""
    if c.max_consumed <= 0:
        return ConsumedItems.empty().freeze()
    tail = p.tail
    if not p.row_ids:
        out = tail.copy()
    else:
        times, weights = np.asarray(p.row_times), np.asarray(p.row_weights)
        age = np.maximum(p.ref_time - times, 0.0)
        keys = np.concatenate([tail.keys, np.asarray(p.row_keys, dtype=np.uint64)])
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
        columns = (
            np.concatenate([tail.counts, np.ones(len(p.row_ids), np.int64)]),
            np.concatenate([tail.last, times]),
            np.concatenate([tail.mass, weights * np.exp(-c.decay_rate * age)]),
            np.concatenate([tail.session_mass, weights * np.exp(-c.session_rate * age) * found]),
        )
        if starts.size == keys.size:  # no item twice: a permutation
            counts, last, mass, session_mass = (column[order] for column in columns)
        else:
            counts, mass, session_mass = (np.add.reduceat(columns[j][order], starts) for j in (0, 2, 3))
            last = np.maximum.reduceat(columns[1][order], starts)
            keys = keys[starts]
        out = ConsumedItems(keys, counts, last, mass, session_mass)
    out.repeats, out.events = p.repeats, p.consumed_events
    return out.freeze()


def table_lookup(index: Mapping[str, int], vectors: np.ndarray) -> VectorLookup:
    """A VectorLookup over a fixed table: `index` maps an item id to its row of `vectors`."""
    table = np.asarray(vectors, dtype=np.float32)

    def lookup(item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.array([index.get(item_id, -1) for item_id in item_ids], dtype=np.int64)
        found = rows >= 0
        if not len(table):
            return np.zeros((len(rows), table.shape[-1]), dtype=np.float32), np.zeros(len(rows), dtype=bool)
        return table[np.maximum(rows, 0)], found

    return lookup


class CompactProfileStore(LocalStore):
    """Compact profiles (byte strings; history vectors read through `lookup`) in this process (see
    LocalStore)."""

    backend = "in-process"
    layout = "compact"

    def __init__(self, config: ProfileConfig, lookup: VectorLookup, *, max_users: int, ttl_seconds: float,
                 max_states: int = 0, lock: AbstractContextManager[Any] | None = None) -> None:
        super().__init__(config, max_users=max_users, ttl_seconds=ttl_seconds, max_states=max_states, lock=lock)
        self.lookup = lookup

    def apply(self, events: Sequence[tuple[Event, np.ndarray | None]], now: float) -> RecordResult:
        """Fold events, one user's run of them at a time (at most 64 per lock hold)."""
        total = RecordResult()
        for user_id, run in _runs_by_user(events, 64):
            with self._lock:
                blob = self._profiles.get(user_id)
                p = CompactProfile.new(self.dim) if blob is None else decode(blob, self.dim)
                if repair_future_clock(p, now, self.config, self.lookup):
                    self.repairs += 1
                result, repeats = fold_events(p, run, now, self.config, self.lookup)
                self._profiles[user_id] = encode(p)  # (re)insert refreshes the TTL
                if result.accepted:
                    self._states.pop(user_id, None)
                self.repeats += repeats
                self.consumed_events += result.accepted
            total = total + result
        return total

    def get(self, user_id: str, *, recent: bool = True) -> UserState | None:
        # The caches are read by [] (the same LRU touch and expiry check): their .get() runs the
        # check twice, through a few more Python calls.
        with self._lock:
            try:
                blob = self._profiles[user_id]
            except KeyError:
                self.misses += 1
                self._states.pop(user_id, None)
                return None
            self.hits += 1
            if not recent and self._states.maxsize:
                try:
                    return self._states[user_id]
                except KeyError:
                    pass
        state = user_state(user_id, decode(blob, self.dim), self.config, self.lookup, recent=recent)
        if not recent and self._states.maxsize:
            with self._lock:
                if self._profiles.get(user_id) is blob:  # not replaced meanwhile
                    self._states[user_id] = state
        return state

    def held_bytes(self, user_id: str) -> int:
        """Bytes held for one user (the byte string, with its object header); 0 if unknown."""
        with self._lock:
            blob = self._profiles.get(user_id)
            return 0 if blob is None else sys.getsizeof(blob)

    # --- snapshot support ------------------------------------------------------------------------
    def export_chunks(self, size: int) -> Iterator[list[tuple[str, bytes]]]:
        """(user id, profile bytes) of all live profiles, `size` users per list (bytes are immutable:
        no copy; see profiles.export_in_chunks)."""
        return export_in_chunks(self._profiles, self._lock, size, lambda blob: blob)

    def restore(self, user_id: str, blob: bytes, now: float | None = None) -> bool:
        """Put a profile (from a snapshot) in place, repaired first when its clock is ahead of `now`."""
        p = decode(blob, self.dim)
        ahead = p.ref_time - (now or 0.0)
        repaired = now is not None and repair_future_clock(p, now, self.config, self.lookup)
        if repaired:
            log_repair("snapshot", user_id, ahead, self.config.log_salt)
            blob = encode(p)
        with self._lock:
            self.repairs += repaired
            self._profiles[user_id] = blob
            self._states.pop(user_id, None)
        return repaired


def events_by_user(events: Sequence[tuple[Event, np.ndarray | None]]
                   ) -> dict[str, list[tuple[Event, np.ndarray | None]]]:
    """Each user's events in their order (users in first-seen order)."""
    by_user: dict[str, list[tuple[Event, np.ndarray | None]]] = {}
    for pair in events:
        by_user.setdefault(pair[0].user_id, []).append(pair)
    return by_user


def _runs_by_user(events: Sequence[tuple[Event, np.ndarray | None]], limit: int
                  ) -> Iterator[tuple[str, list[tuple[Event, np.ndarray | None]]]]:
    """Each user's events in their order, in runs of at most `limit` (users in first-seen order)."""
    for user_id, pairs in events_by_user(events).items():
        for start in range(0, len(pairs), limit):
            yield user_id, pairs[start : start + limit]
