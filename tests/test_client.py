"""reranker.client against real servers: deadlines, UNAVAILABLE-only retries, fail-open, the example."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reranker.client import RerankerClient, upstream_order
from reranker.model.encoder import FakeEncoder
from reranker.v1 import reranker_pb2 as pb
from tests.conftest import GatedEncoder, REPO, ServerFactory, SlowEncoder, event, fake_settings

CANDIDATES = [("c1", 0.9, "romantic comedy in paris"), ("c2", 0.8, "space opera starships"), ("c1", 0.7), ("c3", 0.6)]


def dead_address() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def rpc_count(metrics_port: int, method: str, code: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == "reranker_rpcs_total" and s.labels == {"method": method, "code": code}:
                return s.value
    return 0.0


def test_rerank_or_upstream_returns_the_personalized_order(make_server: ServerFactory) -> None:
    running, _ = make_server()
    with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=5.0) as client:
        client.record_events([event("u", "h1", "space opera starships galaxy", event_id="e1")])
        outcome = client.rerank_or_upstream("u", CANDIDATES)
    assert outcome.reranked and outcome.variant == "reranked" and outcome.reason == ""
    assert outcome.item_ids[0] == "c2"  # the space item moves up for a space fan
    assert sorted(outcome.item_ids) == ["c1", "c2", "c3"]
    assert outcome.attempts == 1 and outcome.response is not None


def test_server_down_gives_the_upstream_order_after_retrying(make_server: ServerFactory) -> None:
    slept: list[float] = []
    client = RerankerClient(dead_address(), timeout_s=2.0, retries=2, backoff_s=0.01, sleep=slept.append)
    outcome = client.rerank_or_upstream("u", CANDIDATES, top_k=2)
    client.close()
    assert outcome.item_ids == ["c1", "c2"] == upstream_order([pb.Candidate(item_id=c[0]) for c in CANDIDATES], 2)
    assert (outcome.reranked, outcome.variant, outcome.reason) == (False, "error", "UNAVAILABLE")
    assert outcome.attempts == 3 and len(slept) == 2  # UNAVAILABLE is retried `retries` times


def test_unavailable_is_retried_and_counted_by_the_server(make_server: ServerFactory) -> None:
    encoder = GatedEncoder()
    settings = fake_settings(metrics_address="127.0.0.1:0")
    running, _ = make_server(settings, encoder, wait=False)  # loading: RecordEvents -> UNAVAILABLE
    try:
        with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=5.0, retries=2, backoff_s=0.001) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.record_events([event("u", "a", "text", event_id="e1")])
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert rpc_count(running.metrics_port, "RecordEvents", "UNAVAILABLE") == 3
    finally:
        encoder.gate.set()


def test_a_retry_succeeds_once_the_server_is_ready(make_server: ServerFactory) -> None:
    encoder = GatedEncoder()
    running, _ = make_server(fake_settings(metrics_address="127.0.0.1:0"), encoder, wait=False)
    slept: list[float] = []

    def sleep_and_open_gate(seconds: float) -> None:  # the model finishes loading during the backoff
        slept.append(seconds)
        encoder.gate.set()
        running.loader.join(10)

    with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=10.0, retries=3, sleep=sleep_and_open_gate) as client:
        result = client.record_events([event("u", "a", "text", event_id="e1")])
    assert result.accepted == 1 and len(slept) == 1
    assert rpc_count(running.metrics_port, "RecordEvents", "UNAVAILABLE") == 1
    assert rpc_count(running.metrics_port, "RecordEvents", "OK") == 1


def test_invalid_argument_is_not_retried(make_server: ServerFactory) -> None:
    running, _ = make_server(fake_settings(metrics_address="127.0.0.1:0"))
    slept: list[float] = []
    with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=5.0, retries=3, sleep=slept.append) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.rerank("", CANDIDATES)
        outcome = client.rerank_or_upstream("", CANDIDATES)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert outcome.item_ids == ["c1", "c2", "c3"] and outcome.reason == "INVALID_ARGUMENT" and outcome.attempts == 1
    assert "user_id" in outcome.detail
    assert slept == []
    assert rpc_count(running.metrics_port, "Rerank", "INVALID_ARGUMENT") == 2


def test_slow_sidecar_costs_at_most_the_deadline(make_server: ServerFactory) -> None:
    settings = fake_settings(encode_timeout_ms=10_000.0, min_budget_ms=1.0)
    running, _ = make_server(settings, SlowEncoder(FakeEncoder(settings.fake_dim), delay_s=0.5))
    with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=0.1, retries=2) as client:
        outcome = client.rerank_or_upstream("u", CANDIDATES)
    assert outcome.item_ids == ["c1", "c2", "c3"] and not outcome.reranked
    # Either the server fails open at its budget or the client deadline fires first; never a retry.
    assert outcome.reason in ("deadline", "DEADLINE_EXCEEDED")
    assert outcome.attempts == 1
    assert outcome.latency_ms < 450  # well under the encoder's 500 ms: the deadline bounded the wait


def test_server_side_fallback_is_reported_with_its_reason(make_server: ServerFactory) -> None:
    running, _ = make_server(fake_settings(kill_switch=True))
    with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=5.0) as client:
        bypassed = client.rerank_or_upstream("u", CANDIDATES)
    assert (bypassed.variant, bypassed.reranked, bypassed.reason) == ("bypassed", False, "")
    assert bypassed.item_ids == ["c1", "c2", "c3"]


def test_client_side_errors_also_fail_open() -> None:
    with RerankerClient(dead_address(), timeout_s=1.0) as client:
        outcome = client.rerank_or_upstream("u", [("c1", "not a number"), ("c2", 1.0)])
    assert outcome.reason == "CLIENT_ERROR" and outcome.item_ids == ["c1", "c2"]


def test_client_rejects_nonsense_configuration() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        RerankerClient(dead_address(), timeout_s=0)
    with pytest.raises(ValueError, match="retries"):
        RerankerClient(dead_address(), retries=-1)


def _run_example(name: str, *args: str) -> str:
    """Run examples/<name> and return its stdout (it must exit 0 whatever happens)."""
    run = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_example_caller_runs_against_a_real_server(make_server: ServerFactory) -> None:
    running, _ = make_server()
    out = _run_example("caller.py", f"--address=127.0.0.1:{running.port}")
    assert "recorded events: accepted=2" in out
    assert "variant=reranked reranked=True" in out
    served = out.split("serving:")[1].split()
    # For a space fan the space items move up: m4 (upstream 4th) passes the cooking show m3. At the
    # default blend weight (0.3) the upstream's favourite m1 keeps its place.
    assert "m2" in served[:2] and served.index("m4") < served.index("m3")


def test_example_caller_serves_upstream_order_when_the_sidecar_is_down() -> None:
    out = _run_example("caller.py", f"--address={dead_address()}", "--timeout-ms=200")
    assert "reason=UNAVAILABLE" in out and "serving: m1 m2 m3 m4" in out


def test_example_packed_caller_runs_against_a_real_server(make_server: ServerFactory) -> None:
    running, _ = make_server()
    out = _run_example("packed_caller.py", f"--address=127.0.0.1:{running.port}")
    assert "variant=reranked reranked=True" in out
    served = out.split("serving:")[1].split()
    # For a space fan the space items move up: 104 (upstream 4th) passes the cooking show 103; at the
    # default blend weight (0.3) the upstream's favourite 101 keeps its place (as in caller.py).
    assert len(served) == 4 and "102" in served[:2] and served.index("104") < served.index("103")


def test_example_packed_caller_serves_upstream_order_when_the_sidecar_is_down() -> None:
    out = _run_example("packed_caller.py", f"--address={dead_address()}", "--timeout-ms=200")
    assert "reason=UNAVAILABLE" in out and "serving: 101 102 103 104" in out
