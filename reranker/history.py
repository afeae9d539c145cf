"""CandidateHistory: what one user's history says about each candidate of one request.

The user-state side (reranker.users.profiles) builds it, the scoring side (reranker.ranking.head and
the service) reads it; it sits below both so neither imports the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


_NO_POSITIONS = np.zeros(0, dtype=np.intp)
_NO_VALUES = np.zeros(0)
for _array in (_NO_POSITIONS, _NO_VALUES):
    _array.flags.writeable = False


@dataclass(frozen=True, slots=True)
class CandidateHistory:
    """What one user's profile says about each candidate of one request.

    Held sparse: the few consumed candidates' positions and values. The per-candidate (n,) arrays
    (`counts`, `hours_since`, `consumed`) are built when read (the blend reads none of them; a
    request with consumed candidates reads `consumed_count`, and the mask only to move them).
    `excluded`, `user_vectors` and `own_rows` are None when no candidate was consumed (the common
    case: then every candidate is compared with the plain user vector and the whole history)."""

    size: int  # n: the request's candidates
    consumed_at: np.ndarray  # (m,) positions of the candidates in the user's consumed memory, ascending
    counts_at: np.ndarray  # (m,) float64: events on each of them
    hours_at: np.ndarray  # (m,) float64: hours from each one's newest event to the user's newest event
    repeat_rate: float  # the user's share of events on an item already consumed
    consumed_count: int = 0  # how many of them have events (counts_at > 0: all of them, but for odd stored data)
    excluded: np.ndarray | None = None  # (m,) positions of consumed candidates that have a vector
    user_vectors: np.ndarray | None = None  # (m, d) float32: the user vector without that candidate
    own_rows: np.ndarray | None = None  # (k, n) bool: history row i is an event on candidate c
    # (m,) float32: the leave-one-out cosines themselves (`excluded`'s rows of `item_vectors` against
    # `user_vectors`), where the builder already has them; None = computed from the item vectors.
    left_out_cosines: np.ndarray | None = None

    def cosine(self, item_vectors: np.ndarray, user_vector: np.ndarray) -> np.ndarray:
        """cos(user without c, c) per candidate c (float64): the plain cosine where nothing is excluded."""
        return self.corrected(np.asarray(item_vectors, dtype=np.float32) @ np.asarray(user_vector, dtype=np.float32),
                              item_vectors)

    def corrected(self, cosine: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
        """`cosine` (the plain cosine to the user vector, e.g. a column of the request's one matrix
        product) as float64, with the leave-one-out cosine at the few consumed candidates only."""
        out = cosine.astype(np.float64)
        if self.excluded is not None and self.left_out_cosines is not None:
            out[self.excluded] = self.left_out_cosines
        elif self.excluded is not None and self.user_vectors is not None and self.excluded.size:
            rows = np.asarray(item_vectors, dtype=np.float32)[self.excluded]
            out[self.excluded] = np.einsum("md,md->m", rows, self.user_vectors)
        return out

    @property
    def counts(self) -> np.ndarray:
        """(n,) float64: events on the candidate; 0 = never consumed."""
        out = np.zeros(self.size)
        out[self.consumed_at] = self.counts_at
        return out

    @property
    def hours_since(self) -> np.ndarray:
        """(n,) float64: hours from the candidate's newest event to the user's newest event; inf = never."""
        out = np.full(self.size, math.inf)
        out[self.consumed_at] = self.hours_at
        return out

    @property
    def consumed(self) -> np.ndarray:
        """(n,) bool: `counts > 0`."""
        out = np.zeros(self.size, dtype=bool)
        out[self.consumed_at] = True if self.consumed_count == self.consumed_at.size else self.counts_at > 0
        return out

    @staticmethod
    def none(n: int, repeat_rate: float = 0.0) -> CandidateHistory:
        """Nothing consumed among `n` candidates."""
        return CandidateHistory(n, _NO_POSITIONS, _NO_VALUES, _NO_VALUES, repeat_rate)
