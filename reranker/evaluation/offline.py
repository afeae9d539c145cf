"""Score candidate lists with a trained head offline, the way the server scores them, without gRPC.

`experiments/validate_head.py` chooses `reranker train` settings with it (thousands of lists in
seconds). It is only worth that if it orders a list exactly as the server does: the profiles are
built by the server's own `CompactProfileStore` from the same events, and the head is called
with the same user vector, liked history and liked history ids as `RerankService` (and the
settings' default MMR diversity).
tests/test_eval_cli.py checks the parity against `reranker eval` through a real server.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from reranker.users import profiles
from reranker.ranking import scoring
from reranker.config import Settings
from reranker.evaluation import formats
from reranker.ranking.head import RankingHead
from reranker.users.compact import CompactProfileStore, table_lookup
from reranker.users.profiles import ProfileConfig
from reranker.types import Event, EventType


def gather_vectors(
    ids: Sequence[str], index: Mapping[str, int], vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 vectors, has_vector) of `ids` from a catalog matrix whose rows `index` gives; an
    id outside the catalog gets a zero row and has_vector False, as an uncached item does in the
    server."""
    rows = np.array([index.get(i, -1) for i in ids], dtype=np.int64)
    has_vector = rows >= 0
    return np.where(has_vector[:, None], vectors[np.maximum(rows, 0)], 0.0).astype(np.float32), has_vector


class OfflineScorer:
    """Profiles of `histories` (per user, oldest first) and catalog vectors; `order` reranks one list."""

    def __init__(
        self,
        head: RankingHead,
        settings: Settings,
        catalog: Sequence[str],
        vectors: np.ndarray,
        histories: Mapping[str, Sequence[formats.Interaction]],
        *,
        now: float | None = None,
    ) -> None:
        self._head = head
        self._settings = settings
        self._index = {item: j for j, item in enumerate(catalog)}
        self._vectors = np.asarray(vectors, dtype=np.float32)
        self._store = CompactProfileStore(
            ProfileConfig.from_settings(settings.users, self._vectors.shape[1]), table_lookup(self._index, self._vectors),
            max_users=max(1, 2 * len(histories)),
            ttl_seconds=settings.users.user_ttl_seconds,
        )
        self._store.apply(
            [(Event(user, e.item_id, EventType[e.event_type.upper()], e.timestamp), self._vector(e.item_id))
             for user, events in histories.items() for e in events],
            now=time.time() if now is None else now,
        )

    def _vector(self, item_id: str) -> np.ndarray | None:
        j = self._index.get(item_id)
        return None if j is None else self._vectors[j]

    def order(self, user_id: str, rows: Sequence[formats.CandidateRow]) -> list[str]:
        """The head's order of one list; the upstream order for a cold user (as the server does)."""
        ids = [r.item_id for r in rows]
        state = self._store.get(user_id)
        user_vector = profiles.user_vector(state, self._settings.users)
        if state is None or user_vector is None or not ids:
            return ids
        candidates, has_vector = gather_vectors(ids, self._index, self._vectors)
        seen = profiles.candidate_history(state, self._settings.users, ids, candidates, has_vector, user_vector)
        ranking = self._head.rank(
            ids, np.array([r.score for r in rows], dtype=np.float64), candidates, has_vector, user_vector,
            profiles.positive_history(state), profiles.positive_history_ids(state),
            diversity=self._settings.ranking.diversity, mmr_window=self._settings.ranking.mmr_window,
            seen=profiles.on_liked_rows(seen, state),
        )
        order, _ = scoring.apply_consumed_policy(ranking.order, seen.consumed, self._settings.ranking.consumed_policy)
        return [ids[j] for j in order.tolist()]
