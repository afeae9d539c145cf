"""reranker.client against real servers: deadlines, UNAVAILABLE-only retries, fail-open, the example."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from reranker.client import RerankerClient, error_field, published_service_config, service_config_options, upstream_order
from reranker.model.encoder import FakeEncoder
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc
from tests.conftest import GatedEncoder, REPO, ServerFactory, SlowEncoder, candidate, event, fake_settings
from reranker.tools.harness import free_port

CANDIDATES = [("c1", 0.9, "romantic comedy in paris"), ("c2", 0.8, "space opera starships"), ("c1", 0.7), ("c3", 0.6)]


def dead_address() -> str:
    """A loopback port nothing listens on."""
    return f"127.0.0.1:{free_port()}"


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
    client = RerankerClient(dead_address(), timeout_s=2.0, retries=2, backoff_s=0.01)
    outcome = client.rerank_or_upstream("u", CANDIDATES, top_k=2)
    client.close()
    assert outcome.item_ids == ["c1", "c2"] == upstream_order([pb.Candidate(item_id=c[0]) for c in CANDIDATES], 2)
    assert (outcome.reranked, outcome.variant, outcome.reason) == (False, "error", "UNAVAILABLE")
    assert outcome.attempts == 1 and outcome.latency_ms < 2000  # the retries (in the channel) stayed in the budget


def test_unavailable_is_retried_and_counted_by_the_server(make_server: ServerFactory) -> None:
    encoder = GatedEncoder()
    settings = fake_settings(metrics_address="127.0.0.1:0")
    running, _ = make_server(settings, encoder, wait=False)  # loading: RecordEvents -> UNAVAILABLE
    try:
        with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=5.0, retries=2, backoff_s=0.01) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.record_events([event("u", "a", "text", event_id="e1")])
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert rpc_count(running.metrics_port, "RecordEvents", "UNAVAILABLE") == 3
    finally:
        encoder.gate.set()


def test_a_retry_succeeds_once_the_server_is_ready(make_server: ServerFactory) -> None:
    encoder = GatedEncoder()
    running, _ = make_server(fake_settings(metrics_address="127.0.0.1:0"), encoder, wait=False)

    def open_the_gate_after_the_first_refusal() -> None:  # the model finishes loading during the backoff
        deadline = time.monotonic() + 10
        while rpc_count(running.metrics_port, "RecordEvents", "UNAVAILABLE") < 1 and time.monotonic() < deadline:
            time.sleep(0.002)
        encoder.gate.set()

    opener = threading.Thread(target=open_the_gate_after_the_first_refusal)
    opener.start()
    with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=10.0, retries=4, backoff_s=0.5, max_backoff_s=2.0) as client:
        result = client.record_events([event("u", "a", "text", event_id="e1")])
    opener.join()
    assert result.accepted == 1
    assert rpc_count(running.metrics_port, "RecordEvents", "UNAVAILABLE") >= 1
    assert rpc_count(running.metrics_port, "RecordEvents", "OK") == 1


def test_invalid_argument_is_not_retried_and_keeps_the_servers_detail_and_field(make_server: ServerFactory) -> None:
    running, _ = make_server(fake_settings(metrics_address="127.0.0.1:0"))
    with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=5.0, retries=3) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.rerank("", CANDIDATES)
        outcome = client.rerank_or_upstream("", CANDIDATES)
        packed = client.rerank_packed("u", [1, 2, 3], [0.9, float("nan"), 0.5])
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and error_field(err.value) == "user_id"
    assert outcome.item_ids == ["c1", "c2", "c3"] and outcome.reason == "INVALID_ARGUMENT" and outcome.attempts == 1
    assert outcome.field == "user_id" and "user_id must not be empty" in outcome.detail
    assert "user_id must not be empty" in repr(outcome)  # visible where people look first
    assert (packed.reason, packed.field) == ("INVALID_ARGUMENT", "packed_candidates.scores[1]")
    assert "must be finite" in packed.detail and packed.positions.tolist() == [0, 1, 2]
    assert rpc_count(running.metrics_port, "Rerank", "INVALID_ARGUMENT") == 3  # one attempt each: never retried


def test_the_field_is_in_the_standard_status_details_for_any_grpc_client(stub: pb_grpc.RerankerServiceStub) -> None:
    """A Go or Java caller reads google.rpc.BadRequest from the status details; so can a raw Python stub."""
    bad = pb.RerankRequest(user_id="u", candidates=[candidate("c1", 1.0), candidate("", 0.5)])
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(bad, timeout=5)
    status = rpc_status.from_call(err.value)
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    (detail,) = status.details
    violations = error_details_pb2.BadRequest()
    assert detail.Unpack(violations)
    assert [(v.field, v.description) for v in violations.field_violations] == [
        ("candidates[1].item_id", err.value.details())
    ]
    with pytest.raises(grpc.RpcError) as unnamed:  # a message that names no field: the plain status
        stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("c1", 1.0)],
                                     candidate_columns=pb.CandidateColumns(item_ids=["c1"], scores=[1.0])), timeout=5)
    assert unnamed.value.code() is grpc.StatusCode.INVALID_ARGUMENT and error_field(unnamed.value) == ""


class UnavailableOnce(pb_grpc.RerankerServiceServicer):
    """A real gRPC server whose Rerank answers UNAVAILABLE to the first call, then OK; it records
    the metadata of every call (gRPC's own retries carry `grpc-previous-rpc-attempts`)."""

    def __init__(self, failures: int = 1, delay_s: float = 0.0) -> None:
        self.failures, self.delay_s = failures, delay_s
        self.calls: list[dict[str, str]] = []

    def Rerank(self, request: pb.RerankRequest, context: grpc.ServicerContext) -> pb.RerankResponse:  # noqa: N802
        self.calls.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        if len(self.calls) <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        time.sleep(self.delay_s)
        return pb.RerankResponse(variant=pb.VARIANT_RERANKED, items=[pb.ScoredItem(item_id="c2"), pb.ScoredItem(item_id="c1")])


@pytest.fixture
def unavailable_once() -> Iterator[tuple[UnavailableOnce, str]]:
    servicer = UnavailableOnce()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_RerankerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_unavailable_is_retried_by_grpc_through_the_service_config(unavailable_once: tuple[UnavailableOnce, str]) -> None:
    servicer, address = unavailable_once
    with RerankerClient(address, timeout_s=5.0) as client:
        outcome = client.rerank_or_upstream("u", CANDIDATES)
    assert outcome.reranked and outcome.item_ids == ["c2", "c1"]
    assert len(servicer.calls) == 2
    # The second call is gRPC's retry (the channel's retryPolicy), not a second call of our own.
    assert "grpc-previous-rpc-attempts" not in servicer.calls[0]
    assert servicer.calls[1]["grpc-previous-rpc-attempts"] == "1"


def test_the_published_service_config_retries_for_a_plain_grpc_channel(unavailable_once: tuple[UnavailableOnce, str]) -> None:
    """What a Go or Java caller does: reranker/serviceconfig.json as the channel's default service config.
    In Python its per-method timeouts are left out (service_config_options): grpcio applies a service
    config timeout against a stale start time and fails calls early (grpc/grpc#34547, #40633)."""
    servicer, address = unavailable_once
    with grpc.insecure_channel(address, options=service_config_options()) as channel:
        reply = pb_grpc.RerankerServiceStub(channel).Rerank(pb.RerankRequest(user_id="u"), timeout=5)
    assert reply.variant == pb.VARIANT_RERANKED and len(servicer.calls) == 2
    published = json.loads((REPO / "reranker" / "serviceconfig.json").read_text())
    methods = {n["method"]: m for m in published["methodConfig"] for n in m["name"]}
    assert set(methods) == {"Rerank", "RecordEvents", "GetUserProfile", "UpsertItems"}  # not the StreamEvents stream
    for method in methods.values():
        assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
        assert re.fullmatch(r"\d+(\.\d{3})?s", method["timeout"])  # a protobuf JSON Duration, whole milliseconds
        assert 2 <= method["retryPolicy"]["maxAttempts"] <= 5
    assert published == published_service_config() and 0 < published["retryThrottling"]["tokenRatio"] <= 1


def test_retries_zero_means_one_attempt(unavailable_once: tuple[UnavailableOnce, str]) -> None:
    servicer, address = unavailable_once
    with RerankerClient(address, timeout_s=5.0, retries=0) as client:
        outcome = client.rerank_or_upstream("u", CANDIDATES)
    assert outcome.reason == "UNAVAILABLE" and len(servicer.calls) == 1


def test_slow_sidecar_costs_at_most_the_deadline(make_server: ServerFactory) -> None:
    settings = fake_settings(encode_timeout_ms=10_000.0, min_budget_ms=1.0)
    running, _ = make_server(settings, SlowEncoder(FakeEncoder(settings.model.fake_dim), delay_s=0.5))
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
    with pytest.raises(ValueError, match="retries"):
        RerankerClient(dead_address(), retries=5)  # gRPC allows at most 5 attempts
    with pytest.raises(ValueError, match="backoff_s"):
        RerankerClient(dead_address(), backoff_s=0.001)


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
