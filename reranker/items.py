"""ItemVectorCache: item vectors in one contiguous float32 matrix, LRU by item id.

Each entry remembers a hash of the text it was encoded from, so a changed text re-encodes.
Lookups gather rows from the matrix in one numpy fancy-index (no per-request re-stacking).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def text_hash(text: str) -> int:
    """Stable 64-bit hash of an item text (same on every process and machine)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class ItemVectorCache:
    def __init__(self, capacity: int, dim: int, initial_rows: int = 1024) -> None:
        self.capacity = capacity
        self.dim = dim
        self._matrix = np.zeros((min(capacity, initial_rows), dim), dtype=np.float32)
        self._entries: OrderedDict[str, tuple[int, int]] = OrderedDict()  # item_id -> (row, text hash)
        self._free_rows: list[int] = []
        self._next_row = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, item_ids: Sequence[str], hashes: Sequence[int | None]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for the given ids and a hit mask.

        A hash of None accepts whatever vector is cached for the id; otherwise the cached vector
        must have been encoded from text with that hash. Rows of misses are zero.
        """
        n = len(item_ids)
        rows = np.full(n, -1, dtype=np.int64)
        with self._lock:
            entries = self._entries
            for i, (item_id, wanted) in enumerate(zip(item_ids, hashes, strict=True)):
                entry = entries.get(item_id)
                if entry is not None and (wanted is None or entry[1] == wanted):
                    rows[i] = entry[0]
                    entries.move_to_end(item_id)
            hit = rows >= 0
            vectors = self._matrix[np.where(hit, rows, 0)]
            hit_count = int(hit.sum())
            self.hits += hit_count
            self.misses += n - hit_count
        vectors[~hit] = 0.0
        return vectors, hit

    def put(self, item_ids: Sequence[str], hashes: Sequence[int], vectors: np.ndarray) -> None:
        """Insert or replace vectors; evicts least recently used entries beyond capacity."""
        with self._lock:
            for item_id, hashed, vector in zip(item_ids, hashes, vectors, strict=True):
                entry = self._entries.get(item_id)
                if entry is not None:
                    row = entry[0]
                    self._entries.move_to_end(item_id)
                else:
                    row = self._allocate_row()
                self._matrix[row] = vector
                self._entries[item_id] = (row, hashed)

    def _allocate_row(self) -> int:
        if len(self._entries) >= self.capacity:
            _, (row, _) = self._entries.popitem(last=False)
            return row
        if self._free_rows:
            return self._free_rows.pop()
        if self._next_row >= self._matrix.shape[0]:
            grown = np.zeros((min(self.capacity, max(1, self._matrix.shape[0]) * 2), self.dim), dtype=np.float32)
            grown[: self._matrix.shape[0]] = self._matrix
            self._matrix = grown
        row = self._next_row
        self._next_row += 1
        return row

    def known(self, item_id: str) -> bool:
        with self._lock:
            return item_id in self._entries

    # --- snapshot support (reranker/snapshot.py) -------------------------------------------------
    def export(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, text hashes as uint64, vectors) of every entry, least recently used first."""
        with self._lock:
            ids = list(self._entries)
            rows = np.fromiter((self._entries[i][0] for i in ids), dtype=np.int64, count=len(ids))
            hashes = np.fromiter((self._entries[i][1] for i in ids), dtype=np.uint64, count=len(ids))
            return ids, hashes, self._matrix[rows].copy()

    def restore(self, item_ids: Sequence[str], hashes: np.ndarray, vectors: np.ndarray) -> None:
        """Insert exported entries (in the given order, so the LRU order survives a round trip)."""
        self.put(list(item_ids), [int(h) for h in hashes], vectors)
