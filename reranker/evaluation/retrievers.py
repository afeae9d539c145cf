"""Built-in candidate generators: popularity, item-kNN (cosine), implicit ALS, EASE, SASRec.

Each is fitted on histories only (user -> item ids, oldest first), never on targets, and recommends
the top-n items for a user, best first, with its score. By default the items the user already
consumed are left out; `include_seen=True` keeps them, as real upstream lists do (on real retail
data 13-22% of a BPR/SASRec top 10 are consumed items).

The interaction matrix is a scipy.sparse CSR (users x items, memory ~ events): no users x items
array is ever dense, so these scale to 10^5-10^6 items. Scoring runs in batches of users whose
dense score block stays under `SCORE_BLOCK` floats. ALS is the `implicit` package's
conjugate-gradient solver. EASE alone is dense in items x items and refuses catalogs above
`EASE.max_items`. The sequential retriever (`sasrec`) lives in reranker.evaluation.sequential.

`sampled_candidates` builds the LLMRank protocol lists instead: the target plus random negatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from reranker.evaluation.formats import CandidateRow
from reranker.evaluation.matrixretriever import (  # noqa: F401  (re-exported: retrievers.top_n, ...)
    SCORE_BLOCK,
    Retriever,
    _MatrixRetriever,
    interaction_matrix,
    top_n,
)
from reranker.evaluation.sequential import SASRec

RETRIEVERS = ("popularity", "itemknn", "als")  # the default set (eval, train, validation)
ALL_RETRIEVERS = RETRIEVERS + ("ease", "sasrec")  # what --retriever accepts (besides SAMPLED)
SAMPLED = "sampled"


class Popularity(_MatrixRetriever):
    """Items by number of interactions in the histories (the same list for everyone, minus seen items)."""

    name = "popularity"

    def _fit(self) -> None:
        self.counts = np.asarray(self.matrix.sum(axis=0), dtype=np.float32).ravel()

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (rows.size, self.counts.size)).copy()


def binary_matrix(counts: sp.csr_matrix) -> sp.csr_matrix:
    binary = counts.copy()
    binary.data[:] = 1.0
    return binary


class ItemKNN(_MatrixRetriever):
    """score(u, i) = sum over the user's items j of cosine(i, j), cosine on the binary interaction
    matrix. The item x item similarity is sparse (non-zeros <= sum over users of history length^2);
    `neighbours` > 0 keeps only each item's top similar items (bounded memory for huge logs)."""

    name = "itemknn"

    def __init__(self, neighbours: int = 0):
        self.neighbours = neighbours

    def _fit(self) -> None:
        binary = binary_matrix(self.matrix)
        norms = np.sqrt(np.asarray(binary.sum(axis=0)).ravel())
        normalized = (binary @ sp.diags(1.0 / np.maximum(norms, 1e-9))).astype(np.float32).tocsc()
        sim = (normalized.T @ normalized).tocsr()
        sim.setdiag(0.0)
        sim.eliminate_zeros()
        if self.neighbours > 0:
            sim = keep_top_per_row(sim, self.neighbours)
        self.binary, self.sim = binary, sim

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        return (self.binary[rows] @ self.sim).toarray()


