"""Explanations of a ranking: per item, the most similar liked history item (or why there is none)."""

from __future__ import annotations

import numpy as np

from reranker.ranking import scoring
from reranker.types import Explanation
from reranker.users.profiles import UserState


def explain(
    state: UserState | None, order: np.ndarray, semantic: np.ndarray, vectors: np.ndarray, has_vector: np.ndarray
) -> list[Explanation]:
    """One explanation per row of `order` (candidate indices, best first; `semantic`: per candidate)."""
    history_ids: list[str] = []
    history = np.zeros((0, vectors.shape[1]), dtype=np.float32)
    if state is not None:
        positive = np.flatnonzero(state.history.weights > 0)
        history_ids = [state.history.item_ids[i] for i in positive.tolist()]
        history = state.history.vectors[positive]
    out = []
    nearest_idx = nearest_sim = None
    if history_ids:
        nearest_idx, nearest_sim = scoring.nearest(history, vectors[order])
    for pos, i in enumerate(order.tolist()):
        if not has_vector[i]:
            out.append(Explanation(False, summary="no vector (no text, not cached): ranked by upstream score"))
            continue
        if nearest_idx is None or nearest_sim is None:
            out.append(Explanation(True, summary="cold user: ranked by upstream score"))
            continue
        hist_id, sim = history_ids[int(nearest_idx[pos])], float(nearest_sim[pos])
        summary = f"semantic {semantic[i]:.3f}; most like recent item {hist_id} ({sim:.3f})"
        out.append(Explanation(True, hist_id, sim, summary))
    return out
