"""End-to-end: every RPC through a real server on 127.0.0.1:0 and a real channel (fake encoder)."""

from __future__ import annotations

import math
import threading

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import FailingEncoder, SlowEncoder, candidate, event, fake_settings
from reranker.model.encoder import FakeEncoder
from reranker.ranking.experiments import bucket_of
from reranker.v1 import reranker_pb2 as pb

SPACE = ["rocket launch orbit", "space station astronaut", "mars rover mission"]
COOKING = ["pasta sauce recipe", "bread baking flour", "grilled vegetables dinner"]


def mixed_candidates() -> list[pb.Candidate]:
    # upstream prefers cooking; the space items come last
    texts = COOKING + SPACE
    return [candidate(f"item-{i}", float(len(texts) - i), t) for i, t in enumerate(texts)]


def ids(response: pb.RerankResponse) -> list[str]:
    return [it.item_id for it in response.items]


def status_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


# --- Rerank -----------------------------------------------------------------------------------------
def test_cold_user_gets_the_upstream_order(stub) -> None:
    response = stub.Rerank(pb.RerankRequest(user_id="new-user", candidates=mixed_candidates()), timeout=5)
    assert response.variant == pb.VARIANT_RERANKED
    assert response.cold_user
    assert ids(response) == [f"item-{i}" for i in range(6)]
    assert response.model_version == "fake-hash-v1"


def test_read_your_writes_record_events_then_rerank(stub) -> None:
    before = stub.Rerank(pb.RerankRequest(user_id="u1", candidates=mixed_candidates()), timeout=5)
    recorded = stub.RecordEvents(
        pb.RecordEventsRequest(events=[event("u1", "h1", "rocket orbit astronaut mission", event_id="e1")]), timeout=5
    )
    assert recorded.accepted == 1 and recorded.without_vector == 0
    strong = pb.RerankOptions(blend_weight=0.8)
    after = stub.Rerank(pb.RerankRequest(user_id="u1", candidates=mixed_candidates(), options=strong), timeout=5)
    assert not after.cold_user and before.cold_user
    assert set(ids(after)[:3]) == {"item-3", "item-4", "item-5"}  # the space items moved up
    assert ids(after)[0] == "item-3"  # shares two words with the clicked item
    assert after.cache_hits == 6 and after.encoded == 0  # candidate vectors cached by the first call
    by_id = {it.item_id: it for it in after.items}
    assert by_id["item-3"].semantic_score > by_id["item-0"].semantic_score
    assert by_id["item-3"].upstream_score == 3.0 and by_id["item-3"].original_rank == 3


def test_inline_context_events_count_now_and_are_remembered(stub) -> None:
    texts = COOKING + SPACE
    space_first = [candidate(f"item-{i}", float(i), t) for i, t in enumerate(texts)]  # upstream prefers space
    request = pb.RerankRequest(
        user_id="u2",
        candidates=space_first,
        context_events=[event("", "h", "pasta recipe dinner")],
        options=pb.RerankOptions(blend_weight=0.8),
    )
    response = stub.Rerank(request, timeout=5)
    assert not response.cold_user
    assert ids(response)[:2] == ["item-0", "item-2"]  # the pasta and the dinner items
    profile = stub.GetUserProfile(pb.GetUserProfileRequest(user_id="u2"), timeout=5)
    assert profile.found and profile.event_count == 1 and profile.recent_events[0].item_id == "h"


def test_response_fields_top_k_dedup_and_explanations(stub) -> None:
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u3", "h", "mars rover mission")]), timeout=5)
    cands = mixed_candidates() + [candidate("item-0", 0.5, COOKING[0]), candidate("no-text", 0.1)]
    response = stub.Rerank(
        pb.RerankRequest(
            user_id="u3", candidates=cands, top_k=7, request_id="req-9",
            options=pb.RerankOptions(explain=True, blend_weight=0.5),  # semantic strong enough to lead
        ),
        timeout=5,
    )
    assert len(response.items) == 7 and len(set(ids(response))) == 7  # the duplicate item-0 is dropped
    assert response.request_id == "req-9"
    assert response.without_vector == 1
    first = response.items[0]
    assert first.item_id == "item-5" and first.explanation.nearest_history_item_id == "h"
    assert first.explanation.has_vector and "semantic" in first.explanation.summary
    no_text = next(it for it in response.items if it.item_id == "no-text")
    assert not no_text.explanation.has_vector
    scores = [it.score for it in response.items]
    assert scores == sorted(scores, reverse=True)
    assert response.timing.total_ms > 0 and response.bucket == bucket_of("reranker", "u3")


