"""ItemVectorCache: item vectors in one contiguous float32 matrix, least-recently-used eviction.

Each entry remembers a fingerprint of the text it was encoded from, so a changed text re-encodes.
A lookup is one dict probe per id plus a few numpy operations: vectors are gathered from the
matrix in one fancy-index, text fingerprints are compared and recency is stamped as arrays
(no per-request re-stacking, no per-hit linked-list bookkeeping). Eviction picks the rows with
the oldest use stamp (argpartition), only when the cache is full.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

# hash(None) marks "no text given: accept whatever vector is cached". A real text hashing to the
# same 64-bit value would only relax its own text check, with probability ~2^-64.
_ANY_TEXT = hash(None)
_FREE = np.iinfo(np.int64).max  # use stamp of an unused row: never chosen for eviction


def text_fingerprint(text: str | None) -> int:
    """Process-local 64-bit fingerprint of an item text (Python's string hash; cached on the str)."""
    return hash(text)


class ItemVectorCache:
    def __init__(self, capacity: int, dim: int, initial_rows: int = 1024) -> None:
        self.capacity = capacity
        self.dim = dim
        rows = max(1, min(capacity, initial_rows))
        self._matrix = np.zeros((rows, dim), dtype=np.float32)
        self._fingerprints = np.zeros(rows, dtype=np.int64)
        self._last_used = np.full(rows, _FREE, dtype=np.int64)
        self._row_of: dict[str, int] = {}
        self._id_of_row: list[str | None] = [None] * rows
        self._free_rows: list[int] = list(range(rows - 1, -1, -1))
        self._clock = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._row_of)

    @property
    def nbytes(self) -> int:
        """Bytes held by the vector matrix and its per-row arrays."""
        return self._matrix.nbytes + self._fingerprints.nbytes + self._last_used.nbytes

    def lookup(self, item_ids: Sequence[str], texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors (a fresh (n, dim) array) for the given ids, and a hit mask.

        A text of None accepts whatever vector is cached for the id; otherwise the cached vector
        must have been encoded from that text. Rows of misses are zero.
        """
        n = len(item_ids)
        wanted = np.fromiter(map(hash, texts), dtype=np.int64, count=n)
        with self._lock:
            get = self._row_of.get
            rows = np.fromiter([get(item_id, -1) for item_id in item_ids], dtype=np.int64, count=n)
            hit = rows >= 0
            safe_rows = np.where(hit, rows, 0)
            hit &= (wanted == _ANY_TEXT) | (self._fingerprints[safe_rows] == wanted)
            vectors = self._matrix[safe_rows]
            self._clock += 1
            self._last_used[rows[hit]] = self._clock
            hit_count = int(np.count_nonzero(hit))
            self.hits += hit_count
            self.misses += n - hit_count
        if hit_count < n:
            vectors[~hit] = 0.0
        return vectors, hit

    def put(self, item_ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray) -> None:
        """Insert or replace vectors (the last one wins for a repeated id); evicts the least
        recently used entries when the cache is full."""
        vectors = np.asarray(vectors, dtype=np.float32)
        latest = {item_id: k for k, item_id in enumerate(item_ids)}
        if len(latest) > self.capacity:  # more than fits at all: keep the last `capacity` given
            latest = dict(sorted(latest.items(), key=lambda kv: kv[1])[-self.capacity :])
        with self._lock:
            self._clock += 1
            new = [item_id for item_id in latest if item_id not in self._row_of]
            for item_id in latest:
                if item_id in self._row_of:
                    self._last_used[self._row_of[item_id]] = self._clock  # protect from eviction below
            overflow = len(self._row_of) + len(new) - self.capacity
            if overflow > 0:
                self._evict(overflow)
            for item_id in new:
                self._row_of[item_id] = self._allocate_row(item_id)
            rows = np.fromiter((self._row_of[i] for i in latest), dtype=np.int64, count=len(latest))
            source = np.fromiter(latest.values(), dtype=np.int64, count=len(latest))
            self._matrix[rows] = vectors[source]
            self._fingerprints[rows] = np.fromiter((hash(texts[k]) for k in latest.values()), np.int64, len(latest))
            self._last_used[rows] = self._clock

    def _evict(self, count: int) -> None:
        """Free the `count` least recently used rows (caller holds the lock)."""
        stamps = self._last_used
        victims = np.argpartition(stamps, count - 1)[:count] if count < stamps.size else np.arange(stamps.size)
        for row in victims.tolist():
            item_id = self._id_of_row[row]
            if item_id is None:
                continue
            del self._row_of[item_id]
            self._id_of_row[row] = None
            stamps[row] = _FREE
            self._free_rows.append(row)

    def _allocate_row(self, item_id: str) -> int:
        if not self._free_rows:
            self._grow()
        row = self._free_rows.pop()
        self._id_of_row[row] = item_id
        return row

    def _grow(self) -> None:
        old = self._matrix.shape[0]
        new = min(self.capacity, old * 2)
        if new <= old:
            raise RuntimeError("item cache has no free row although it is below capacity")
        matrix = np.zeros((new, self.dim), dtype=np.float32)
        matrix[:old] = self._matrix
        self._matrix = matrix
        self._fingerprints = np.concatenate([self._fingerprints, np.zeros(new - old, dtype=np.int64)])
        self._last_used = np.concatenate([self._last_used, np.full(new - old, _FREE, dtype=np.int64)])
        self._id_of_row.extend([None] * (new - old))
        self._free_rows.extend(range(new - 1, old - 1, -1))

    def known(self, item_id: str) -> bool:
        with self._lock:
            return item_id in self._row_of
