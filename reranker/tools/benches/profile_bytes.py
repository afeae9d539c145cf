"""Bytes per user profile, full and compact layouts, in process and in Redis, at 5 / 20 / 50 / 200 events per user.

    reranker bench profile-bytes [--users 2000] [--events 5,20,50,200] [--layouts full,compact] [--redis-url redis://...]

Everything goes through the real write path, `RerankService.record_events`, of a fresh service per
cell (`profile_layout` full or compact, the fake encoder at dim 384, a 10k-item catalog upserted
first so that every event's vector comes from the item cache). Each of --users users sends its
events in one call: CLICKs with event ids, on distinct random items, 30 s apart. Measured:

- in process: the `tracemalloc` growth over recording all users (after a gc), divided by the user
  count; the item cache is filled before tracing starts, so only what the profiles hold counts;
  and the store's own accounting, `held_bytes(user_id)`, averaged over the users;
- Redis (a throw-away redis-server from PATH with --save '' --appendonly no, unless --redis-url):
  the growth of INFO memory `used_memory` divided by the user count, and `MEMORY USAGE key SAMPLES 0`
  summed over each user's keys (`<prefix>:{<user_id>}:*`), averaged. The Redis is flushed per cell.

The target: at most 4 KB (--target-bytes) per user at 20 events, in process and in Redis;
the last column judges the tracemalloc and used_memory numbers (what the profiles really cost).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from reranker.config import Settings
from reranker.model.encoder import FakeEncoder
from reranker.service import RerankService
from reranker.tools.harness import RedisServer, RedisUnavailable
from reranker.types import Event, EventType, Item


CATALOG = 10_000
SPACING_S = 30.0


@contextmanager
def redis_server() -> Iterator[str]:
    """A throw-away redis-server on a free loopback port (persisting nothing), stopped and deleted
    afterwards."""
    try:
        server = RedisServer().start()
    except RedisUnavailable:
        raise SystemExit("redis-server is not on PATH (scripts/ensure-redis.sh installs it), or pass --redis-url") from None
    try:
        yield server.url
    finally:
        server.cleanup()


class Workload:
    """The users' events: distinct random catalog items each, 30 s apart, ending an hour ago. The
    Event objects (and their id strings) are built per user as it is recorded, as a server decodes
    them per request: what a profile keeps of them is allocated while memory is traced."""

    def __init__(self, users: int, events: int, id_prefix: str, seed: int = 0) -> None:
        rng = np.random.default_rng(seed + events)
        self.start = time.time() - 3600.0 - events * SPACING_S
        self.id_prefix = id_prefix
        self.users = [f"user-{u:06d}" for u in range(users)]
        self.items = np.stack([rng.choice(CATALOG, events, replace=False) for _ in range(users)])

    def batches(self) -> Iterator[list[Event]]:
        for u, items in enumerate(self.items.tolist()):
            user = f"user-{u:06d}"
            yield [Event(user, f"{self.id_prefix}{i}", EventType.CLICK, self.start + k * SPACING_S, f"{user}-{k}")
                   for k, i in enumerate(items)]


def loaded_service(settings: Settings, id_prefix: str) -> RerankService:
    service = RerankService(settings, FakeEncoder(settings.model.fake_dim))
    service.load()
    for start in range(0, CATALOG, 1000):
        service.upsert_items([Item(f"{id_prefix}{i}", f"item {i} topic{i % 37} genre{i % 11}")
                              for i in range(start, start + 1000)], time_remaining=600.0)
    return service


def record(service: RerankService, work: Workload) -> None:
    for batch in work.batches():
        result = service.record_events(batch, time_remaining=600.0)
        assert result.accepted == len(batch) and result.without_vector == 0, result


def in_process(settings: Settings, work: Workload, id_prefix: str) -> tuple[float, float]:
    """(tracemalloc growth per user, mean held_bytes per user)."""
    service = loaded_service(settings, id_prefix)
    try:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        record(service, work)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        store = service.profiles
        assert store is not None and len(store) == len(work.users), "users were evicted: raise user_cache_size"
        held = sum(store.held_bytes(u) for u in work.users)  # type: ignore[attr-defined]
        return grown / len(work.users), held / len(work.users)
    finally:
        service.close()


def in_redis(settings: Settings, work: Workload, id_prefix: str) -> tuple[float, float]:
    """(used_memory growth per user, mean MEMORY USAGE summed over each user's keys)."""
    import redis

    client = redis.Redis.from_url(settings.redis.redis_url)
    client.flushall()
    service = loaded_service(settings, id_prefix)
    try:
        # one throw-away user first: loads the Lua scripts and the connection, then is deleted
        service.record_events([Event("warm-up", f"{id_prefix}0", EventType.CLICK, time.time() - 60, "w")])
        client.delete(*client.keys(f"{settings.redis.redis_prefix}:*"))
        before = int(client.info("memory")["used_memory"])
        record(service, work)
        grown = int(client.info("memory")["used_memory"]) - before
        failovers = getattr(service.profiles, "failovers", 0)
        if failovers:
            raise RuntimeError(f"Redis failed {failovers} times during the run: the fallback took events")
        keys = list(client.scan_iter(match=f"{settings.redis.redis_prefix}:*", count=1000))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key, samples=0)
        usage = sum(int(v or 0) for v in pipe.execute())
        return grown / len(work.users), usage / len(work.users)
    finally:
        service.close()
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reranker bench profile-bytes", description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--events", default="5,20,50,200", help="events per user, one table row each")
    p.add_argument("--layouts", default="compact")  # the only layout since the full one went (older checkouts: full,compact)
    p.add_argument("--redis-url", default="", help="an empty Redis to use (it is FLUSHALLed) instead of starting one")
    p.add_argument("--no-redis", action="store_true", help="in-process columns only")
    p.add_argument("--id-prefix", default="item-", help="item ids are <prefix><0..9999> ('' = decimal ids)")
    p.add_argument("--target-bytes", type=int, default=4096)
    args = p.parse_args(argv)
    levels = [int(x) for x in args.events.split(",")]
    base = dict(encoder="fake", fake_dim=384, metrics_address="", warmup=False, log_level="WARNING", access_log=False,
                item_cache_size=CATALOG, user_cache_size=args.users + 10, user_ttl_seconds=1e9,
                redis_timeout_ms=2000.0, redis_write_timeout_ms=10_000.0)
    rows = []
    failures: dict[str, None] = {}

    def run(redis_url: str) -> None:
        for layout in args.layouts.split(","):
            for events in levels:
                work = Workload(args.users, events, args.id_prefix)
                cells: list[str] = []
                judged: list[str] = []
                for backend, measure in (("in process", in_process), ("Redis", in_redis)):
                    if backend == "Redis" and not redis_url:
                        cells += ["not run", "not run"]
                        continue
                    try:
                        settings = Settings(**base, profile_layout=layout, redis_url=redis_url if backend == "Redis" else "")
                        t = time.perf_counter()
                        total, own = measure(settings, work, args.id_prefix)
                        print(f"{layout:8s} {events:4d} events {backend:10s}: {total:9,.0f} / {own:9,.0f} B per user "
                              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
                    except Exception as exc:  # a layout this checkout lacks, a store that fails: say so, go on
                        cells += ["not measured", ""]
                        failures.setdefault(f"{layout}, {backend}: {exc}", None)
                        judged.append(f"{backend} not measured")
                        continue
                    cells += [f"{total:,.0f}", f"{own:,.0f}"]
                    if events == 20:
                        judged.append(f"{backend} {'met' if total <= args.target_bytes else 'MISSED'}")
                rows.append((layout, events, cells, ", ".join(judged) if events == 20 else ""))

    if args.no_redis or args.redis_url:
        run("" if args.no_redis else args.redis_url)
    else:
        with redis_server() as url:
            run(url)
    print(f"\n{args.users:,} users per cell; events on distinct random items of a {CATALOG:,}-item catalog "
          f"(ids '{args.id_prefix}N'), dim 384, 30 s apart; bytes per user\n")
    print(f"| layout | events per user | in process: tracemalloc | in process: held_bytes | Redis: used_memory | "
          f"Redis: MEMORY USAGE | ≤ {args.target_bytes:,} B at 20 events |")
    print("|---|---|---|---|---|---|---|")
    for layout, events, cells, verdict in rows:
        print(f"| {layout} | {events} | {' | '.join(cells)} | {verdict} |")
    for failure in failures:
        print(f"\nnot measured: {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
