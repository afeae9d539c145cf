"""ItemVectorCache: item vectors in one contiguous float32 matrix, least-recently-used eviction.

Each entry remembers which text it was encoded from, so a changed text re-encodes. Two
fingerprints are kept per row: the stable `text_hash` (the same in every process: snapshots and
replicas use it) and Python's string hash, which is what the hot path compares (it is computed in
C and cached on the str; no blake2b per candidate per request). A row whose Python hash is not
known (restored from a snapshot, or put with a stable hash) is verified once with `text_hash`.

Ids that are canonical decimal strings ("42") are also keyed by their integer value in an
IntRowIndex, so integer ids (the packed Rerank form, DecimalIds) are looked up with array
operations, no dict probe per id: "42" and 42 are the same item.

A lookup by string id is one dict probe per id plus a few numpy operations: vectors are gathered from the
matrix in one fancy-index, fingerprints are compared and recency is stamped as arrays (no
per-request re-stacking, no per-hit linked-list bookkeeping). Each row also keeps the text str it
was encoded from (a reference, when put with a text): a request whose ids are all cached compares
its texts with those in one list comparison (C), and hashes them only when one differs. Eviction picks the rows with the
oldest use stamp (argpartition), only when the cache is full.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from itertools import repeat
from operator import itemgetter

import numpy as np

from reranker.itemkeys import item_keys
from reranker.model.intindex import IntRowIndex, decimal_key
from reranker.types import DecimalIds

# A text key of None means "no text given: accept whatever vector is cached". (A real text whose
# Python hash equals hash(None) would fall to the exact text_hash check: still correct.)
_ANY_TEXT = hash(None)
_FREE = np.iinfo(np.int64).max  # use stamp of an unused row: never chosen for eviction
_ROW = np.dtype("<i8")  # ItemVectorCache._row_of's values, as bytes
_NO_ROW = (-1).to_bytes(8, "little", signed=True)

TextKey = str | int | None  # item text, its text_hash, or None (any cached text is fine)

# Encoders give unit rows (float16 storage rounds a norm by < 1e-3): a longer row is a broken file
# or tool, and would outweigh every other item in a user's vector.
MAX_VECTOR_NORM = 1.01


def unusable_rows(vectors: np.ndarray) -> np.ndarray:
    """Mask of the rows no item vector may be: a component that is not finite, or an L2 norm above
    MAX_VECTOR_NORM. Every vector that enters from outside (catalog, snapshot) is checked with it."""
    rows = np.asarray(vectors, dtype=np.float32)
    if rows.size == 0:  # no rows (an empty snapshot section may be stored flat)
        return np.zeros(len(rows), dtype=bool)
    rows = rows.reshape(len(rows), -1)
    with np.errstate(over="ignore", invalid="ignore"):
        squared = np.einsum("ij,ij->i", rows, rows)  # NaN or inf when any component is (or it overflows)
    return ~(squared <= MAX_VECTOR_NORM * MAX_VECTOR_NORM)


def text_hash(text: str) -> int:
    """Stable 64-bit hash of an item text (same on every process and machine)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _stable(key: str | int) -> int:
    return text_hash(key) if isinstance(key, str) else int(key)