def test_blend_weight_zero_restores_upstream_order(stub) -> None:
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u4", "h", "rocket launch")]), timeout=5)
    response = stub.Rerank(
        pb.RerankRequest(user_id="u4", candidates=mixed_candidates(), options=pb.RerankOptions(blend_weight=0.0)),
        timeout=5,
    )
    assert ids(response) == [f"item-{i}" for i in range(6)]


def test_diversity_spreads_near_duplicates(stub) -> None:
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u5", "h", "rocket launch orbit")]), timeout=5)
    cands = [
        candidate("a", 1.0, "rocket launch orbit"),
        candidate("a-copy", 1.0, "rocket launch orbit today"),
        candidate("b", 1.0, "orbit station"),
    ]
    plain = stub.Rerank(pb.RerankRequest(user_id="u5", candidates=cands), timeout=5)
    diverse = stub.Rerank(
        pb.RerankRequest(user_id="u5", candidates=cands, options=pb.RerankOptions(diversity=0.8)), timeout=5
    )
    assert ids(plain)[:2] == ["a", "a-copy"]
    assert ids(diverse)[:2] == ["a", "b"]


# --- A/B ------------------------------------------------------------------------------------------
def test_bypass_flag_returns_upstream_order(stub) -> None:
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u6", "h", "rocket orbit")]), timeout=5)
    response = stub.Rerank(
        pb.RerankRequest(user_id="u6", candidates=mixed_candidates(), options=pb.RerankOptions(bypass=True)), timeout=5
    )
    assert response.variant == pb.VARIANT_BYPASSED
    assert ids(response) == [f"item-{i}" for i in range(6)]
    assert [it.original_rank for it in response.items] == list(range(6))


def test_kill_switch_bypasses_everyone(make_server) -> None:
    _, stub = make_server(fake_settings(kill_switch=True))
    response = stub.Rerank(pb.RerankRequest(user_id="anyone", candidates=mixed_candidates()), timeout=5)
    assert response.variant == pb.VARIANT_BYPASSED


def test_experiment_buckets_are_deterministic_across_servers(make_server) -> None:
    settings = fake_settings(treatment_percent=50.0)
    _, first = make_server(settings)
    _, second = make_server(settings)
    variants = {}
    for stub in (first, second):
        for i in range(40):
            r = stub.Rerank(pb.RerankRequest(user_id=f"user-{i}", candidates=mixed_candidates(), experiment="exp1"))
            assert r.bucket == bucket_of("exp1", f"user-{i}")
            variants.setdefault(f"user-{i}", set()).add(r.variant)
    assert all(len(v) == 1 for v in variants.values())  # same decision on both replicas
    assert {next(iter(v)) for v in variants.values()} == {pb.VARIANT_RERANKED, pb.VARIANT_CONTROL}
    for user, (variant,) in variants.items():
        assert (variant == pb.VARIANT_CONTROL) == (bucket_of("exp1", user) >= 5000)


# --- fail-open --------------------------------------------------------------------------------------
def test_failing_encoder_fails_open(make_server) -> None:
    _, stub = make_server(encoder=FailingEncoder(FakeEncoder(64), ok_batches=1))
    response = stub.Rerank(pb.RerankRequest(user_id="u", candidates=mixed_candidates()), timeout=5)
    assert response.variant == pb.VARIANT_FALLBACK
    assert response.fallback_reason == pb.FALLBACK_REASON_ENCODER_ERROR
    assert "injected encoder failure" in response.fallback_detail
    assert ids(response) == [f"item-{i}" for i in range(6)]


