"""CandidateHistory: what one user's history says about each candidate of one request.

The user-state side (reranker.users.profiles) builds it, the scoring side (reranker.ranking.head and
the service) reads it; it sits below both so neither imports the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class CandidateHistory:
    """What one user's profile says about each candidate of one request (arrays are (n,)).

    `excluded`, `user_vectors` and `own_rows` are None when no candidate was consumed (the common
    case: then every candidate is compared with the plain user vector and the whole history)."""

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

    counts: np.ndarray  # events on the candidate; 0 = never consumed
    hours_since: np.ndarray  # hours from its newest event to the user's newest event; inf = never
    repeat_rate: float  # the user's share of events on an item already consumed
    excluded: np.ndarray | None = None  # (m,) positions of consumed candidates that have a vector
    user_vectors: np.ndarray | None = None  # (m, d) float32: the user vector without that candidate
    own_rows: np.ndarray | None = None  # (k, n) bool: history row i is an event on candidate c
    # (m,) float32: the leave-one-out cosines themselves (`excluded`'s rows of `item_vectors` against
    # `user_vectors`), where the builder already has them; None = computed from the item vectors.
    left_out_cosines: np.ndarray | None = None

    @property
    def consumed(self) -> np.ndarray:
        return self.counts > 0

    @staticmethod
    def none(n: int) -> CandidateHistory:
        return CandidateHistory(np.zeros(n), np.full(n, math.inf), 0.0)
