"""IntRowIndex: int64 key -> row number, looked up for a whole array of keys at once.

The packed Rerank form carries item ids as an int64 array; looking each one up in a Python dict
would cost one Python call per candidate. This is an open-addressing hash table (linear probing,
Fibonacci hashing, load factor at most 1/2) held in two numpy arrays, so a lookup of n keys is a
few array operations per probe round (one or two rounds for almost every key), whatever n is.

Writes (set / delete) are scalar Python: they happen when items are cached or evicted, off the
Rerank hot path. Deletes leave tombstones; the table is rebuilt when they pile up.
"""

from __future__ import annotations

import numpy as np

_EMPTY = -1
_DELETED = -2
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: Fibonacci hashing spreads consecutive keys
_MASK64 = (1 << 64) - 1
_GOLDEN_U64 = np.uint64(_GOLDEN)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def decimal_key(item_id: str) -> int | None:
    """The int64 an item id stands for when it is a canonical decimal ("42", "-7"; not "042",
    "+7", " 7" or "4.0"), else None. Integer ids and these strings are one key space."""
    digits = item_id[1:] if item_id[:1] == "-" else item_id
    if not (digits.isascii() and digits.isdigit()):
        return None
    value = int(item_id)
    if str(value) != item_id or not INT64_MIN <= value <= INT64_MAX:
        return None
    return value


class IntRowIndex:
    """A mutable map from int64 keys to non-negative ints (rows), with a vectorized `get`."""

    def __init__(self, capacity: int = 1024) -> None:
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        size = 16
        while size < 2 * capacity:
            size *= 2
        self._bits = size.bit_length() - 1
        self._shift = np.uint64(64 - self._bits)  # _homes' shift, made once per table
        self._keys = np.zeros(size, dtype=np.int64)
        self._rows = np.full(size, _EMPTY, dtype=np.int64)
        self._live = 0
        self._used = 0  # live entries plus tombstones

    def __len__(self) -> int:
        return self._live

    def _home(self, key: int) -> int:
        return (((key & _MASK64) * _GOLDEN) & _MASK64) >> (64 - self._bits)

    def _homes(self, keys: np.ndarray) -> np.ndarray:
        """_home of each key (uint64 arithmetic wraps modulo 2**64, as in _home)."""
        return (keys.view(np.uint64) * _GOLDEN_U64) >> self._shift

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key (an int64 array), -1 where the key is absent."""
        return self.find(keys)[0]

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, bool]:
        """(get(keys), whether every key is present)."""
        keys = np.asarray(keys, dtype=np.int64)
        if keys.size == 0 or self._live == 0:
            return np.full(keys.shape, -1, dtype=np.int64), keys.size == 0
        # Home slots as int64 (they are below the table size): numpy indexes with them without a cast.
        slots = self._homes(keys).view(np.int64)
        found_rows = self._rows[slots]
        same = self._keys[slots] == keys
        if same.all() and found_rows.min() >= 0:
            # Every key in its home slot: one probe round, no bookkeeping. At load <= 1/2 most keys are,
            # and a request's ids often all are (Fibonacci hashing spreads runs of consecutive ids apart).
            return found_rows, True
        rows = self._probe(keys, slots, found_rows, same)
        return rows, bool(rows.min() >= 0)

    def _probe(self, keys: np.ndarray, slots: np.ndarray, found_rows: np.ndarray, same: np.ndarray) -> np.ndarray:
        """get's probe rounds, from the first round's (found_rows, same) at the keys' home `slots`."""
        out = np.full(keys.shape, -1, dtype=np.int64)
        mask = self._keys.size - 1
        pending = np.arange(keys.size)
        want = keys
        table_keys, table_rows = self._keys, self._rows
        while True:
            match = (found_rows >= 0) & same
            out[pending[match]] = found_rows[match]
            go_on = ~(match | (found_rows == _EMPTY))
            if not go_on.any():
                return out
            pending, want = pending[go_on], want[go_on]
            slots = (slots[go_on] + 1) & mask
            found_rows = table_rows[slots]
            same = table_keys[slots] == want

    def set(self, key: int, row: int) -> None:
        if row < 0:
            raise ValueError("rows are non-negative")
        if 2 * (self._used + 1) > self._keys.size:
            self._rebuild(self._live + 1)
        mask = self._keys.size - 1
        slot, free = self._home(key), -1
        while True:
            current = int(self._rows[slot])
            if current == _EMPTY:
                break
            if current == _DELETED:
                if free < 0:
                    free = slot
            elif int(self._keys[slot]) == key:
                self._rows[slot] = row
                return
            slot = (slot + 1) & mask
        if free >= 0:
            slot = free  # reuse a tombstone: _used is unchanged
        else:
            self._used += 1
        self._keys[slot] = key
        self._rows[slot] = row
        self._live += 1

    def delete(self, key: int) -> None:
        mask = self._keys.size - 1
        slot = self._home(key)
        while True:
            current = int(self._rows[slot])
            if current == _EMPTY:
                return
            if current >= 0 and int(self._keys[slot]) == key:
                self._rows[slot] = _DELETED
                self._live -= 1
                return
            slot = (slot + 1) & mask

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of every live entry."""
        live = self._rows >= 0
        return self._keys[live].copy(), self._rows[live].copy()

    def _rebuild(self, needed: int) -> None:
        """A fresh, larger table without tombstones, filled with array operations (a cache of a
        million items rebuilds in milliseconds, not a Python loop over every entry)."""
        keys, rows = self.items()
        self._allocate(max(needed, 2 * len(keys)))
        mask = np.uint64(self._keys.size - 1)
        slots = self._homes(keys)
        while keys.size:
            free = np.flatnonzero(self._rows[slots] == _EMPTY)
            _, first = np.unique(slots[free], return_index=True)  # one key per free slot
            placed = free[first]
            self._keys[slots[placed]] = keys[placed]
            self._rows[slots[placed]] = rows[placed]
            rest = np.ones(keys.size, dtype=bool)
            rest[placed] = False
            keys, rows, slots = keys[rest], rows[rest], (slots[rest] + np.uint64(1)) & mask
        self._live = self._used = int(np.count_nonzero(self._rows >= 0))
