"""Capacity model: for N users, M items, E events/s and R Rerank/s, the memory per replica, Redis
memory and ops/s (and Redis CPU), and the pods needed; from costs measured on this machine.

    reranker bench capacity --users 1000000 --items 100000 \\
        --events-per-s 20000 --reranks-per-s 5000 [--sample-users 2000] [--dim 384] [--profile-layout compact]

Measured here (a generator drives them): --sample-users users, each with --events-per-user events
on items drawn from a Zipf(1.1) popularity over --items items, are written into an in-process
profile store (bytes per user by tracemalloc) and into a throw-away redis-server (MEMORY USAGE of
each user's keys; Redis CPU per event write and per profile read from INFO commandstats), with the
consumed-item memory on (default 500 items) and off. One replica's Rerank throughput is timed
in-process (100 cached candidates, one thread, fake encoder: the user model and scoring, not the
transformer, which a warm cache or the shared catalog keeps off the Rerank path). The model then
scales per-user costs linearly to --users: user states are independent, so this holds as long as
nothing else grows (the simulation writes the sample, not 10^6 users: 10^6 x 45 KB would not fit
this machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import sys
import time
import tracemalloc
from collections.abc import Sequence

import numpy as np
import redis

from reranker.config import Settings
from reranker.tools.harness import RedisServer
from reranker.types import Event, EventType
from reranker.users.stores import make_profile_store


def generate(rng: np.random.Generator, users: int, per_user: int, items: int) -> list[list[tuple[Event, np.ndarray]]]:
    """Per user, `per_user` events on Zipf-popular items (ids below `items`), in time order."""
    ranks = np.minimum(rng.zipf(1.1, size=(users, per_user)), items) - 1
    out = []
    for u in range(users):
        batch = []
        for k, item in enumerate(ranks[u].tolist()):
            vector = np.random.default_rng(item).standard_normal(DIM).astype(np.float32)
            batch.append((Event(f"user-{u}", f"item-{item}", EventType.CLICK, 1_700_000_000.0 + 60 * k, f"e{u}-{k}"),
                          vector / np.linalg.norm(vector)))
        out.append(batch)
    return out


def vector_lookup(workload: list[list[tuple[Event, np.ndarray]]]):  # type: ignore[no-untyped-def]
    """The item vectors of the workload by id (what a compact profile looks up in the item cache)."""
    vectors = {e.item_id: v for batch in workload for e, v in batch}

    def lookup(item_ids):  # type: ignore[no-untyped-def]
        return np.stack([vectors[i] for i in item_ids]), np.ones(len(item_ids), dtype=bool)

    return lookup


def in_process_bytes(settings: Settings, workload: list[list[tuple[Event, np.ndarray]]]) -> float:
    settings = dataclasses.replace(settings, user_cache_size=len(workload) + 1)
    store = make_profile_store(settings.users, settings.redis, DIM, lookup=vector_lookup(workload))
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for batch in workload:
        store.apply(batch, now=1_800_000_000.0)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / len(workload)


def _command_usec(client) -> float:  # type: ignore[no-untyped-def]
    return float(sum(v.get("usec", 0) for v in client.info("commandstats").values()))


def redis_costs(settings: Settings, workload: list[list[tuple[Event, np.ndarray]]]) -> tuple[float, float, float]:
    """(bytes per user, Redis CPU us per event written, Redis CPU us per profile read): all commands'
    time in INFO commandstats, per phase (the full layout's Lua fold; the compact layout's GET and
    compare-and-set)."""
    store = make_profile_store(settings.users, settings.redis, DIM, lookup=vector_lookup(workload))
    client = redis.Redis.from_url(settings.redis.redis_url)  # the same Redis the store writes to
    client.flushall()
    client.config_resetstat()
    events = 0
    for batch in workload:
        store.apply(batch, now=1_800_000_000.0)
        events += len(batch)
    write_us = _command_usec(client) / events
    client.config_resetstat()
    for u in range(len(workload)):
        store.get(f"user-{u}")
    read_us = _command_usec(client) / len(workload)
    total = sum(client.memory_usage(k, samples=0) or 0 for k in client.scan_iter(match=f"{settings.redis.redis_prefix}:*",
                                                                                 count=1000))
    store.close()
    return total / len(workload), write_us, read_us


def reranks_per_second(settings: Settings, workload: list[list[tuple[Event, np.ndarray]]], items: int) -> float:
    from reranker.model.encoder import FakeEncoder
    from reranker.service import RerankService
    from reranker.types import Candidate, RerankQuery

    service = RerankService(dataclasses.replace(settings, redis_url="", warmup=False), FakeEncoder(DIM))
    service.load()
    ids = [f"item-{i}" for i in range(min(items, 5000))]
    assert service.items is not None
    service.items.put(ids, ids, np.random.default_rng(0).standard_normal((len(ids), DIM)).astype(np.float32))
    for batch in workload[:200]:
        service.record_events([e for e, _ in batch])
    rng = np.random.default_rng(1)
    queries = [RerankQuery(f"user-{u % 200}", tuple(Candidate(ids[i], 1.0) for i in rng.choice(len(ids), 100, replace=False)))
               for u in range(300)]
    for q in queries[:20]:
        service.rerank(q)
    started = time.perf_counter()
    for q in queries:
        service.rerank(q)
    rate = len(queries) / (time.perf_counter() - started)
    service.close()
    return rate


DIM = 384


def main(argv: Sequence[str] | None = None) -> int:
    global DIM
    p = argparse.ArgumentParser(prog="reranker bench capacity", description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--events-per-s", type=float, default=20_000)
    p.add_argument("--reranks-per-s", type=float, default=5_000)
    p.add_argument("--events-per-user", type=int, default=20)
    p.add_argument("--sample-users", type=int, default=2_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--pod-cores", type=float, default=2.0)
    p.add_argument("--pod-utilization", type=float, default=0.6, help="target CPU use per pod (headroom for bursts)")
    p.add_argument("--grpc-us", type=float, default=520.0,
                   help="server CPU per Rerank RPC outside the user model: decode, validate, answer (docs/performance.md: kill-switch run)")
    p.add_argument("--base-rss-mib", type=float, default=421.0, help="RSS of a replica with the model loaded (docs/operations.md)")
    p.add_argument("--event-batch", type=float, default=20.0, help="events per RecordEvents batch (one EVALSHA per user)")
    p.add_argument("--redis-shard-gib", type=float, default=25.0, help="memory per Redis master")
    p.add_argument("--redis-replicas", type=int, default=1, help="replicas per Redis master")
    p.add_argument("--profile-layout", choices=("full", "compact"), default="compact", help="Settings.profile_layout (full: an older checkout)")
    args = p.parse_args(argv)
    DIM = args.dim
    rng = np.random.default_rng(0)
    workload = generate(rng, args.sample_users, args.events_per_user, args.items)
    server = RedisServer().start()
    try:
        base = Settings(encoder="fake", fake_dim=DIM, metrics_address="", vector_history_size=args.events_per_user,
                        recent_events_per_user=args.events_per_user, redis_url=server.url,
                        redis_timeout_ms=2000.0, profile_layout=args.profile_layout)  # a slow read on a busy machine must not fail over
        rows = {}
        for label, consumed in (("with consumed-item memory", base.users.consumed_items_per_user), ("without", 0)):
            s = dataclasses.replace(base, consumed_items_per_user=consumed)
            local = in_process_bytes(dataclasses.replace(s, redis_url=""), workload)
            redis_bytes, write_us, read_us = redis_costs(s, workload)
            rows[label] = (local, redis_bytes, write_us, read_us)
        per_core = reranks_per_second(base, workload, args.items)
    finally:
        server.cleanup()

    local, redis_bytes, write_us, read_us = rows["with consumed-item memory"]
    print(f"measured: {args.sample_users} users x {args.events_per_user} events (Zipf over {args.items} items), d={DIM}, "
          f"profile_layout={args.profile_layout}")
    print("| per user | in-process | Redis (MEMORY USAGE) |\n|---|---|---|")
    for label, (lb, rb, _, _) in rows.items():
        print(f"| {label} | {lb:,.0f} B | {rb:,.0f} B |")
    print(f"Redis CPU: {write_us:.1f} us per event written, {read_us:.1f} us per profile read; "
          f"Rerank (100 cached candidates) {per_core:,.0f}/s on one thread in-process")

    n, m, e, r = args.users, args.items, args.events_per_s, args.reranks_per_s
    per_pod = args.pod_cores * args.pod_utilization * 1e6 / (1e6 / per_core + args.grpc_us)
    pods = max(2, math.ceil(r / per_pod))
    catalog_mib = m * DIM * 2 / 2**20  # float16, shared pages
    cache_mib = m * DIM * 4 / 2**20  # a private float32 item cache holding the whole catalog
    redis_gib = n * redis_bytes * (1 + args.redis_replicas) / 2**30
    # Per user per batch (<= batch): full, one EVALSHA; compact, one GET and one EVALSHA. One read per Rerank.
    redis_ops = e / args.event_batch * (2 if args.profile_layout == "compact" else 1) + r
    redis_cpu = (e * write_us + r * read_us) / 1e6
    masters = max(1, math.ceil(n * redis_bytes / 2**30 / args.redis_shard_gib), math.ceil(redis_cpu / 0.7))
    print(f"\nmodel for N={n:,} users, M={m:,} items, E={e:,.0f} events/s, R={r:,.0f} Rerank/s:")
    print("| quantity | value |\n|---|---|")
    print(f"| Rerank/s per pod ({args.pod_cores:g} cores at {args.pod_utilization:g}, {1e6 / per_core:,.0f} us model + "
          f"{args.grpc_us:g} us gRPC per call) | {per_pod:,.0f} |")
    print(f"| pods (at least 2) | {pods} |")
    print(f"| memory per replica, profiles in Redis, shared catalog | {args.base_rss_mib + 0.4 * m / 1e5:,.0f} MiB private "
          f"+ {catalog_mib:,.0f} MiB shared catalog pages |")
    print(f"| memory per replica, profiles in Redis, private item cache of all M | {args.base_rss_mib + cache_mib:,.0f} MiB |")
    print(f"| in-process profiles instead (each replica holds the users it sees; all N) | "
          f"{n * local / 2**30:,.1f} GiB per replica: not feasible beyond ~{int(8 * 2**30 / local):,} users in 8 GiB |")
    print(f"| Redis memory (x{1 + args.redis_replicas} with replicas) | {redis_gib:,.1f} GiB |")
    print(f"| Redis ops/s | {redis_ops:,.0f} |")
    print(f"| Redis CPU | {redis_cpu:,.2f} cores |")
    print(f"| Redis Cluster masters ({args.redis_shard_gib:g} GiB and 0.7 core each) | {masters} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
