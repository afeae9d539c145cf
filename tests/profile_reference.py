"""The ml-100k ranking scenario of experiments/compact_profile_fidelity.py, in a form a test can run
against a frozen reference (tests/data/ml100k_full_layout_rankings.npz).

Every ml-100k user's ratings but the last are recorded as CLICK events with event ids (global time
order, batches of 500) into one in-process RerankService (fake encoder, dim 384, default settings
otherwise). Then each user gets one Rerank of 100 candidates, all with upstream score 0 (the order
is the user model's alone): the held-out last rating, 30 of the user's own recorded items (always the
newest one: the consumed / leave-one-out path) and random unrated items, in random order (seed 0).

    PYTHONPATH=$PWD python tests/profile_reference.py OUT.npz [profile_layout]

writes the rankings: per user, the candidates in request order (`candidates`, item ids as
uint16), the ranking as positions into them (`order`, uint8) and the final scores in ranking order
(`scores`, float32).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from reranker.config import Settings
from reranker.evaluation.convert_ml100k import load_events, load_items
from reranker.service import RerankService
from reranker.types import Candidate, Event, EventType, Item, RerankQuery

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
REFERENCE = Path(__file__).resolve().parent / "data" / "ml100k_full_layout_rankings.npz"
CANDIDATES = 100
OWN_CANDIDATES = 30
RECORD_BATCH = 500


def rankings(**settings: object) -> dict[str, np.ndarray]:
    """The scenario's rankings by a service built with `settings` (over the defaults above)."""
    items = dict(load_items(ML100K))
    by_user: dict[str, list] = {}
    for e in load_events(ML100K):  # per user, in time order
        by_user.setdefault(e.user_id, []).append(e)
    users = sorted(by_user, key=int)
    history = {u: by_user[u][:-1] for u in users}
    target = {u: by_user[u][-1].item_id for u in users}
    service = RerankService(Settings(encoder="fake", fake_dim=384, metrics_address="", warmup=False,
                                     log_level="WARNING", access_log=False, user_cache_size=10_000, **settings))  # type: ignore[arg-type]
    service.load()
    try:
        catalog = [Item(i, t) for i, t in items.items()]
        for start in range(0, len(catalog), 200):
            service.upsert_items(catalog[start : start + 200], time_remaining=600.0)
        events = sorted((Event(f"u{u}", e.item_id, EventType.CLICK, e.timestamp, f"{u}-{k}", items[e.item_id])
                         for u in users for k, e in enumerate(history[u])), key=lambda e: e.timestamp)
        for start in range(0, len(events), RECORD_BATCH):
            result = service.record_events(events[start : start + RECORD_BATCH], time_remaining=600.0)
            assert result.duplicates == 0 and result.without_vector == 0, result
        rng = np.random.default_rng(0)
        ids = list(items)
        candidates = np.zeros((len(users), CANDIDATES), dtype=np.uint16)
        order = np.zeros((len(users), CANDIDATES), dtype=np.uint8)
        scores = np.zeros((len(users), CANDIDATES), dtype=np.float32)
        for row, u in enumerate(users):
            own = [i for i in dict.fromkeys(e.item_id for e in reversed(history[u])) if i != target[u]]  # newest first
            rated = {e.item_id for e in by_user[u]}
            older = own[1:]
            picked = own[:1] + [older[k] for k in rng.choice(len(older), min(OWN_CANDIDATES - 1, len(older)),
                                                                replace=False)]
            others = [i for i in rng.permutation(ids).tolist() if i not in rated][: CANDIDATES - 1 - len(picked)]
            chosen = [target[u], *picked, *others]
            chosen = [chosen[k] for k in rng.permutation(len(chosen))]
            result = service.rerank(RerankQuery(f"u{u}", tuple(Candidate(i, 0.0, items[i]) for i in chosen)))
            assert result.variant.name == "RERANKED" and not result.cold_user, (u, result)
            position = {item_id: k for k, item_id in enumerate(chosen)}
            candidates[row] = [int(i) for i in chosen]
            order[row] = [position[i] for i in result.items.item_ids]  # type: ignore[attr-defined]
            scores[row] = np.asarray(result.items.scores, dtype=np.float32)  # type: ignore[attr-defined]
    finally:
        service.close()
    return {"candidates": candidates, "order": order, "scores": scores}


if __name__ == "__main__":
    out = rankings(**({"profile_layout": sys.argv[2]} if len(sys.argv) > 2 else {}))
    np.savez_compressed(sys.argv[1], **out)
