"""Built-in candidate generators (pure numpy): popularity, item-kNN (cosine), implicit ALS, EASE.

Each is fitted on histories only (user -> item ids), never on targets, and recommends the top-n
items a user has not interacted with yet, best first, with its score. The interaction matrix is
dense float32 (users x items): fine for ml-100k-sized data (tens of thousands of items at most).

`sampled_candidates` builds the LLMRank protocol lists instead: the target plus random negatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from reranker.evaluation.formats import CandidateRow

RETRIEVERS = ("popularity", "itemknn", "als")  # the default set (eval, train, validation)
ALL_RETRIEVERS = RETRIEVERS + ("ease",)  # what --retriever accepts (besides SAMPLED)
SAMPLED = "sampled"


class Retriever(Protocol):
    name: str

    def fit(self, histories: Mapping[str, Sequence[str]], catalog: Sequence[str]) -> Retriever: ...

    def recommend(self, users: Sequence[str], n: int, *, include_seen: bool = False) -> dict[str, list[CandidateRow]]: ...

    def score(self, user: str, item_ids: Sequence[str]) -> np.ndarray: ...


class _MatrixRetriever:
    """Shared plumbing: id <-> index maps, the interaction matrix, seen-item masking, top-n."""

    name = "base"

    def fit(self, histories: Mapping[str, Sequence[str]], catalog: Sequence[str]) -> _MatrixRetriever:
        self.items = list(dict.fromkeys(list(catalog) + [i for h in histories.values() for i in h]))
        self.item_index = {item: j for j, item in enumerate(self.items)}
        self.users = list(histories)
        self.user_index = {user: u for u, user in enumerate(self.users)}
        matrix = np.zeros((len(self.users), len(self.items)), dtype=np.float32)
        for user, history in histories.items():
            for item in history:
                matrix[self.user_index[user], self.item_index[item]] += 1.0
        self.matrix = matrix
        self._fit()
        return self

    def _fit(self) -> None:
        pass

    def _scores(self, rows: np.ndarray) -> np.ndarray:
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
        self, users: Sequence[str], n: int, batch: int = 256, *, include_seen: bool = False
    ) -> dict[str, list[CandidateRow]]:
        """Top-n per user, best first; items the user already interacted with are left out unless
        `include_seen` (real upstream lists contain them)."""
        out: dict[str, list[CandidateRow]] = {}
        known = [u for u in users if u in self.user_index]
        for user in users:
            if user not in self.user_index:  # no history: the popularity order of an empty profile
                out[user] = []
        for start in range(0, len(known), batch):
            chunk = known[start : start + batch]
            rows = np.array([self.user_index[u] for u in chunk])
            scores = self._scores(rows).astype(np.float64)
            if not include_seen:
                scores[self.matrix[rows] > 0] = -np.inf
            top = min(n, scores.shape[1])
            for r, user in enumerate(chunk):
                row = scores[r]
                idx = np.argpartition(-row, top - 1)[:top] if top < row.size else np.arange(row.size)
                idx = idx[np.lexsort((idx, -row[idx]))]
                out[user] = [CandidateRow(self.items[j], float(row[j])) for j in idx if np.isfinite(row[j])]
        return out


class Popularity(_MatrixRetriever):
    """Items by number of interactions in the histories (the same list for everyone, minus seen items)."""

    name = "popularity"

    def _fit(self) -> None:
        self.counts = self.matrix.sum(axis=0)

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (rows.size, self.counts.size)).copy()


class ItemKNN(_MatrixRetriever):
    """score(u, i) = sum over the user's items j of cosine(i, j), cosine on the binary interaction matrix."""

    name = "itemknn"

    def _fit(self) -> None:
        binary = (self.matrix > 0).astype(np.float32)
        norms = np.sqrt(binary.sum(axis=0))
        normalized = binary / np.maximum(norms, 1e-9)
        sim = normalized.T @ normalized
        np.fill_diagonal(sim, 0.0)
        self.binary, self.sim = binary, sim

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        return self.binary[rows] @ self.sim


class ImplicitALS(_MatrixRetriever):
    """Implicit-feedback ALS (Hu, Koren & Volinsky 2008): confidence 1 + alpha * count, L2 reg."""

    name = "als"

    def __init__(self, factors: int = 64, reg: float = 0.1, alpha: float = 10.0, iterations: int = 10, seed: int = 0):
        self.factors, self.reg, self.alpha, self.iterations, self.seed = factors, reg, alpha, iterations, seed

    def _solve(self, counts: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        gram = fixed.T @ fixed
        eye = self.reg * np.eye(self.factors)
        out = np.zeros((counts.shape[0], self.factors))
        for r in range(counts.shape[0]):
            idx = np.flatnonzero(counts[r])
            if idx.size == 0:
                continue
            f = fixed[idx]
            confidence = self.alpha * counts[r, idx]
            a = gram + (f.T * confidence) @ f + eye
            out[r] = np.linalg.solve(a, f.T @ (1.0 + confidence))
        return out

    def _fit(self) -> None:
        rng = np.random.default_rng(self.seed)
        counts = self.matrix.astype(np.float64)
        self.item_factors = rng.normal(0, 0.01, (counts.shape[1], self.factors))
        self.user_factors = np.zeros((counts.shape[0], self.factors))
        for _ in range(self.iterations):
            self.user_factors = self._solve(counts, self.item_factors)
            self.item_factors = self._solve(counts.T, self.user_factors)

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        return self.user_factors[rows] @ self.item_factors.T


class EASE(_MatrixRetriever):
    """EASE (Steck 2019): item-item weights B = argmin ||X - XB||^2 + lam ||B||^2 with diag(B) = 0,
    closed form B = I - P diagMat(1 / diag(P)), P = (X^T X + lam I)^-1, on the binary matrix X;
    score(u, i) = X[u] @ B[:, i]. A strong linear CF baseline. Fitting holds a few dense items x items
    float64 matrices (8 x items^2 bytes each: 23 MB for ml-100k, 3.2 GB at 2 x 10^4 items), so it
    is for catalogs up to about that size. lam = 50 was chosen on the ml-100k validation split."""

    name = "ease"

    def __init__(self, lam: float = 50.0):
        self.lam = lam

    def _fit(self) -> None:
        binary = (self.matrix > 0).astype(np.float64)
        gram = binary.T @ binary
        gram[np.diag_indices_from(gram)] += self.lam
        inverse = np.linalg.inv(gram)
        weights = -inverse / np.diag(inverse)[None, :]
        np.fill_diagonal(weights, 0.0)
        self.binary, self.weights = binary, weights

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        return self.binary[rows] @ self.weights


def make_retriever(name: str) -> Retriever:
    factories = {"popularity": Popularity, "itemknn": ItemKNN, "als": ImplicitALS, "ease": EASE}
    if name not in factories:
        raise ValueError(f"unknown retriever {name!r}; choose from {', '.join(factories)} or {SAMPLED}")
    return factories[name]()


def sampled_candidates(
    history: Sequence[str], target: str, catalog: Sequence[str], negatives: int, rng: np.random.Generator
) -> list[CandidateRow]:
    """LLMRank protocol: the target plus `negatives` random items the user never saw, shuffled; no scores.

    All upstream scores are 0, so the upstream order carries no information (it is random).
    """
    seen = set(history) | {target}
    pool = [item for item in catalog if item not in seen]
    picked = rng.choice(len(pool), size=min(negatives, len(pool)), replace=False)
    items = [target] + [pool[int(j)] for j in picked]
    order = rng.permutation(len(items))
    return [CandidateRow(items[int(j)], 0.0) for j in order]
