"""The shared plumbing of the built-in retrievers: the Retriever protocol, the sparse interaction
matrix, top-n selection and the matrix-retriever base class (id <-> index maps, seen-item masking).

Both retrievers.py (popularity, item-kNN, ALS, EASE) and sequential.py (SASRec) build on it, so
neither has to import the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from reranker.evaluation.formats import CandidateRow

SCORE_BLOCK = 1 << 24  # floats in one dense (users x items) block of scores: 64 MB of float32


class Retriever(Protocol):
    name: str

    def fit(self, histories: Mapping[str, Sequence[str]], catalog: Sequence[str]) -> Retriever: ...

    def recommend(
        self, users: Sequence[str], n: int, *, include_seen: bool = False
    ) -> dict[str, list[CandidateRow]]: ...

    def score(self, user: str, item_ids: Sequence[str]) -> np.ndarray: ...


def interaction_matrix(
    histories: Mapping[str, Sequence[str]], catalog: Sequence[str]
) -> tuple[list[str], dict[str, int], list[str], dict[str, int], sp.csr_matrix]:
    """(items, item index, users, user index, counts): the catalog then any history item not in it;
    counts[u, i] = how often user u consumed item i (CSR, float32)."""
    items = list(dict.fromkeys([*catalog, *(i for h in histories.values() for i in h)]))
    item_index = {item: j for j, item in enumerate(items)}
    users = list(histories)
    user_index = {user: u for u, user in enumerate(users)}
    lengths = np.fromiter((len(h) for h in histories.values()), dtype=np.int64, count=len(users))
    rows = np.repeat(np.arange(len(users), dtype=np.int32), lengths)
    cols = np.fromiter((item_index[i] for h in histories.values() for i in h), dtype=np.int32, count=int(lengths.sum()))
    counts = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(len(users), len(items)), dtype=np.float32
    )
    counts.sum_duplicates()
    return items, item_index, users, user_index, counts


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Column indices of the n largest finite scores of one row, best first (ties: lower index)."""
    top = min(n, scores.size)
    if top <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.argpartition(-scores, top - 1)[:top] if top < scores.size else np.arange(scores.size)
    idx = idx[np.lexsort((idx, -scores[idx]))]
    return idx[np.isfinite(scores[idx])]


class _MatrixRetriever:
    """Shared plumbing: id <-> index maps, the sparse interaction matrix, seen-item masking, top-n."""

    name = "base"

    def fit(self, histories: Mapping[str, Sequence[str]], catalog: Sequence[str]) -> _MatrixRetriever:
        self.items, self.item_index, self.users, self.user_index, self.matrix = interaction_matrix(histories, catalog)
        self._fit()
        return self

    def _fit(self) -> None:
        pass

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        """Dense scores (len(rows) x items) of the users at `rows`."""
        raise NotImplementedError

    def score(self, user: str, item_ids: Sequence[str]) -> np.ndarray:
        """This retriever's scores of `item_ids` for `user` (the values `recommend` ranks by, seen
        items included); -inf for an unknown user or item."""
        out = np.full(len(item_ids), -np.inf)
        if user not in self.user_index:
            return out
        row = self._scores(np.array([self.user_index[user]]))[0]
        cols = np.array([self.item_index.get(i, -1) for i in item_ids], dtype=np.int64)
        known = cols >= 0
        out[known] = row[cols[known]]
        return out

    def recommend(
        self, users: Sequence[str], n: int, *, include_seen: bool = False, batch: int = 0
    ) -> dict[str, list[CandidateRow]]:
        """The top `n` items per user, best first; the user's consumed items are left out unless
        `include_seen`. A user without history gets an empty list."""
        out: dict[str, list[CandidateRow]] = {u: [] for u in users}
        known = [u for u in users if u in self.user_index]
        batch = batch or max(1, min(1024, SCORE_BLOCK // max(1, len(self.items))))
        for start in range(0, len(known), batch):
            chunk = known[start : start + batch]
            rows = np.array([self.user_index[u] for u in chunk])
            scores = np.asarray(self._scores(rows), dtype=np.float64)
            if not include_seen:
                seen = self.matrix[rows].tocoo()
                scores[seen.row, seen.col] = -np.inf
            for r, user in enumerate(chunk):
                row = scores[r]
                out[user] = [CandidateRow(self.items[j], float(row[j])) for j in top_n(row, n)]
        return out
