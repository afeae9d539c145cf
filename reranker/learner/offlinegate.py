"""The learner's offline gate: score the newest, held-out slice of the log with several heads.

Each head (None = zero-shot, the fixed blend) gets its own in-process `RerankService` with the
sidecars' settings: the server's own code orders every list, so the gate measures what would be
served (consumed-item policy, MMR, fallbacks for cold users included), with nothing re-implemented.
The services are fed the log's events forward in time; before each held-out list, every event
logged before it was served has been recorded, so each list is scored from the profile its user
had then. A list's label is its user's first event at or after it was served (as `reranker train`
labels served lists); NDCG@k = 1 / log2(2 + rank of the label in the service's order), 0 when the
label is not among the first k (or not in the list at all: those lists count, for every head alike).

`paired` compares two heads on the same lists: the mean of the per-list differences and its 95%
interval (normal approximation; one interval, read once, so no sequential correction is needed).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reranker.config import Settings
from reranker.evaluation import formats
from reranker.evaluation.train import label_served_lists
from reranker.model.encoder import Encoder
from reranker.ranking import head as ranking_head
from reranker.service import RerankService
from reranker.types import Candidate, Event, EventType, Item, RerankQuery

RECORD_BATCH = 500


class CachedEncoder:
    """Vectors of texts already encoded are looked up, not recomputed (the catalog is encoded once
    per learner process, not once per training and per gate service)."""

    def __init__(self, encoder: Encoder) -> None:
        self.dim, self.version, self._encoder = encoder.dim, encoder.version, encoder
        self._vectors: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            for text, vector in zip(chunk, self._encoder.encode(chunk)):
                self._vectors[text] = np.asarray(vector, dtype=np.float32)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts])


@dataclass(frozen=True)
class Paired:
    """mean(a - b) over the same lists, with its 95% interval."""

    lists: int
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def paired(a: np.ndarray, b: np.ndarray) -> Paired:
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = d.size
    if n == 0:
        return Paired(0, 0.0, 0.0, 0.0, -math.inf, math.inf)
    se = float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    mean = float(d.mean())
    return Paired(n, float(np.mean(a)), float(np.mean(b)), mean, mean - 1.96 * se, mean + 1.96 * se)


def gate_settings(settings: Settings, head_path: str, users: int) -> Settings:
    """The sidecars' settings for one in-process scorer: this head for everyone, profiles in process
    (large enough for every user of the log), no logs, no Redis, no arms."""
    return dataclasses.replace(
        settings, head_path=head_path, experiment_arms="", treatment_percent=100.0, kill_switch=False,
        training_log_dir="", online_metrics_window_seconds=0.0, redis_url="", stream_url="", snapshot_path="",
        catalog_path="", metrics_address="", health_address="", warmup=False,
        user_cache_size=max(settings.users.user_cache_size, 2 * users + 16),
    )


def score_lists(
    settings: Settings,
    encoder: Encoder,
    items: Mapping[str, str],
    heads: Mapping[str, ranking_head.RankingHead | None],
    events: Sequence[formats.Interaction],
    lists: Sequence[formats.ServedList],
    k: int = 10,
) -> dict[str, np.ndarray]:
    """NDCG@k per labelled list of `lists` for each named head (see the module doc). `events` are
    the log's events in time order (all of them: history before the lists and labels after)."""
    labelled = label_served_lists(lists, events)
    order = sorted(labelled.lists, key=lambda pair: pair[0].timestamp or 0.0)
    labels = [labelled.timelines[sl.user_id][at].item_id for sl, at in order]
    users = len({e.user_id for e in events})
    out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="reranker-gate-") as tmp:
        for name, head in heads.items():
            path = ""
            if head is not None:
                path = str(Path(tmp) / f"{name}.npz")
                head.save(path)
            service = RerankService(gate_settings(settings, path, users), encoder)
            service.load()
            try:
                out[name] = _score(service, items, events, order, labels, k)
            finally:
                service.close()
    return out


def _score(
    service: RerankService,
    items: Mapping[str, str],
    events: Sequence[formats.Interaction],
    order: Sequence[tuple[formats.ServedList, int]],
    labels: Sequence[str],
    k: int,
) -> np.ndarray:
    catalog = [Item(i, t) for i, t in items.items()]
    for start in range(0, len(catalog), 256):
        service.upsert_items(catalog[start : start + 256])
    fed = 0
    scores = np.zeros(len(order))

    def feed(until: float) -> None:
        nonlocal fed
        stop = fed
        while stop < len(events) and events[stop].timestamp < until:
            stop += 1
        for start in range(fed, stop, RECORD_BATCH):
            batch = events[start : min(stop, start + RECORD_BATCH)]
            service.record_events([
                Event(e.user_id, e.item_id, EventType[e.event_type.upper()], e.timestamp,
                      text=items.get(e.item_id))
                for e in batch
            ], time_remaining=600.0)
        fed = stop

    for j, ((served, _), label) in enumerate(zip(order, labels)):
        feed(served.timestamp if served.timestamp is not None else time.time())
        query = RerankQuery(served.user_id, tuple(Candidate(r.item_id, r.score) for r in served.rows))
        ids = list(service.rerank(query).items.item_ids)  # type: ignore[attr-defined]
        rank = ids.index(label) if label in ids[:k] else -1
        scores[j] = 1.0 / math.log2(rank + 2) if rank >= 0 else 0.0
    return scores
