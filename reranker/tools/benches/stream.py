"""Throughput of `reranker consume` and its lag under a 2x burst, against a real redis-server.

    reranker bench stream --redis-url redis://127.0.0.1:6379/0

Starts a throw-away redis-server itself when --redis-url is empty. Phase 1: --events entries are
queued, then consumed flat out (events/s, profile writes in the same Redis). Phase 2: a producer
adds entries at 2x that rate for --burst-seconds while the consumer runs; prints the largest lag
seen, the lag when the burst ends and how long the consumer takes to drain it. The fake encoder
(texts of --items items are encoded once, then cached) keeps the encoder out of the measurement.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence

from reranker.config import Settings
from reranker.service import RerankService
from reranker.streamconsumer import StreamConsumer
from reranker.tools.harness import RedisServer


def push(client, start: int, n: int, users: int, items: int, key: str) -> None:  # type: ignore[no-untyped-def]
    pipe = client.pipeline(transaction=False)
    for i in range(start, start + n):
        pipe.xadd(key, {"user_id": f"u{i % users}", "item_id": f"item-{i % items}", "type": "CLICK",
                        "timestamp": str(1_700_000_000 + i), "text": f"text of item {i % items}"})
    pipe.execute()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reranker bench stream", description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", default="")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--users", type=int, default=2_000)
    p.add_argument("--items", type=int, default=1_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--burst-seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    server = None
    url = args.redis_url
    if not url:
        server = RedisServer().start()
        url = server.url
    settings = Settings(encoder="fake", fake_dim=64, redis_url=url, stream_key="bench:events", stream_group="bench",
                        stream_consumer="b1", stream_batch_size=args.batch, stream_block_ms=20, stream_claim_idle_ms=0,
                        metrics_address="")
    service = RerankService(settings)
    service.load()
    consumer = StreamConsumer.from_settings(settings, service.record_events, service.metrics)
    client = consumer.client
    try:
        client.delete(settings.stream.stream_key)
        consumer.ensure_group()
        push(client, 0, args.events, args.users, args.items, settings.stream.stream_key)
        started = time.perf_counter()
        done = 0
        while (n := consumer.poll_once()) > 0:
            done += n
        rate = done / (time.perf_counter() - started)
        print(f"phase 1: {done} events consumed in {done / rate:.2f} s: {rate:,.0f} events/s "
              f"(batch {args.batch}, {args.users} users, profiles in the same Redis)")

        burst_rate = 2 * rate
        stop = threading.Event()
        lags: list[tuple[float, int]] = []
        thread = threading.Thread(target=consumer.run, args=(stop,))
        thread.start()
        t0 = time.perf_counter()
        sent = 0
        next_id = args.events
        while (elapsed := time.perf_counter() - t0) < args.burst_seconds:
            due = int(burst_rate * elapsed) - sent
            if due > 0:
                push(client, next_id, due, args.users, args.items, settings.stream.stream_key)
                next_id += due
                sent += due
            lags.append((elapsed, sum(consumer.lag())))
            time.sleep(0.05)
        lag_at_end = sum(consumer.lag())
        t_end = time.perf_counter()
        while sum(consumer.lag()) > 0 and time.perf_counter() - t_end < 120:
            time.sleep(0.05)
        drained = time.perf_counter() - t_end
        stop.set()
        thread.join()
        peak = max(lag for _, lag in lags)
        print(f"phase 2: burst of {sent} events at {burst_rate:,.0f} events/s (2x) for {args.burst_seconds:.0f} s: "
              f"largest lag {peak:,} entries, {lag_at_end:,} at the end of the burst, drained {drained:.2f} s later")
    finally:
        consumer.close()
        service.close()
        if server is not None:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