def test_slow_encoder_fails_open_within_the_deadline(make_server) -> None:
    # The reply leaves at (deadline - min_budget_ms): 100 ms of slack keeps it ahead of the deadline
    # on a loaded machine (the default 5 ms can be lost to scheduling alone).
    _, stub = make_server(
        fake_settings(encode_timeout_ms=5000.0, warmup=False, min_budget_ms=100.0), encoder=SlowEncoder(FakeEncoder(64), 1.0)
    )
    response = stub.Rerank(pb.RerankRequest(user_id="u", candidates=mixed_candidates()), timeout=0.5)
    assert response.variant == pb.VARIANT_FALLBACK
    assert response.fallback_reason == pb.FALLBACK_REASON_DEADLINE
    assert ids(response) == [f"item-{i}" for i in range(6)]


def test_encode_timeout_setting_bounds_the_wait(make_server) -> None:
    _, stub = make_server(fake_settings(encode_timeout_ms=50.0, warmup=False), encoder=SlowEncoder(FakeEncoder(64), 1.0))
    response = stub.Rerank(pb.RerankRequest(user_id="u", candidates=mixed_candidates()), timeout=10)
    assert response.variant == pb.VARIANT_FALLBACK and response.fallback_reason == pb.FALLBACK_REASON_DEADLINE
    assert response.timing.total_ms < 1000


def test_too_short_deadline_fails_open_before_any_work(make_server) -> None:
    _, stub = make_server(fake_settings(min_budget_ms=60_000.0))
    response = stub.Rerank(pb.RerankRequest(user_id="u", candidates=mixed_candidates()), timeout=30)
    assert response.fallback_reason == pb.FALLBACK_REASON_DEADLINE and response.encoded == 0


def test_not_ready_fails_open_and_health_flips_to_serving(make_server) -> None:
    gate = threading.Event()

    class GatedEncoder(FakeEncoder):
        def encode(self, texts):
            gate.wait(10)
            return super().encode(texts)

    running, stub = make_server(fake_settings(), encoder=GatedEncoder(64), wait=False)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "reranker.v1.RerankerService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    response = stub.Rerank(pb.RerankRequest(user_id="u", candidates=mixed_candidates()), timeout=5)
    assert response.variant == pb.VARIANT_FALLBACK and response.fallback_reason == pb.FALLBACK_REASON_NOT_READY
    code, _ = status_of(stub.RecordEvents, pb.RecordEventsRequest(events=[event("u", "i", "t")]), timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE
    gate.set()
    running.loader.join(10)
    status = health.Check(health_pb2.HealthCheckRequest(service="reranker.v1.RerankerService"), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_graceful_stop_reports_not_serving_and_refuses_new_calls(make_server) -> None:
    running, stub = make_server()
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    running.health.enter_graceful_shutdown()
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
    running.stop(1.0)
    code, _ = status_of(stub.Rerank, pb.RerankRequest(user_id="u", candidates=mixed_candidates()), timeout=2)
    assert code == grpc.StatusCode.UNAVAILABLE
    channel.close()


# --- other RPCs -------------------------------------------------------------------------------------
def test_upsert_items_precomputes_and_reencodes_changed_text(stub) -> None:
    first = stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="a", text="x"), pb.Item(item_id="b", text="y")]))
    assert (first.upserted, first.encoded) == (2, 2)
    again = stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="a", text="x"), pb.Item(item_id="b", text="z")]))
    assert (again.upserted, again.encoded) == (2, 1)
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u7", "h", "x")]))
    response = stub.Rerank(pb.RerankRequest(user_id="u7", candidates=[candidate("a", 1), candidate("b", 2)],
                                            options=pb.RerankOptions(blend_weight=0.5)))
    assert response.cache_hits == 2 and response.without_vector == 0 and ids(response)[0] == "a"


def test_events_for_cached_items_need_no_text(stub) -> None:
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="m1", text="rocket orbit")]))
    recorded = stub.RecordEvents(pb.RecordEventsRequest(events=[event("u8", "m1"), event("u8", "unknown")]))
    assert recorded.accepted == 2 and recorded.without_vector == 1


def test_stream_events_and_profile(stub) -> None:
    ts = Timestamp(seconds=1_700_000_000)
    events = [event("s1", f"i{i}", f"text {i}", timestamp=ts, event_id=f"e{i}") for i in range(25)]
    summary = stub.StreamEvents(iter(events + events[:5]), timeout=5)
    assert summary.accepted == 25 and summary.duplicates == 5
    profile = stub.GetUserProfile(pb.GetUserProfileRequest(user_id="s1", include_vector=True))
    assert profile.found and profile.event_count == 25
    assert len(profile.vector) == 64 and math.isclose(sum(x * x for x in profile.vector), 1.0, rel_tol=1e-4)
    assert profile.recent_events[-1].item_id == "i24"
    missing = stub.GetUserProfile(pb.GetUserProfileRequest(user_id="nobody"))
    assert not missing.found


