"""Prometheus metrics of one server, in its own CollectorRegistry (several servers can share a process).

Recorded at the edges, never inside the numpy core:
- RPC latency / outcome / variant / fallback reason: the Observer wrapped around each handler (observability.py);
- encoder batch size, queue wait and batch time: the MicroBatcher's observer callback;
- model load time: RerankService.load();
- cache hits and misses: read at scrape time from the counters ItemVectorCache and
  the profile stores already keep (a custom collector, no double counting).

The series are documented in docs/operations.md, "Metrics"; tests/test_metrics.py scrapes them.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Sidecar latencies live in the low milliseconds; the buckets resolve 0.5 ms .. 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _CacheCollector(Collector):
    """Exposes hit/miss counters owned by the caches, read at scrape time."""

    def __init__(self, source: Callable[[], dict[str, tuple[int, int, int]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        lookups = CounterMetricFamily(
            "reranker_cache_lookups", "Cache lookups by cache (items, users) and result (hit, miss).",
            labels=["cache", "result"],
        )
        ratio = GaugeMetricFamily(
            "reranker_cache_hit_ratio", "Hits / lookups since start, by cache (items, users); 0 before any lookup.",
            labels=["cache"],
        )
        size = GaugeMetricFamily("reranker_cache_entries", "Entries held, by cache (items, users).", labels=["cache"])
        for cache, (hits, misses, entries) in self._source().items():
            lookups.add_metric([cache, "hit"], hits)
            lookups.add_metric([cache, "miss"], misses)
            total = hits + misses
            ratio.add_metric([cache], hits / total if total else 0.0)
            size.add_metric([cache], entries)
        yield lookups
        yield ratio
        yield size


class _OrderCollector(Collector):
    def __init__(self, counts: dict[tuple[str, str], int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily(
            "reranker_rerank_orders",
            "Rerank answers by experiment arm (`bypassed` for bypass) and the order served: personalized (the "
            "user's profile), cold (VARIANT_RERANKED for a user with no profile: the upstream order), upstream "
            "(control, bypass, fallback).",
            labels=["arm", "order"],
        )
        for (arm, order), count in list(self._counts.items()):
            family.add_metric([arm or "bypassed", order], count)
        yield family


class _RepairCollector(Collector):
    def __init__(self, source: Callable[[], int]) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "reranker_profile_repairs",
            "User profiles whose decay clock was ahead of server time (a future event folded by an older build, "
            "from a snapshot or Redis) and were repaired on load or read.",
            value=self._source(),
        )


class _UnreadableCollector(Collector):
    def __init__(self, source: Callable[[], dict[str, int]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily(
            "reranker_profile_unreadable",
            "Users whose profile in Redis was unreadable (a key of another type, junk, a wrong layout, an id that is "
            "not UTF-8, a number that is not finite) and was dropped: the user started over. By reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self._source().items()):
            family.add_metric([reason], count)
        yield family


class _LateEncodeCollector(Collector):
    def __init__(self, source: Callable[[], tuple[int, int]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        filled, dropped = self._source()
        family = CounterMetricFamily(
            "reranker_encoder_late_texts",
            "Texts nobody waited for any more (deadline passed, caller gone, fail-open answer): filled = "
            "encoded into the item cache anyway, dropped = pushed out of the encoder queue by waited-for work.",
            labels=["outcome"],
        )
        family.add_metric(["filled"], filled)
        family.add_metric(["dropped"], dropped)
        yield family


class LoopHistogram:
    """One histogram series observed from one thread (the server's event loop): a plain int per
    bucket and a float sum, no lock and no object per observation. A prometheus_client Histogram
    child takes a lock for the sum and one for the bucket, and walks its buckets with an iterator
    (~2 us a call); this is a bisect and two additions. Read at scrape time by LoopHistograms."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound is in its bucket
        self.sum += value


class _LoopFamily(Collector):
    """A family of loop-thread children, one per label values, each created on first use
    (`child(...)`: keep it, the lookup is the costly part) and exposed at scrape time."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def _new_child(self) -> Any:
        raise NotImplementedError

    def child(self, *values: str) -> Any:
        found = self._children.get(values)
        if found is None:
            with self._lock:
                found = self._children.setdefault(values, self._new_child())
        return found


class LoopHistograms(_LoopFamily):
    """A histogram family of LoopHistogram children."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        super().__init__(name, documentation, labels)
        self.buckets = tuple(buckets)

    def _new_child(self) -> LoopHistogram:
        return LoopHistogram(self.buckets)

    def child(self, *values: str) -> LoopHistogram:
        return super().child(*values)  # type: ignore[no-any-return]

    def collect(self) -> Iterator[Any]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))
        edges = [floatToGoString(b) for b in self.buckets] + ["+Inf"]
        for values, child in list(self._children.items()):
            running, buckets = 0, []
            for edge, count in zip(edges, list(child.counts)):
                running += count
                buckets.append((edge, running))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class LoopCount:
    """One counter series bumped from one thread (the server's event loop): a plain int."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class LoopCounters(_LoopFamily):
    """A counter family of LoopCount children (see LoopHistograms)."""

    def _new_child(self) -> LoopCount:
        return LoopCount()

    def child(self, *values: str) -> LoopCount:
        return super().child(*values)  # type: ignore[no-any-return]

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class Metrics:
    """All series of one server. Thread-safe (prometheus_client metrics are), except the series the
    Observer records per RPC (rpc_latency, rpcs, rerank_candidates, rerank_orders): plain ints written
    from the server's event-loop thread only, read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Observed once per RPC on the event loop (observe_rpc): plain-int histograms, see LoopHistogram.
        self.rpc_latency = LoopHistograms(
            "reranker_rpc_duration_seconds",
            "Server-side RPC latency, by method and variant (variant is empty for RPCs other than Rerank).",
            ("method", "variant"),
            LATENCY_BUCKETS,
        )
        r.register(self.rpc_latency)
        self.rpcs = LoopCounters("reranker_rpcs", "Finished RPCs by method and gRPC status code.", ("method", "code"))
        r.register(self.rpcs)
        rerank_candidates = LoopHistograms(
            "reranker_rerank_candidates", "Candidates per Rerank request.", (), (1, 10, 50, 100, 200, 500, 1000, 2000),
        )
        r.register(rerank_candidates)
        self.rerank_candidates = rerank_candidates.child()
        self.fallbacks = Counter(
            "reranker_fallbacks", "Rerank calls answered with the upstream order because of a problem, by reason.",
            ["reason"], registry=r,
        )
        self.encoder_batch_size = Histogram(
            "reranker_encoder_batch_size", "Texts per encoder batch (micro-batcher).", buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.encoder_queue_wait = Histogram(
            "reranker_encoder_queue_wait_seconds", "Time the oldest text of a batch waited before encoding started.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.encoder_batch_duration = Histogram(
            "reranker_encoder_batch_duration_seconds", "Encoder time per batch (tokenize + forward).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.encoder_failures = Counter(
            "reranker_encoder_failed_batches", "Encoder batches that raised or returned unusable output.", registry=r
        )
        self.model_load_seconds = Gauge(
            "reranker_model_load_seconds", "Wall time of the last model load including warm-up (0 until loaded).",
            registry=r,
        )
        self.model_info = Gauge(
            "reranker_model_info", "Always 1; the served model in the `model_version` label.", ["model_version"],
            registry=r,
        )
        self._named_models: set[str] = set()  # the model_version labels model_info holds
        self._model_info_lock = threading.Lock()
        self.ready = Gauge("reranker_ready", "1 when the model is loaded and Rerank personalizes.", registry=r)
        self.event_times_clamped = Counter(
            "reranker_event_times_clamped",
            "Accepted events whose time was after server time (by at most max_event_skew_seconds), clamped to now.",
            registry=r,
        )
        self.events_refused = Counter(
            "reranker_events_refused",
            "Requests refused (INVALID_ARGUMENT) for an event's field beyond the event policy: `timestamp` more than "
            "max_event_skew_seconds after server time, or `weight` beyond max_event_weight / not finite.",
            ["field"], registry=r,
        )
        # Rerank answers by (arm, order): plain ints bumped on the event-loop thread (~0.1 us, where a
        # prometheus_client Counter child costs ~2 us with its lock), exposed at scrape time.
        self.rerank_orders: dict[tuple[str, str], int] = {}
        r.register(_OrderCollector(self.rerank_orders))
        self._rpc_children: dict[tuple[str, str, str], tuple[LoopHistogram, LoopCount]] = {}
        self._cache_lock = threading.Lock()
        self._cache_source: Callable[[], dict[str, tuple[int, int, int]]] = dict
        r.register(_CacheCollector(self._read_caches))
        self._repairs_source: Callable[[], int] = lambda: 0
        r.register(_RepairCollector(lambda: self._repairs_source()))
        self._unreadable_source: Callable[[], dict[str, int]] = dict
        r.register(_UnreadableCollector(lambda: self._unreadable_source()))
        self._late_source: Callable[[], tuple[int, int]] = lambda: (0, 0)
        r.register(_LateEncodeCollector(lambda: self._late_source()))

    # --- hooks called by the service -------------------------------------------------------------
    def model_loaded(self, seconds: float, model_version: str) -> None:
        self.model_load_seconds.set(seconds)
        self.name_models({model_version})
        self.ready.set(1)

    def name_models(self, versions: set[str]) -> None:
        """model_info names exactly `versions`: the new ones are set before the old ones are removed
        (a scrape in between never sees no model at all)."""
        with self._model_info_lock:
            for version in versions:
                self.model_info.labels(model_version=version).set(1)
            for version in self._named_models - versions:
                self.model_info.remove(version)
            self._named_models = set(versions)

    def not_ready(self) -> None:
        self.ready.set(0)

    def observe_batch(self, size: int, queue_wait_s: float, encode_s: float, ok: bool) -> None:
        """MicroBatcher observer: one call per encoder batch."""
        self.encoder_batch_size.observe(size)
        self.encoder_queue_wait.observe(max(0.0, queue_wait_s))
        self.encoder_batch_duration.observe(max(0.0, encode_s))
        if not ok:
            self.encoder_failures.inc()

    def watch_caches(self, source: Callable[[], dict[str, tuple[int, int, int]]]) -> None:
        """`source()` -> {cache name: (hits, misses, entries)}, read at every scrape."""
        with self._cache_lock:
            self._cache_source = source

    def watch_profile_repairs(self, source: Callable[[], int]) -> None:
        """`source()` -> profiles repaired so far (a decay clock ahead of now), read at every scrape."""
        self._repairs_source = source

    def watch_unreadable_profiles(self, source: Callable[[], dict[str, int]]) -> None:
        """`source()` -> {reason: users whose unreadable stored profile was dropped}, read at every scrape."""
        self._unreadable_source = source

    def watch_late_encodes(self, source: Callable[[], tuple[int, int]]) -> None:
        """`source()` -> (late texts filled into the item cache, late texts dropped), read at every scrape."""
        self._late_source = source

    def _read_caches(self) -> dict[str, tuple[int, int, int]]:
        with self._cache_lock:
            source = self._cache_source
        return source()

    # --- hooks called by observability.Observer --------------------------------------------------
    def observe_rpc(self, method: str, code: str, seconds: float, variant: str = "", fallback_reason: str = "") -> None:
        """One finished RPC. Called on the server's event-loop thread only (observability.Observer)."""
        # Label lookups cost microseconds each; the few (method, variant, code) children are kept.
        key = (method, code, variant)
        children = self._rpc_children.get(key)
        if children is None:
            children = self._rpc_children[key] = (
                self.rpc_latency.child(method, variant), self.rpcs.child(method, code)
            )
        children[0].observe(seconds)
        children[1].value += 1
        if fallback_reason:
            self.fallbacks.labels(reason=fallback_reason).inc()

    def observe_order(self, arm: str, order: str) -> None:
        """One Rerank answer: its arm and the order it served (types.order_of). Called on the server's
        event-loop thread only (observability.Observer), so the plain increment needs no lock."""
        key = (arm, order)
        self.rerank_orders[key] = self.rerank_orders.get(key, 0) + 1

    def exposition(self) -> bytes:
        """The text format a scrape returns (also handy in tests and debugging)."""
        return generate_latest(self.registry)


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port). Raises ValueError with the offending text."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics_address {address!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class MetricsEndpoint:
    """The /metrics HTTP server (prometheus_client's WSGI server on a daemon thread)."""

    def __init__(self, metrics: Metrics, address: str) -> None:
        from prometheus_client import start_http_server

        host, port = parse_address(address)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            raise RuntimeError(f"cannot serve metrics on {address}: {exc}") from exc
        self.port = int(self._httpd.server_port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
