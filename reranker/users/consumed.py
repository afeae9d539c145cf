"""Consumed items: which candidates a user already interacted with, how often, when, and how much
each one weighs in the user's long-term vector. Pure numpy, no I/O, no locks.

Real upstream lists contain items the user already consumed. Whether those should rise or sink
depends on the domain (rare repeats in movies, frequent in music or groceries), so the profile
keeps what is needed to learn it:

* per consumed item (at most `capacity`, the least recently consumed dropped first): a stable
  64-bit key of the item id, the number of events on it, the time of the newest one, and its
  decayed masses in the long-term sum L and the session sum S (the same exp(-rate (T - t))
  frames as L and S, so L - mass_c v_c and S - session_mass_c v_c are L and S without item c:
  similarity features never credit a candidate for matching its own past events);
* per user: how many events were repeats of an item already consumed (the user's repeat rate).

Items are keyed by `reranker.itemkeys.item_keys` (the same keys in every process: snapshots and
Redis store them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

@dataclass(slots=True)
class ConsumedItems:
    """One user's consumed-item memory; arrays sorted by key (binary search on lookup)."""

    keys: np.ndarray  # uint64 (n,), sorted
    counts: np.ndarray  # int64 (n,)
    last: np.ndarray  # float64 (n,): newest event time on the item
    mass: np.ndarray  # float64 (n,): sum of w * exp(-lambda (ref - t)) over the item's events with a vector
    session_mass: np.ndarray  # float64 (n,): the same with the session's rate (its share of S)
    repeats: int = 0  # events on an item that was already in memory
    events: int = 0  # events seen

    @staticmethod
    def empty() -> ConsumedItems:
        return ConsumedItems(
            np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0), np.zeros(0)
        )

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.counts, self.last, self.mass, self.session_mass))

    def __len__(self) -> int:
        return int(self.keys.size)

    def copy(self) -> ConsumedItems:
        return ConsumedItems(
            self.keys.copy(), self.counts.copy(), self.last.copy(), self.mass.copy(), self.session_mass.copy(),
            self.repeats, self.events,
        )

    @property
    def repeat_rate(self) -> float:
        """Share of this user's events that went to an item already consumed (0 with no events)."""
        return self.repeats / self.events if self.events else 0.0

    def add(self, key: int, timestamp: float, mass: float, capacity: int, session_mass: float = 0.0) -> bool:
        """Count one event on the item `key` (mass, session_mass: its weight in L's and S's current
        frames, 0 without a vector); True when the item was already consumed (a repeat)."""
        self.events += 1
        k = np.uint64(key)
        at = int(np.searchsorted(self.keys, k))
        if at < self.keys.size and self.keys[at] == k:
            self.repeats += 1
            self.counts[at] += 1
            self.last[at] = max(self.last[at], timestamp)
            self.mass[at] += mass
            self.session_mass[at] += session_mass
            return True
        if capacity <= 0:
            return False
        if self.keys.size >= capacity:  # forget the least recently consumed item
            drop = int(np.argmin(self.last))
            self.keys, self.counts = _removed(self.keys, drop), _removed(self.counts, drop)
            self.last, self.mass = _removed(self.last, drop), _removed(self.mass, drop)
            self.session_mass = _removed(self.session_mass, drop)
            at = int(np.searchsorted(self.keys, k))
        self.keys = _inserted(self.keys, at, k)
        self.counts = _inserted(self.counts, at, 1)
        self.last = _inserted(self.last, at, timestamp)
        self.mass = _inserted(self.mass, at, mass)
        self.session_mass = _inserted(self.session_mass, at, session_mass)
        return False

    def rescale(self, factor: float, session_factor: float = 1.0) -> None:
        """L and S were multiplied by these factors (a newer event moved their reference time): masses follow."""
        if factor != 1.0:
            self.mass *= factor
        if session_factor != 1.0:
            self.session_mass *= session_factor

    def positions(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in this memory, found) per key (binary search; the memory must not be empty).
        A position is one to read only where found (a key above every memory key gets `len(self)`)."""
        pos = self.keys.searchsorted(keys)
        return pos, self.keys.take(pos, mode="clip") == keys  # clip: that key compares with the last

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(counts, last times, masses, session masses) for candidate keys; 0, -inf, 0, 0 where never consumed."""
        n = keys.size
        counts, last, mass, session = np.zeros(n), np.full(n, -math.inf), np.zeros(n), np.zeros(n)
        if n == 0 or self.keys.size == 0:
            return counts, last, mass, session
        pos, hit = self.positions(keys)
        at = pos[hit]
        counts[hit], last[hit], mass[hit], session[hit] = self.counts[at], self.last[at], self.mass[at], self.session_mass[at]
        return counts, last, mass, session

    def freeze(self) -> ConsumedItems:
        """A read-only copy (shared between readers of one profile version)."""
        out = self.copy()
        for array in (out.keys, out.counts, out.last, out.mass, out.session_mass):
            array.flags.writeable = False
        return out


def _inserted(array: np.ndarray, at: int, value: object) -> np.ndarray:
    """`array` with `value` inserted before position `at` (np.insert without its generality, ~4x faster)."""
    out = np.empty(array.size + 1, dtype=array.dtype)
    out[:at], out[at], out[at + 1 :] = array[:at], value, array[at:]
    return out


def _removed(array: np.ndarray, at: int) -> np.ndarray:
    return np.concatenate((array[:at], array[at + 1 :]))


def hours_between(last: np.ndarray, newest: float) -> np.ndarray:
    """Hours from `last` to `newest` (>= 0; inf where `last` is -inf, i.e. never consumed)."""
    if math.isfinite(newest):  # no inf - inf: nothing to silence (errstate costs more than the arithmetic)
        out = np.maximum(newest - last, 0.0) / 3600.0
    else:
        with np.errstate(invalid="ignore"):
            out = np.maximum(newest - last, 0.0) / 3600.0
    out[~np.isfinite(last)] = math.inf
    return out
