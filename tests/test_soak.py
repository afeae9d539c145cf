"""Issue 6: bounded load over loopback, memory plateau, graceful shutdown with requests in flight.

The CI-sized soak is 8 clients for 3 s against a `reranker serve --encoder fake` child process.
The long soak is a documented command (docs/reliability.md):
    reranker soak --duration 600 --clients 8
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker.model.encoder import FakeEncoder
from reranker.tools.loadtest import Workload, check_reordering, soak
from reranker.v1 import reranker_pb2 as pb
from tests.conftest import REPO, ServerFactory, candidate, fake_settings
from tests.test_faults import HangingEncoder

# Server RSS may grow at most this much during the 3 s load after warm-up. The workload is bounded
# (2000 catalog items, 500 users, item cache capped at 2x catalog), so a healthy server plateaus;
# the allowance covers allocator warm-up and the capped caches filling with new items.
CI_RSS_BOUND_MB = 32.0


def test_short_soak_has_no_errors_no_fallbacks_bounded_memory_and_a_clean_shutdown() -> None:
    workload = Workload(clients=8, duration_s=3.0)
    result = soak(
        workload,
        ["--encoder", "fake", "--fake-dim", "64"],
        rss_bound_mb=CI_RSS_BOUND_MB,
        env={"PYTHONPATH": str(REPO)},
    )
    print(f"\n[soak] load={result.load} rss {result.rss_start_mb} -> {result.rss_end_mb} MiB; shutdown={result.shutdown}")
    assert result.problems == []
    assert result.load["requests"] == result.load["ok"] and int(result.load["requests"]) > 100  # type: ignore[arg-type]
    assert result.load["errors"] == {} and result.load["fallbacks"] == {}
    assert result.rss_growth_mb is not None and result.rss_growth_mb < CI_RSS_BOUND_MB
    shutdown = result.shutdown
    assert shutdown["exit_code"] == 0
    assert shutdown["in_flight_failed"] == {} and shutdown["other_errors"] == {}
    assert int(shutdown["in_flight_ok"]) > 0  # type: ignore[call-overload]
    assert sum(shutdown["refused"].values()) > 0  # type: ignore[union-attr]


def test_check_reordering_catches_invalid_responses() -> None:
    req = pb.RerankRequest(user_id="u", candidates=[candidate("a", 1), candidate("b", 2), candidate("a", 3)])
    ok = pb.RerankResponse(
        variant=pb.VARIANT_RERANKED,
        items=[pb.ScoredItem(item_id="b", original_rank=1), pb.ScoredItem(item_id="a", original_rank=0)],
    )
    assert check_reordering(req, ok) is None
    missing = pb.RerankResponse(variant=pb.VARIANT_RERANKED, items=[pb.ScoredItem(item_id="b", original_rank=1)])
    assert "expected 2" in str(check_reordering(req, missing))
    foreign = pb.RerankResponse(
        variant=pb.VARIANT_RERANKED,
        items=[pb.ScoredItem(item_id="b", original_rank=1), pb.ScoredItem(item_id="z", original_rank=0)],
    )
    assert "not a candidate" in str(check_reordering(req, foreign))
    wrong_rank = pb.RerankResponse(
        variant=pb.VARIANT_RERANKED,
        items=[pb.ScoredItem(item_id="b", original_rank=1), pb.ScoredItem(item_id="a", original_rank=2)],
    )
    assert "original_rank" in str(check_reordering(req, wrong_rank))


def test_graceful_shutdown_reports_not_serving_first_completes_in_flight_and_refuses_new(
    make_server: ServerFactory,
) -> None:
    hanging = HangingEncoder(FakeEncoder(64))
    running, stub = make_server(fake_settings(encode_timeout_ms=30_000.0), encoder=hanging)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    health = health_pb2_grpc.HealthStub(channel)
    try:
        texts = [candidate(f"i{i}", 5.0 - i, f"item text {i}") for i in range(5)]
        in_flight = [stub.Rerank.future(pb.RerankRequest(user_id=f"u{n}", candidates=texts), timeout=20) for n in range(3)]
        assert hanging.entered.wait(30)
        # A drain delay a busy machine cannot eat between seeing NOT_SERVING and the next call.
        stopper = threading.Thread(target=running.stop, kwargs={"grace": 10.0, "drain_delay": 3.0})
        stopper.start()
        # 1. health flips to NOT_SERVING while RPCs are still accepted (drain delay)
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(), timeout=1).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        no_text = pb.RerankRequest(user_id="late", candidates=[candidate("x", 1), candidate("y", 2)])
        assert stub.Rerank(no_text, timeout=2).variant == pb.VARIANT_RERANKED
        # 2. after the drain delay new RPCs are refused (until then they are answered: polled, not slept) ...
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline, "new RPCs were still answered long after the drain delay"
            try:
                assert stub.Rerank(no_text, timeout=2).variant == pb.VARIANT_RERANKED
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED:
                    continue  # a call that met the listener closing; the next one is refused
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                break
            time.sleep(0.05)
        # 3. ... while the requests in flight complete normally once the encoder answers
        hanging.release()
        for future in in_flight:
            resp = future.result(timeout=10)
            assert resp.variant == pb.VARIANT_RERANKED and len(resp.items) == 5
        stopper.join(10)
        assert not stopper.is_alive()
    finally:
        hanging.release()
        channel.close()