class ItemVectorCache:
    def __init__(self, capacity: int, dim: int, initial_rows: int = 1024) -> None:
        self.capacity = capacity
        self.dim = dim
        rows = max(1, min(capacity, initial_rows))
        self._matrix = np.zeros((rows, dim), dtype=np.float32)
        self._local_fp = np.zeros(rows, dtype=np.int64)  # hash(text) of the encoded text
        self._text_of_row = np.full(rows, None, dtype=object)  # the encoded text (None: only its hashes known)
        self._stable_fp = np.zeros(rows, dtype=np.uint64)  # text_hash of the encoded text
        self._item_key = np.zeros(rows, dtype=np.uint64)  # itemkeys.item_keys of the row's id (per item, not per request)
        self._last_used = np.full(rows, _FREE, dtype=np.int64)
        self._row_of: dict[str, bytes] = {}  # id -> row, as 8 little-endian bytes (an int64: see _rows)
        self._row_of_int = IntRowIndex(rows)  # the decimal ids among _row_of, by integer value
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
        """Bytes held by the vector matrix and its per-row arrays (the kept texts' references, not the
        texts themselves)."""
        return (self._matrix.nbytes + self._local_fp.nbytes + self._stable_fp.nbytes + self._last_used.nbytes
                + self._item_key.nbytes + self._text_of_row.nbytes)

    def lookup(
        self, item_ids: Sequence[str], texts: Sequence[TextKey], keys_out: np.ndarray | None = None, *,
        count: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vectors (a fresh (n, dim) array) for the given ids, and a hit mask.

        `texts[i]` is the item's text (or its `text_hash`): the cached vector must have been
        encoded from that text. None accepts whatever vector is cached. Rows of misses are zero.
        `keys_out` (uint64, n), when given, receives each cached id's `itemkeys.item_keys` key
        (0 where the id is not cached), so the request need not hash its ids again. `count=False`
        leaves the hit / miss counters alone (a compact profile reading its history's vectors).
        """
        n = len(item_ids)
        # No texts at all (the packed form's warm path): skip hashing. The first element is checked
        # first: list.count compares a str to None the slow way, through str.__eq__.
        any_text = n > 0 and isinstance(texts, list) and texts[0] is None and texts.count(None) == n
        with self._lock:
            if isinstance(item_ids, DecimalIds):
                rows, all_found = self._row_of_int.find(item_ids.values)
            else:
                rows, all_found = self._rows(item_ids)
            # Every id cached, and no texts or the very texts they were encoded from (one list
            # comparison in C): no masks, no fingerprints, no miss rows.
            if all_found and (any_text or self._text_of_row[rows].tolist() == texts):
                return self._all_hits(rows, keys_out, count)
            found = rows >= 0
            wanted = (np.full(n, _ANY_TEXT, dtype=np.int64) if any_text
                      else np.fromiter(map(hash, texts), dtype=np.int64, count=n))
            safe_rows = np.where(found, rows, 0)
            hit = found & ((wanted == _ANY_TEXT) | (self._local_fp[safe_rows] == wanted))
            if np.count_nonzero(hit) != np.count_nonzero(found):
                self._verify_stable(hit, found, rows, texts)
            vectors = self._matrix.take(safe_rows, axis=0)
            if keys_out is not None:
                keys_out[:] = np.where(found, self._item_key[safe_rows], 0)
            self._clock += 1
            self._last_used[rows[hit]] = self._clock
            hit_count = int(np.count_nonzero(hit))
            if count:
                self.hits += hit_count
                self.misses += n - hit_count
        if hit_count < n:
            vectors[~hit] = 0.0
        return vectors, hit

    def _rows(self, item_ids: Sequence[str]) -> tuple[np.ndarray, bool]:
        """Each id's row, -1 where not cached, and whether every id is cached (caller holds the lock).
        The rows are stored as bytes so that they join into an int64 array in C; when every id is
        cached, one itemgetter call fetches them all (no Python call per id)."""
        n = len(item_ids)
        if n > 1:
            try:
                return np.frombuffer(b"".join(itemgetter(*item_ids)(self._row_of)), dtype=_ROW), True
            except KeyError:  # some id is not cached
                pass
        rows = np.frombuffer(b"".join(map(self._row_of.get, item_ids, repeat(_NO_ROW, n))), dtype=_ROW)
        return rows, n == 0 or bool(rows.min() >= 0)

    def _all_hits(self, rows: np.ndarray, keys_out: np.ndarray | None, count: bool) -> tuple[np.ndarray, np.ndarray]:
        """lookup's answer when every id is cached from the text given, or None both (caller holds
        the lock): no masks, no miss rows to clear."""
        # take(axis=0) gathers rows with one copy each; the fancy index costs about 1.6x the
        # instructions for 500 rows of 384 floats (callgrind).
        vectors = self._matrix.take(rows, axis=0)
        if keys_out is not None:
            keys_out[:] = self._item_key[rows]
        self._clock += 1
        self._last_used[rows] = self._clock
        if count:
            self.hits += len(rows)
        hit = np.empty(len(rows), dtype=bool)
        hit.fill(True)  # two C calls; np.ones is a Python function around them (about 2x the instructions)
        return vectors, hit

    def _verify_stable(self, hit: np.ndarray, found: np.ndarray, rows: np.ndarray, texts: Sequence[TextKey]) -> None:
        """Slow path for found ids whose Python hash differs: compare stable hashes (a changed
        text, a row restored from a snapshot, or a caller passing text_hash values)."""
        for i in np.flatnonzero(found & ~hit).tolist():
            key, row = texts[i], int(rows[i])
            if key is not None and int(self._stable_fp[row]) == _stable(key):
                hit[i] = True
                if isinstance(key, str):
                    self._local_fp[row] = hash(key)  # next time the fast comparison suffices
                    self._text_of_row[row] = key

    def put(self, item_ids: Sequence[str], texts: Sequence[str | int], vectors: np.ndarray) -> None:
        """Insert or replace vectors encoded from `texts` (texts or their text_hash); the last one
        wins for a repeated id. Evicts the least recently used entries when the cache is full."""
        vectors = np.asarray(vectors, dtype=np.float32)
        latest = {item_id: k for k, item_id in enumerate(item_ids)}
        if len(latest) > self.capacity:  # more than fits at all: keep the last `capacity` given
            latest = dict(sorted(latest.items(), key=lambda kv: kv[1])[-self.capacity :])
        keys = [texts[k] for k in latest.values()]
        local = np.fromiter((hash(t) if isinstance(t, str) else 0 for t in keys), dtype=np.int64, count=len(keys))
        text_of_row = np.full(len(keys), None, dtype=object)
        text_of_row[:] = [t if isinstance(t, str) else None for t in keys]
        stable = np.fromiter(map(_stable, keys), dtype=np.uint64, count=len(keys))
        id_keys = item_keys(list(latest))
        with self._lock:
            self._clock += 1
            new = [item_id for item_id in latest if item_id not in self._row_of]
            for item_id in latest:
                if item_id in self._row_of:
                    row = int.from_bytes(self._row_of[item_id], "little")
                    self._last_used[row] = self._clock  # protect from eviction below
            overflow = len(self._row_of) + len(new) - self.capacity
            if overflow > 0:
                self._evict(overflow)
            for item_id in new:
                self._row_of[item_id] = self._allocate_row(item_id).to_bytes(8, "little")
            rows = np.frombuffer(b"".join(map(self._row_of.__getitem__, latest)), dtype=_ROW)
            source = np.fromiter(latest.values(), dtype=np.int64, count=len(latest))
            self._matrix[rows] = vectors[source]
            self._local_fp[rows] = local
            self._text_of_row[rows] = text_of_row
            self._stable_fp[rows] = stable
            self._item_key[rows] = id_keys
            self._last_used[rows] = self._clock

    # --- snapshot support (reranker/users/snapshot.py) -------------------------------------------------
    def export(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, text hashes as uint64, vectors) of every entry, least recently used first."""
        with self._lock:
            ids = list(self._row_of)
            rows = np.frombuffer(b"".join(self._row_of.values()), dtype=_ROW)
            order = np.argsort(self._last_used[rows], kind="stable")
            rows = rows[order]
            return [ids[i] for i in order.tolist()], self._stable_fp[rows].copy(), self._matrix[rows].copy()

    def restore(self, item_ids: Sequence[str], hashes: np.ndarray, vectors: np.ndarray) -> None:
        """Insert exported entries (in the given order, so the LRU order survives a round trip)."""
        ids = list(item_ids)
        self.put(ids, [int(h) for h in hashes], vectors)
        with self._lock:
            present = [i for i in ids if i in self._row_of]
            if present:
                rows = np.frombuffer(b"".join(map(self._row_of.__getitem__, present)), dtype=_ROW)
                self._last_used[rows] = self._clock + 1 + np.arange(len(present))
                self._clock += len(present) + 1

    def _evict(self, count: int) -> None:
        """Free the `count` least recently used rows (caller holds the lock)."""
        stamps = self._last_used
        victims = np.argpartition(stamps, count - 1)[:count] if count < stamps.size else np.arange(stamps.size)
        for row in victims.tolist():
            item_id = self._id_of_row[row]
            if item_id is None:
                continue
            del self._row_of[item_id]
            key = decimal_key(item_id)
            if key is not None:
                self._row_of_int.delete(key)
            self._id_of_row[row] = None
            self._text_of_row[row] = None
            stamps[row] = _FREE
            self._free_rows.append(row)

    def _allocate_row(self, item_id: str) -> int:
        if not self._free_rows:
            self._grow()
        row = self._free_rows.pop()
        self._id_of_row[row] = item_id
        key = decimal_key(item_id)
        if key is not None:
            self._row_of_int.set(key, row)
        return row

    def _grow(self) -> None:
        old = self._matrix.shape[0]
        new = min(self.capacity, old * 2)
        if new <= old:
            raise RuntimeError("item cache has no free row although it is below capacity")
        matrix = np.zeros((new, self.dim), dtype=np.float32)
        matrix[:old] = self._matrix
        self._matrix = matrix
        self._local_fp = np.concatenate([self._local_fp, np.zeros(new - old, dtype=np.int64)])
        self._text_of_row = np.concatenate([self._text_of_row, np.full(new - old, None, dtype=object)])
        self._stable_fp = np.concatenate([self._stable_fp, np.zeros(new - old, dtype=np.uint64)])
        self._item_key = np.concatenate([self._item_key, np.zeros(new - old, dtype=np.uint64)])
        self._last_used = np.concatenate([self._last_used, np.full(new - old, _FREE, dtype=np.int64)])
        self._id_of_row.extend([None] * (new - old))
        self._free_rows.extend(range(new - 1, old - 1, -1))

    def known(self, item_id: str) -> bool:
        with self._lock:
            return item_id in self._row_of