def test_reflection_lists_the_services(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"reranker.v1.RerankerService", "grpc.health.v1.Health"} <= names


# --- status codes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.RerankRequest(candidates=[candidate("a", 1)]), "user_id"),
        (pb.RerankRequest(user_id="u"), "candidates"),
        (pb.RerankRequest(user_id="u", candidates=[candidate("a", math.nan)]), "candidates[0].score"),
        (pb.RerankRequest(user_id="u", candidates=[candidate("a", 1), candidate("b", math.inf)]), "candidates[1].score"),
        (pb.RerankRequest(user_id="u", candidates=[candidate("", 1)]), "candidates[0].item_id"),
        (pb.RerankRequest(user_id="u", candidates=[candidate(str(i), 1) for i in range(11)]), "candidates"),
        (pb.RerankRequest(user_id="u", candidates=[candidate("a", 1, "x" * 101)]), "candidates[0].text"),
        (pb.RerankRequest(user_id="u" * 33, candidates=[candidate("a", 1)]), "user_id"),
        (
            pb.RerankRequest(user_id="u", candidates=[candidate("a", 1)], options=pb.RerankOptions(blend_weight=2)),
            "options.blend_weight",
        ),
        (
            pb.RerankRequest(user_id="u", candidates=[candidate("a", 1)], context_events=[event("other", "i")]),
            "context_events[0].user_id",
        ),
        (
            pb.RerankRequest(user_id="u", candidates=[candidate("a", 1)], context_events=[pb.Event(item_id="i", type=42)]),
            "context_events[0].type",
        ),
    ],
)
def test_invalid_rerank_requests_name_the_field(make_server, request_: pb.RerankRequest, field: str) -> None:
    _, stub = make_server(fake_settings(max_candidates=10, max_text_chars=100, max_id_chars=32))
    code, details = status_of(stub.Rerank, request_, timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field), details


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("RecordEvents", pb.RecordEventsRequest(), "events"),
        ("RecordEvents", pb.RecordEventsRequest(events=[pb.Event(item_id="i")]), "events[0].user_id"),
        ("RecordEvents", pb.RecordEventsRequest(events=[event("u", "i", weight=math.nan)]), "events[0].weight"),
        ("UpsertItems", pb.UpsertItemsRequest(), "items"),
        ("UpsertItems", pb.UpsertItemsRequest(items=[pb.Item(text="t")]), "items[0].item_id"),
        ("GetUserProfile", pb.GetUserProfileRequest(), "user_id"),
    ],
)
def test_invalid_writes_name_the_field(stub, method: str, request_, field: str) -> None:
    code, details = status_of(getattr(stub, method), request_, timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field), details


def test_encoder_overload_is_resource_exhausted_for_writes(make_server) -> None:
    _, stub = make_server(fake_settings(encode_queue_size=4, warmup=False), encoder=SlowEncoder(FakeEncoder(64), 0.0))
    items = [pb.Item(item_id=f"i{i}", text=f"t{i}") for i in range(3)]
    # chunks of queue/2 = 2 texts: 3 items fit; 10 items in one request exceed the queue
    assert stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=5).encoded == 3
    many = [pb.Item(item_id=f"j{i}", text=f"t{i}") for i in range(10)]
    code, details = status_of(stub.UpsertItems, pb.UpsertItemsRequest(items=many), timeout=5)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in details


def test_unknown_errors_become_a_generic_internal_status(make_server, monkeypatch) -> None:
    running, stub = make_server()

    def boom(*_args, **_kwargs):
        raise KeyError("secret internals")

    monkeypatch.setattr(running.service, "user_profile", boom)
    code, details = status_of(stub.GetUserProfile, pb.GetUserProfileRequest(user_id="u"), timeout=5)
    assert code == grpc.StatusCode.INTERNAL and details == "internal error"
    # the server survives and keeps serving
    assert stub.Rerank(pb.RerankRequest(user_id="u", candidates=mixed_candidates()), timeout=5).items
