"""Benchmark of the user model: event ingestion throughput, the latency a new event adds to the next
Rerank, and memory per user; with the in-process store and with Redis.

    reranker bench users [--redis-url redis://...] [--dim 384] [--quick]

Everything goes through a real gRPC server on loopback (the fake encoder, so item vectors are
cheap; they are upserted first, as a catalog warm-up would, and events name items by id). Without
--redis-url a throw-away redis-server is started when the binary is installed. Numbers print as a
markdown table; they are only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from reranker.config import Settings
from reranker.model.encoder import FakeEncoder
from reranker.service import RerankService
from reranker.serving.server import build_server
from reranker.tools.harness import RedisServer, RedisUnavailable
from reranker.types import Event, EventType
from reranker.users.compact import CompactProfileStore, table_lookup
from reranker.users.profiles import ProfileConfig
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc


ITEMS = 2000


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def ev(user: str, i: int, event_id: str = "") -> pb.Event:
    return pb.Event(user_id=user, item_id=f"item-{i % ITEMS}", type=pb.EVENT_TYPE_CLICK, event_id=event_id)


def run_backend(label: str, settings: Settings, args: argparse.Namespace) -> list[tuple[str, str]]:
    service = RerankService(settings, FakeEncoder(settings.model.fake_dim))
    running = build_server(settings, service)
    running.loader.join(60)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.RerankerServiceStub(channel)
    rows: list[tuple[str, str]] = []
    try:
        for start in range(0, ITEMS, 500):
            stub.UpsertItems(pb.UpsertItemsRequest(items=[
                pb.Item(item_id=f"item-{i}", text=f"item {i} topic{i % 37} genre{i % 11}") for i in range(start, start + 500)
            ]))
        n_batch = 20_000 // args.scale
        users = 1000
        # unary RecordEvents, batches of 100
        started = time.perf_counter()
        for b in range(0, n_batch, 100):
            stub.RecordEvents(pb.RecordEventsRequest(events=[ev(f"u{(b + k) % users}", b + k, f"b{b + k}")
                                                             for k in range(100)]))
        rows.append((f"{label}: RecordEvents, batches of 100", f"{n_batch / (time.perf_counter() - started):,.0f} events/s"))
        # unary RecordEvents, one event per call
        n_single = 2000 // args.scale
        started = time.perf_counter()
        for k in range(n_single):
            stub.RecordEvents(pb.RecordEventsRequest(events=[ev(f"u{k % users}", k, f"s{k}")]))
        rows.append((f"{label}: RecordEvents, 1 event per call", f"{n_single / (time.perf_counter() - started):,.0f} events/s"))
        # client-streaming
        n_stream = 20_000 // args.scale
        started = time.perf_counter()
        summary = stub.StreamEvents(iter([ev(f"u{k % users}", k, f"st{k}") for k in range(n_stream)]))
        elapsed = time.perf_counter() - started
        assert summary.accepted == n_stream, summary
        rows.append((f"{label}: StreamEvents (one stream)", f"{n_stream / elapsed:,.0f} events/s"))
        # latency: Rerank of 100 cached candidates, without and right after a new event
        candidates = [pb.Candidate(item_id=f"item-{i}", score=float(100 - i)) for i in range(100)]
        rerank = pb.RerankRequest(user_id="lat", candidates=candidates)
        stub.RecordEvents(pb.RecordEventsRequest(events=[ev("lat", k) for k in range(30)]))
        plain, after, record_ms, inline = [], [], [], []
        for k in range(args.rounds):
            t0 = time.perf_counter()
            stub.Rerank(rerank)
            plain.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            stub.RecordEvents(pb.RecordEventsRequest(events=[ev("lat", 1000 + k)]))
            t1 = time.perf_counter()
            stub.Rerank(rerank)
            t2 = time.perf_counter()
            record_ms.append(1000 * (t1 - t0))
            after.append(1000 * (t2 - t1))
            t0 = time.perf_counter()
            stub.Rerank(pb.RerankRequest(user_id="lat", candidates=candidates, context_events=[ev("lat", 5000 + k)]))
            inline.append(1000 * (time.perf_counter() - t0))
        for name, values in (("Rerank (100 candidates), no new event", plain), ("RecordEvents (1 event)", record_ms),
                             ("Rerank right after that RecordEvents", after),
                             ("Rerank with 1 inline context event", inline)):
            rows.append((f"{label}: {name}",
                         f"p50 {statistics.median(values):.2f} ms, p99 {percentile(values, 99):.2f} ms"))
        added = statistics.median(inline) - statistics.median(plain)
        rows.append((f"{label}: added by 1 event (inline context vs none), p50", f"{added:+.2f} ms"))
        rows.append((f"{label}: event -> visible in next Rerank (RecordEvents + Rerank), p50",
                     f"{statistics.median([a + b for a, b in zip(record_ms, after)]):.2f} ms"))
        failovers = getattr(service.profiles, "failovers", 0)
        if failovers:
            rows.append((f"{label}: WARNING", f"Redis failed {failovers} times (fallback served): numbers are not Redis'"))
    finally:
        channel.close()
        running.stop(0)
    return rows


def _lookup(vectors: np.ndarray):  # type: ignore[no-untyped-def]
    """item-k -> vectors[k % 64], as the profiles below are fed."""
    return table_lookup({f"item-{k}": k % len(vectors) for k in range(10_000)}, vectors)


def in_process_bytes_per_user(settings: Settings, users: int, events: int) -> float:
    config = ProfileConfig.from_settings(settings.users, settings.model.fake_dim)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((64, settings.model.fake_dim)).astype(np.float32)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    lock = TimedLock()
    store = CompactProfileStore(config, _lookup(vectors), max_users=users + 1, ttl_seconds=1e9, lock=lock)
    for u in range(users):
        store.apply([(Event(f"user-{u:06d}", f"item-{k}", EventType.CLICK, 1e9 + k, f"ev-{u}-{k}"), vectors[k % 64])
                     for k in range(events)], now=1e9)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / users


class TimedLock:
    """A store lock that records its longest hold while `timing` is on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.timing = False
        self.longest = 0.0
        self.taken = 0.0

    def __enter__(self) -> None:
        self.lock.acquire()
        self.taken = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.timing:
            self.longest = max(self.longest, time.perf_counter() - self.taken)
        self.lock.release()


