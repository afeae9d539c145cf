"""`reranker replay`: play an events file against a running server as live traffic.

The timeline (events sorted by time, optionally only some users) is cut in three:
1. events before `fit_fraction` train the upstream (an item-kNN retriever, "yesterday's model");
2. events before `start` only build profiles (RecordEvents, no list served; skipped with
   `bootstrap=False` when an earlier replay up to `start` sent them already);
3. from `start` to `stop`, every event is preceded by a Rerank of that user's upstream list: the
   retriever's top `num_candidates` unseen items given the user's history so far (with
   `include_seen`, consumed items stay in the list, as real upstream lists keep them), in its order,
   with its scores; then the event itself is recorded (timestamp left to the server's clock, so
   the served list comes before the event it is judged by, as in production).

With the server's training log on, the log then holds what a deployment would: the served lists
and every event. The replay also keeps its own client-side score per arm (was the event's item in
the first k of the answer?), to set beside the server's online metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from reranker.client import RerankerClient
from reranker.evaluation import formats
from reranker.evaluation.retrievers import ItemKNN
from reranker.v1 import reranker_pb2 as pb

T = TypeVar("T")


@dataclass
class ReplayReport:
    bootstrap_events: int = 0
    lists: int = 0
    events: int = 0
    failed: int = 0
    seconds: float = 0.0
    # arm -> [lists, hits@k, ndcg@k sums] as the client saw them
    arms: dict[str, list[float]] = field(default_factory=dict)

    def summary(self, k: int) -> dict[str, object]:
        return {
            "bootstrap_events": self.bootstrap_events, "lists": self.lists, "events": self.events,
            "failed_rpcs": self.failed, "seconds": round(self.seconds, 1),
            "per_arm": {
                arm: {"lists": int(n), f"hits@{k}": round(h / n, 4), f"ndcg@{k}": round(g / n, 4)}
                for arm, (n, h, g) in sorted(self.arms.items()) if n
            },
        }


def timeline(events: Sequence[formats.Interaction], max_users: int = 0) -> list[formats.Interaction]:
    """Events in time order (stable), of the first `max_users` users by first appearance (0 = all)."""
    ordered = sorted(events, key=lambda e: e.timestamp)
    if max_users > 0:
        users: dict[str, None] = {}
        for e in ordered:
            if len(users) >= max_users:
                break
            users.setdefault(e.user_id)
        ordered = [e for e in ordered if e.user_id in users]
    return ordered


def _to_pb(e: formats.Interaction) -> pb.Event:
    return pb.Event(user_id=e.user_id, item_id=e.item_id, type=pb.EventType.Value("EVENT_TYPE_" + e.event_type.upper()))


class _KnnUpstream:
    """The replayed upstream: an item-kNN retriever fitted on `past`, scoring each user's history so far
    (fed event by event through `remember`)."""

    def __init__(self, past: dict[str, list[str]], catalog: list[str]) -> None:
        self.knn = ItemKNN().fit(past, catalog)
        self.history: dict[str, np.ndarray] = {}
        self.seen: dict[str, set[str]] = {}

    def remember(self, e: formats.Interaction) -> None:
        row = self.history.setdefault(e.user_id, np.zeros((1, len(self.knn.items)), dtype=np.float32))
        j = self.knn.item_index.get(e.item_id)
        if j is not None:
            row[0, j] += 1.0
        self.seen.setdefault(e.user_id, set()).add(e.item_id)

    def candidates(self, user_id: str, num_candidates: int, include_seen: bool) -> list[tuple[str, float]]:
        """The user's upstream list: the top `num_candidates` items by score, consumed items left out
        unless `include_seen`; empty for a user with no history yet."""
        row = self.history.get(user_id)
        if row is None:
            return []
        # ItemKNN's score of this history: sum of cosines to the items seen so far
        scores = ((row > 0).astype(np.float32) @ self.knn.sim)[0].astype(np.float64)
        for item in () if include_seen else self.seen[user_id]:
            j = self.knn.item_index.get(item)
            if j is not None:
                scores[j] = -np.inf
        top = np.argsort(-scores, kind="stable")[:num_candidates]
        return [(self.knn.items[j], float(scores[j])) for j in top.tolist() if np.isfinite(scores[j])]


def _serve(
    client: RerankerClient, report: ReplayReport, e: formats.Interaction, cands: list[tuple[str, float]], top_k: int
) -> None:
    """Rerank the user's list before event `e`; score the answer by whether it holds `e`'s item."""
    try:
        reply = client.rerank(e.user_id, cands, top_k=top_k)
    except Exception:
        report.failed += 1
        return
    report.lists += 1
    returned = [it.item_id for it in reply.items]
    stats = report.arms.setdefault(reply.arm or "bypassed", [0.0, 0.0, 0.0])
    stats[0] += 1
    if e.item_id in returned:
        stats[1] += 1
        stats[2] += 1.0 / float(np.log2(returned.index(e.item_id) + 2))


def _record(client: RerankerClient, report: ReplayReport, e: formats.Interaction) -> None:
    try:
        client.record_events([_to_pb(e)])
        report.events += 1
    except Exception:
        report.failed += 1


def _send_in_batches(send: Callable[[list[T]], object], rows: Sequence[T], batch: int) -> None:
    for i in range(0, len(rows), batch):
        send(list(rows[i : i + batch]))


def replay(
    client: RerankerClient,
    items: dict[str, str],
    events: Sequence[formats.Interaction],
    *,
    fit_fraction: float = 0.5,
    start: float = 0.5,
    stop: float = 1.0,
    num_candidates: int = 50,
    top_k: int = 10,
    batch: int = 500,
    upsert: bool = True,
    bootstrap: bool = True,
    include_seen: bool = False,
    every: int = 0,
    on_lists: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Replay `events` (already in time order, see `timeline`) against the server behind `client`.
    `on_lists(n)` is called after every `every` served lists (e.g. a learner's look, in lockstep)."""
    report = ReplayReport()
    started = time.perf_counter()
    n = len(events)
    fit_end, start_at, stop_at = int(n * fit_fraction), int(n * start), int(n * stop)
    past: dict[str, list[str]] = {}
    for e in events[:fit_end]:
        past.setdefault(e.user_id, []).append(e.item_id)
    upstream = _KnnUpstream(past, list(items))
    if upsert:
        _send_in_batches(client.upsert_items, [(x, items[x]) for x in items], batch)
    before = events[:start_at]  # the server has them already when `bootstrap` is False (an earlier replay)
    if bootstrap:
        _send_in_batches(client.record_events, [_to_pb(e) for e in before], batch)
        report.bootstrap_events = len(before)
    for e in before:
        upstream.remember(e)
    looked = 0
    for e in events[start_at:stop_at]:
        cands = upstream.candidates(e.user_id, num_candidates, include_seen)
        if cands:
            _serve(client, report, e, cands, top_k)
        _record(client, report, e)
        upstream.remember(e)
        if on_lists is not None and every > 0 and report.lists - looked >= every:
            looked = report.lists
            on_lists(report.lists)
    report.seconds = time.perf_counter() - started
    return report