def keep_top_per_row(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The k largest values of each CSR row (ties: lower column), as a new CSR matrix."""
    coo = matrix.tocoo()
    order = np.lexsort((coo.col, -coo.data, coo.row))
    rows, cols, vals = coo.row[order], coo.col[order], coo.data[order]
    starts = np.searchsorted(rows, np.arange(matrix.shape[0]))
    keep = (np.arange(rows.size) - starts[rows]) < k
    return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=matrix.shape)


class ImplicitALS(_MatrixRetriever):
    """Implicit-feedback ALS (Hu, Koren & Volinsky 2008): confidence 1 + alpha * count, L2 reg,
    solved by the `implicit` package's conjugate-gradient ALS (Takacs et al. 2011) on the sparse
    matrix. `threads` is its OpenMP thread count (BLAS is pinned to one thread while it runs)."""

    name = "als"

    def __init__(
        self, factors: int = 64, reg: float = 0.1, alpha: float = 10.0, iterations: int = 10, seed: int = 0,
        threads: int = 1,
    ):
        self.factors, self.reg, self.alpha, self.iterations, self.seed = factors, reg, alpha, iterations, seed
        self.threads = threads

    def _fit(self) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        confidence = self.matrix.copy()
        confidence.data = 1.0 + self.alpha * confidence.data  # implicit reads C_ui itself (alpha=1 below)
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=self.factors, regularization=self.reg, alpha=1.0, iterations=self.iterations,
                random_state=self.seed, num_threads=self.threads,
            )
            # The classic start (small centred item factors, users solved first): implicit's default,
            # uniform positive factors, gave 10% lower NDCG@10 on the ml-100k validation split (0.0671 vs 0.0741).
            rng = np.random.default_rng(self.seed)
            model.item_factors = rng.normal(0, 0.01, (confidence.shape[1], self.factors)).astype(np.float32)
            model.user_factors = np.zeros((confidence.shape[0], self.factors), dtype=np.float32)
            model.fit(confidence, show_progress=False)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        return self.user_factors[rows] @ self.item_factors.T


class EASE(_MatrixRetriever):
    """EASE (Steck 2019): item-item weights B = argmin ||X - XB||^2 + lam ||B||^2 with diag(B) = 0,
    closed form B = I - P diagMat(1 / diag(P)), P = (X^T X + lam I)^-1, on the binary matrix X;
    score(u, i) = X[u] @ B[:, i]. A strong linear CF baseline. Fitting holds a few dense items x items
    float64 matrices (8 x items^2 bytes each: 23 MB for ml-100k, 3.2 GB at 2 x 10^4 items), so it
    refuses catalogs above `max_items` (default 20,000) with a clear error. lam = 50 was chosen on
    the ml-100k validation split."""

    name = "ease"

    def __init__(self, lam: float = 50.0, max_items: int = 20_000):
        self.lam, self.max_items = lam, max_items

    def _fit(self) -> None:
        n = len(self.items)
        if n > self.max_items:
            raise ValueError(
                f"EASE needs dense {n} x {n} float64 matrices (~{3 * 8 * n * n / 1e9:.0f} GB for {n} items); "
                f"it is limited to {self.max_items} items: use itemknn, als or sasrec for this catalog"
            )
        binary = binary_matrix(self.matrix)
        gram = (binary.T @ binary).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self.lam
        inverse = np.linalg.inv(gram)
        weights = -inverse / np.diag(inverse)[None, :]
        np.fill_diagonal(weights, 0.0)
        self.binary, self.weights = binary, weights

    def _scores(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.binary[rows] @ self.weights)


def make_retriever(name: str, *, seed: int = 0, threads: int = 1, **kwargs: object) -> Retriever:
    """A fresh retriever by name; `seed` and `threads` go to those that train (als, sasrec), `kwargs`
    to its constructor."""
    factories = {"popularity": Popularity, "itemknn": ItemKNN, "als": ImplicitALS, "ease": EASE, "sasrec": SASRec}
    if name not in factories:
        raise ValueError(f"unknown retriever {name!r}; choose from {', '.join(factories)} or {SAMPLED}")
    if name in ("als", "sasrec"):
        kwargs = {"seed": seed, "threads": threads, **kwargs}
    return factories[name](**kwargs)


def sampled_candidates(
    history: Sequence[str],
    target: str,
    catalog: Sequence[str],
    negatives: int,
    rng: np.random.Generator,
    index: Mapping[str, int] | None = None,
) -> list[CandidateRow]:
    """LLMRank protocol: the target plus `negatives` random items the user never saw, shuffled; no scores.

    All upstream scores are 0, so the upstream order carries no information (it is random).
    `index` (item -> position in `catalog`) makes a call O(history) in Python instead of
    O(catalog): pass it when drawing lists for many users from a large catalog.
    """
    if index is None:
        index = {item: j for j, item in enumerate(catalog)}
    unseen = np.ones(len(catalog), dtype=bool)
    unseen[[index[i] for i in {*history, target} if i in index]] = False
    pool = np.flatnonzero(unseen)  # the unseen items in catalog order
    picked = rng.choice(len(pool), size=min(negatives, len(pool)), replace=False)
    items = [target] + [catalog[int(pool[int(j)])] for j in picked]
    order = rng.permutation(len(items))
    return [CandidateRow(items[int(j)], 0.0) for j in order]
