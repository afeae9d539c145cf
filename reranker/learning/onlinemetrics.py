"""Online metrics: each logged list joined with its user's next positive event, per experiment arm.

Runs on the training-log writer thread (a sink of traininglog.TrainingLog): the request path only
appended a record to a queue. Both sides use the server's clock (when the list was served, when the
event was received), never the event's own timestamp, so replayed or late-stamped events still join.

Estimator, per (arm, model_version), over the lists logged since start:
- a list is *judged* when its user's next positive event (weight > 0: view, click, ... not dislike
  or skip) arrives within `online_metrics_window_seconds` of serving it; that event is the target;
- hits@k = 1 when the target is among the first k items returned, NDCG@k = 1 / log2(2 + rank)
  (one relevant item, so the ideal DCG is 1), else 0;
- /metrics carries the sums and the counts (`reranker_online_hits_sum / reranker_online_lists_judged`
  is the mean; rate() over both gives it over a time window), and the mean since start as a gauge.
  Lists with no event in the window are counted (`..._expired`), not judged.

Biases (read an A/B readout with them in mind):
- position bias: the user saw the returned order, so an item shown at the top is more likely to be
  the next event whatever its relevance; each arm is scored on its own order, which favours the arm
  in hits@k whenever users click what is on top. Comparing arms is fair (both have the bias), the
  absolute values are not offline NDCG;
- only logged lists count (`training_log_sample`), only the next positive event is the target
  (later ones in the window do not count), and a user with several open lists resolves them all
  with one event;
- the next event may come from elsewhere in the product (search, another list): it is the user's
  next interest, not necessarily a click on this list;
- bounded memory: at most `online_metrics_max_lists` lists wait; past that the oldest is dropped
  (`..._evicted`), which under-counts users who come back late.

Cold users: a treatment user with no usable profile gets VARIANT_RERANKED in the upstream order.
The `..._by_order` series split each arm's lists, judged lists, hits and NDCG by the order actually
served (`order_of`): `personalized` (reranked with the user's profile), `cold` (reranked variant, no
profile: the upstream order) and `upstream` (control, or a fallback). The per-arm series above stay
the intention-to-treat totals; docs/learning-loop.md says how to read an A/B with both.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from reranker.config import LearningSettings
from reranker.learning.traininglog import EventsRecord, ServedRecord
from reranker.types import UPSTREAM, EventType, Variant, order_of

# Counted arms: everything that answered with an order the arm chose (fallbacks count in their arm:
# intention to treat). Bypassed lists belong to no arm.
_JOINED = (Variant.RERANKED, Variant.CONTROL, Variant.FALLBACK)

@dataclass(slots=True)
class _Pending:
    user_id: str
    served_at: float
    top: tuple[str, ...]
    key: tuple[str, str]  # (arm, model_version)
    order: str = UPSTREAM  # order_of(result)


@dataclass(slots=True)
class ArmStats:
    lists: int = 0
    judged: int = 0
    hits: float = 0.0
    ndcg: float = 0.0
    expired: int = 0
    evicted: int = 0


class OnlineMetrics(Collector):
    """The join (fed by `__call__`, a training-log sink) and its Prometheus collector."""

    def __init__(self, settings: LearningSettings, registry: CollectorRegistry | None = None, *,
                 event_weights: Mapping[str, float]) -> None:
        """`event_weights`: the users section's parsed_event_weights(); a positive weight marks a hit."""
        self.window = settings.online_metrics_window_seconds
        self.k = settings.online_metrics_k
        self.max_lists = settings.online_metrics_max_lists
        self._positive = {t for t in EventType if event_weights.get(t.name.lower(), 0.0) > 0}
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._by_user: dict[str, list[int]] = {}
        self._seq = 0
        self._lock = threading.Lock()  # the writer thread updates, a scrape reads
        self.stats: dict[tuple[str, str], ArmStats] = {}
        self.by_order: dict[tuple[str, str, str], ArmStats] = {}  # (arm, model_version, order)
        if registry is not None:
            registry.register(self)

    def __call__(self, record: Any) -> None:
        if isinstance(record, ServedRecord):
            self.served(record)
        elif isinstance(record, EventsRecord):
            self.events(record)

    def served(self, record: ServedRecord) -> None:
        result = record.result
        if result.variant not in _JOINED or not result.arm:
            return
        items = result.items
        ids = getattr(items, "item_ids", None)
        top = tuple(ids[: self.k] if ids is not None else [it.item_id for it in list(items)[: self.k]])
        key = (result.arm, result.model_version)
        order = order_of(result)
        user = record.query.user_id
        with self._lock:
            self._expire(record.served_at)
            self._stats(key).lists += 1
            self._order_stats(key, order).lists += 1
            while len(self._pending) >= self.max_lists:
                _, old = self._pending.popitem(last=False)
                self._forget(old)
                self._stats(old.key).evicted += 1
            self._seq += 1
            self._pending[self._seq] = _Pending(user, record.served_at, top, key, order)
            self._by_user.setdefault(user, []).append(self._seq)

    def events(self, record: EventsRecord) -> None:
        with self._lock:
            self._expire(record.received_at)
            for e in record.events:
                positive = e.weight > 0 if e.weight is not None else e.type in self._positive
                if not positive:
                    continue
                waiting = self._by_user.pop(e.user_id, None)
                if not waiting:
                    continue
                for seq in waiting:
                    pending = self._pending.pop(seq)
                    for stats in (self._stats(pending.key), self._order_stats(pending.key, pending.order)):
                        stats.judged += 1
                        if e.item_id in pending.top:
                            rank = pending.top.index(e.item_id)
                            stats.hits += 1.0
                            stats.ndcg += 1.0 / math.log2(rank + 2)

    def _expire(self, now: float) -> None:
        pending = self._pending
        while pending:
            seq, first = next(iter(pending.items()))
            if now - first.served_at <= self.window:
                break
            del pending[seq]
            self._forget(first)
            self._stats(first.key).expired += 1

    def _forget(self, old: _Pending) -> None:
        waiting = self._by_user.get(old.user_id)
        if waiting:
            # The oldest list of a user is the first of its list.
            waiting.pop(0)
            if not waiting:
                del self._by_user[old.user_id]

    def _stats(self, key: tuple[str, str]) -> ArmStats:
        stats = self.stats.get(key)
        if stats is None:
            stats = self.stats[key] = ArmStats()
        return stats

    def _order_stats(self, key: tuple[str, str], order: str) -> ArmStats:
        full = (*key, order)
        stats = self.by_order.get(full)
        if stats is None:
            stats = self.by_order[full] = ArmStats()
        return stats

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def snapshot(self) -> dict[tuple[str, str], ArmStats]:
        with self._lock:
            return {key: ArmStats(**{f: getattr(s, f) for f in ArmStats.__dataclass_fields__}) for key, s in self.stats.items()}

    def collect(self) -> Iterator[Any]:
        labels = ["arm", "model_version"]
        k = str(self.k)
        lists = CounterMetricFamily("reranker_online_lists", "Logged lists per arm (online metrics join).", labels=labels)
        judged = CounterMetricFamily(
            "reranker_online_lists_judged", "Lists followed by their user's positive event within the window.", labels=labels
        )
        expired = CounterMetricFamily(
            "reranker_online_lists_expired", "Lists with no positive event of their user within the window.", labels=labels
        )
        evicted = CounterMetricFamily(
            "reranker_online_lists_evicted", "Lists dropped unjudged because online_metrics_max_lists were waiting.",
            labels=labels,
        )
        hits = CounterMetricFamily(
            "reranker_online_hits", "Sum over judged lists of hits@k (the next event among the first k returned).",
            labels=labels + ["k"],
        )
        ndcg = CounterMetricFamily("reranker_online_ndcg", "Sum over judged lists of NDCG@k.", labels=labels + ["k"])
        hits_mean = GaugeMetricFamily(
            "reranker_online_hits_at_k", "hits@k averaged over the judged lists since start.", labels=labels + ["k"]
        )
        ndcg_mean = GaugeMetricFamily(
            "reranker_online_ndcg_at_k", "NDCG@k averaged over the judged lists since start.", labels=labels + ["k"]
        )
        waiting = GaugeMetricFamily("reranker_online_lists_waiting", "Lists waiting for their user's next event.")
        by_order = ["arm", "model_version", "order"]
        order_lists = CounterMetricFamily(
            "reranker_online_lists_by_order",
            "Logged lists per arm by the order served: personalized, cold (no profile: upstream order), upstream.",
            labels=by_order,
        )
        order_judged = CounterMetricFamily(
            "reranker_online_lists_judged_by_order", "Judged lists per arm by the order served.", labels=by_order
        )
        order_hits = CounterMetricFamily(
            "reranker_online_hits_by_order", "Sum of hits@k over judged lists, per arm by the order served.",
            labels=by_order + ["k"],
        )
        order_ndcg = CounterMetricFamily(
            "reranker_online_ndcg_by_order", "Sum of NDCG@k over judged lists, per arm by the order served.",
            labels=by_order + ["k"],
        )
        with self._lock:
            for (arm, version), s in self.stats.items():
                lists.add_metric([arm, version], s.lists)
                judged.add_metric([arm, version], s.judged)
                expired.add_metric([arm, version], s.expired)
                evicted.add_metric([arm, version], s.evicted)
                hits.add_metric([arm, version, k], s.hits)
                ndcg.add_metric([arm, version, k], s.ndcg)
                hits_mean.add_metric([arm, version, k], s.hits / s.judged if s.judged else 0.0)
                ndcg_mean.add_metric([arm, version, k], s.ndcg / s.judged if s.judged else 0.0)
            waiting.add_metric([], len(self._pending))
            for (arm, version, order), s in self.by_order.items():
                order_lists.add_metric([arm, version, order], s.lists)
                order_judged.add_metric([arm, version, order], s.judged)
                order_hits.add_metric([arm, version, order, k], s.hits)
                order_ndcg.add_metric([arm, version, order, k], s.ndcg)
        yield from (lists, judged, expired, evicted, hits, ndcg, hits_mean, ndcg_mean, waiting,
                    order_lists, order_judged, order_hits, order_ndcg)