def snapshot_rows(settings: Settings, users: int, events: int) -> list[tuple[str, str]]:
    from reranker.model.items import ItemVectorCache
    from reranker.users.snapshot import load_snapshot, save_snapshot

    config = ProfileConfig.from_settings(settings.users, settings.model.fake_dim)
    vectors = np.random.default_rng(0).standard_normal((64, settings.model.fake_dim)).astype(np.float32)
    lock = TimedLock()
    store = CompactProfileStore(config, _lookup(vectors), max_users=users + 1, ttl_seconds=1e9, lock=lock)
    for u in range(users):
        store.apply([(Event(f"user-{u:06d}", f"item-{k}", EventType.CLICK, 1e9 + k, f"ev-{u}-{k}"), vectors[k % 64])
                     for k in range(events)], now=1e9)
    gc.collect()
    started = time.perf_counter()
    gc.collect()
    gc_ms = 1000 * (time.perf_counter() - started)
    items = ItemVectorCache(ITEMS, settings.model.fake_dim)
    tmp = Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    try:
        lock.timing = True  # how long a snapshot holds the store's lock at a time
        for _ in store.export_chunks(2000):
            pass
        lock.timing = False
        longest = lock.longest
        saved = save_snapshot(tmp / "s.npz", items=items, profiles=store, model_version="bench", dim=settings.model.fake_dim)
        fresh = CompactProfileStore(config, _lookup(vectors), max_users=users + 1, ttl_seconds=1e9)
        loaded = load_snapshot(tmp / "s.npz", items=ItemVectorCache(ITEMS, settings.model.fake_dim), profiles=fresh,
                               model_version="bench", dim=settings.model.fake_dim, now=1e9, ttl_seconds=1e9)
        assert loaded is not None and loaded.users == users
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    label = f"snapshot of {users:,} users x {events} events"
    return [
        (f"{label}: save", f"{saved.seconds:.2f} s, {saved.bytes / 1e6:,.0f} MB on disk"),
        (f"{label}: load", f"{loaded.seconds:.2f} s"),
        (f"{label}: longest store-lock hold while saving", f"{1000 * longest:.2f} ms"),
        (f"full GC collection with those {users:,} users in the store", f"{gc_ms:.0f} ms"),
    ]


def redis_bytes_per_user(settings: Settings, users: int, events: int) -> float:
    import redis

    from reranker.users.stores import make_profile_store

    store = make_profile_store(settings.users, settings.redis, settings.model.fake_dim)
    client = redis.Redis.from_url(settings.redis.redis_url)
    client.flushall()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((64, settings.model.fake_dim)).astype(np.float32)
    for u in range(users):
        store.apply([(Event(f"user-{u:06d}", f"item-{k}", EventType.CLICK, 1e9 + k, f"ev-{u}-{k}"), vectors[k % 64])
                     for k in range(events)], now=1e9)
    assert not store.failovers, "Redis failed during the memory measurement"  # type: ignore[attr-defined]
    total = sum(client.memory_usage(key) or 0 for key in client.scan_iter(match=f"{settings.redis.redis_prefix}:*"))
    client.close()
    store.close()
    return total / users


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reranker bench users", description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="", help="use this Redis instead of starting one")
    parser.add_argument("--dim", type=int, default=384, help="vector size (384 = all-MiniLM-L6-v2)")
    parser.add_argument("--rounds", type=int, default=300, help="latency samples per measurement")
    parser.add_argument("--quick", action="store_true", help="a tenth of the work (smoke run)")
    args = parser.parse_args(argv)
    args.scale = 10 if args.quick else 1
    if args.quick:
        args.rounds = max(20, args.rounds // 10)
    base = Settings(address="127.0.0.1:0", encoder="fake", fake_dim=args.dim, warmup=False, log_level="WARNING",
                    metrics_address="", access_log=False)
    throwaway = None
    redis_url = args.redis_url
    if not redis_url:
        try:
            throwaway = RedisServer().start()
            redis_url = throwaway.url
        except RedisUnavailable:
            pass  # no redis-server: the in-process rows only
    rows: list[tuple[str, str]] = []
    try:
        rows += run_backend("in-process", base, args)
        if redis_url:
            # A generous read timeout: on a busy machine the 50 ms default can trip and fail over,
            # and then the numbers would be the fallback's (the table says so if it happens anyway).
            rows += run_backend("redis", dataclasses.replace(base, redis_url=redis_url, redis_timeout_ms=1000.0), args)
        for events in (1, 20, 50):
            rows.append((f"memory per user, in-process, {events} events (dim {args.dim})",
                         f"{in_process_bytes_per_user(base, 2000 // args.scale, events):,.0f} bytes"))
            if redis_url:
                rows.append((f"memory per user, Redis, {events} events (dim {args.dim})",
                             f"{redis_bytes_per_user(dataclasses.replace(base, redis_url=redis_url), 500 // args.scale, events):,.0f} bytes"))
        rows += snapshot_rows(base, 5000 // args.scale, 20)
    finally:
        if throwaway is not None:
            throwaway.cleanup()
    print("| measurement | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
