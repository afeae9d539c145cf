"""Benchmark of a burst: 10^6 events for one user, then Rerank for that user and for an ordinary one.

    reranker bench bursts [--events 1000000] [--dim 384] [--redis] [--reranks 2000]

A real gRPC server on loopback (fake encoder; the 50 items are upserted first, events name them by
id) receives the burst through StreamEvents. Printed: ingestion rate; the bytes held for the burst
user and for a user with 2,000 events (every per-user cap already full), with the server process'
RSS before and after; and Rerank latency (50 candidates, interleaved calls) for both users.
`--redis` starts a throw-away redis-server and uses the Redis store (its `MEMORY USAGE` is printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Iterator, Sequence

import grpc

from reranker.config import Settings
from reranker.model.encoder import FakeEncoder
from reranker.service import RerankService
from reranker.serving.server import build_server
from reranker.tools.harness import RedisServer, rss_bytes
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc


ITEMS = 50


def rss_mb() -> float:
    rss = rss_bytes()
    return float("nan") if rss is None else rss / 2**20


def events(user: str, n: int, now: float) -> Iterator[pb.Event]:
    for i in range(n):
        e = pb.Event(user_id=user, item_id=f"b{i % ITEMS}", type=pb.EVENT_TYPE_CLICK, event_id=f"{i:09d}")
        e.timestamp.FromSeconds(int(now) - n + i)
        yield e


def rerank_ms(stub: pb_grpc.RerankerServiceStub, users: list[str], calls: int) -> dict[str, list[float]]:
    request = {u: pb.RerankRequest(user_id=u, candidate_columns=pb.CandidateColumns(
        item_ids=[f"b{i}" for i in range(ITEMS)], scores=[float(ITEMS - i) for i in range(ITEMS)])) for u in users}
    out: dict[str, list[float]] = {u: [] for u in users}
    for k in range(calls):
        for u in users if k % 2 else reversed(users):
            started = time.perf_counter()
            response = stub.Rerank(request[u], timeout=10)
            out[u].append(1000 * (time.perf_counter() - started))
            assert response.variant == pb.VARIANT_RERANKED and not response.cold_user
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reranker bench bursts", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--reranks", type=int, default=2000)
    parser.add_argument("--redis", action="store_true")
    args = parser.parse_args(argv)
    redis_server = None
    settings = Settings(address="127.0.0.1:0", encoder="fake", fake_dim=args.dim, metrics_address="", access_log=False)
    if args.redis:
        redis_server = RedisServer().start()
        settings = dataclasses.replace(settings, redis_url=redis_server.url, redis_timeout_ms=1000.0)
    now = time.time()
    running = build_server(settings, RerankService(settings, FakeEncoder(args.dim), clock=lambda: now))
    running.loader.join(60)
    service = running.service
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RerankerServiceStub(channel)
            stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=f"b{i}", text=f"item {i} topic {i % 5}")
                                                          for i in range(ITEMS)]), timeout=30)
            stub.StreamEvents(events("ordinary-", 2000, now), timeout=600)
            rss_before = rss_mb()
            started = time.perf_counter()
            result = stub.StreamEvents(events("burst-user", args.events, now), timeout=3600)
            seconds = time.perf_counter() - started
            assert result.accepted == args.events, result
            rss_after = rss_mb()
            store = "redis" if args.redis else "in-process"
            print(f"| store | events | seconds | events/s | server RSS before -> after (MB) |")
            print("| --- | --- | --- | --- | --- |")
            print(f"| {store} | {args.events:,} | {seconds:.1f} | {args.events / seconds:,.0f} | "
                  f"{rss_before:.1f} -> {rss_after:.1f} |")
            print()
            if args.redis:
                import redis

                client = redis.Redis(port=redis_server.port)  # type: ignore[union-attr]
                sizes = {u: sum(client.memory_usage(k) or 0 for k in service.profiles.keys(u))  # type: ignore[union-attr]
                         for u in ("ordinary-", "burst-user")}
            else:
                sizes = {u: service.profiles.held_bytes(u) for u in ("ordinary-", "burst-user")}  # type: ignore[union-attr]
            latencies = rerank_ms(stub, ["ordinary-", "burst-user"], args.reranks)
            print("| user | events | bytes held | Rerank p50 ms | Rerank p99 ms |")
            print("| --- | --- | --- | --- | --- |")
            for user, n in (("ordinary-", 2000), ("burst-user", args.events)):
                ms = sorted(latencies[user])
                print(f"| {user} | {n:,} | {sizes[user]:,} | {statistics.median(ms):.3f} | "
                      f"{ms[int(0.99 * (len(ms) - 1))]:.3f} |")
    finally:
        running.stop(0)
        if redis_server is not None:
            redis_server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
