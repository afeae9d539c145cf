"""What metrics + access logging add to a Rerank round trip (in-process server, fake encoder).

Runs the same warm Rerank traffic (cached items, a known user) against servers built with
1. no observation at all (observability.Observer replaced by a pass-through),
2. metrics only (access_log off),
3. metrics + a JSON access-log line per call (written to /dev/null),
and prints client-side round-trip p50/p99. Interleaves the configurations over several rounds so
background load hits them alike. Timing on a shared machine is noisy: compare, don't quote alone.

    reranker bench observability --calls 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from collections.abc import Sequence

import grpc

from reranker.config import Settings
from reranker.model.encoder import FakeEncoder
from reranker.service import RerankService
from reranker.serving import server as server_module
from reranker.serving.logs import JsonFormatter
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc


class PassThrough:
    def __init__(self, *_args: object) -> None:
        pass

    def observed(self, behavior, _method, *, streaming):  # type: ignore[no-untyped-def]
        return behavior


def run(settings: Settings, observe: bool, calls: int, candidates: int) -> list[float]:
    original = server_module.Observer
    if not observe:
        server_module.Observer = PassThrough  # type: ignore[misc,assignment]
    try:
        running = server_module.build_server(settings, RerankService(settings, FakeEncoder(settings.model.fake_dim)))
    finally:
        server_module.Observer = original  # type: ignore[misc]
    running.loader.join(30)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RerankerServiceStub(channel)
            cands = [pb.Candidate(item_id=f"i{n}", score=1.0 / (n + 1), text=f"item text {n}") for n in range(candidates)]
            stub.RecordEvents(pb.RecordEventsRequest(events=[pb.Event(user_id="u", item_id="i1", text="item text 1")]))
            request = pb.RerankRequest(user_id="u", candidates=cands, request_id="bench")
            for _ in range(100):  # warm: items cached, channel up
                stub.Rerank(request, timeout=5)
            out = []
            for _ in range(calls):
                t0 = time.perf_counter()
                stub.Rerank(request, timeout=5)
                out.append((time.perf_counter() - t0) * 1000.0)
            return out
    finally:
        running.stop(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reranker bench observability", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=50)
    opts = parser.parse_args(argv)

    sink = logging.FileHandler("/dev/null")
    sink.setFormatter(JsonFormatter())
    access = logging.getLogger("reranker.access")
    access.addHandler(sink)
    access.setLevel(logging.INFO)
    access.propagate = False

    base = Settings(address="127.0.0.1:0", encoder="fake", fake_dim=384, metrics_address="", max_workers=4)
    configs = {
        "no observation": (dataclasses.replace(base, access_log=False), False),
        "metrics only": (dataclasses.replace(base, access_log=False), True),
        "metrics + JSON access log": (base, True),
    }
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(opts.rounds):
        for name, (settings, observe) in configs.items():
            samples[name] += run(settings, observe, opts.calls, opts.candidates)
    print(f"Rerank round trip, {opts.candidates} cached candidates, {opts.rounds}x{opts.calls} calls each")
    for name, values in samples.items():
        values.sort()
        p50 = statistics.median(values)
        p99 = values[int(0.99 * (len(values) - 1))]
        print(f"  {name:28s} p50 {p50:6.3f} ms   p99 {p99:6.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
