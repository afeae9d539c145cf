"""Event ingestion and the user model through the real gRPC surface (in-process profile store)."""

from __future__ import annotations

import math
import threading
import time

import grpc
import numpy as np
import pytest

from reranker.model.encoder import FakeEncoder
from reranker.v1 import reranker_pb2 as pb
from conftest import ServerFactory, candidate, event, fake_settings

DAY = 86_400.0
T0 = 1_700_000_000.0

FOOTBALL = "football league match goal striker"
PIANO = "piano orchestra symphony concert violin"


def at(seconds: float) -> dict[str, object]:
    """`timestamp=` keyword for event(): an explicit event time."""
    ts = pb.Event().timestamp
    ts.FromNanoseconds(int(seconds * 1e9))
    return {"timestamp": ts}


def record(stub, *events: pb.Event) -> pb.RecordEventsResponse:  # type: ignore[no-untyped-def]
    return stub.RecordEvents(pb.RecordEventsRequest(events=list(events)), timeout=10)


def ranked_ids(stub, user: str, candidates: list[pb.Candidate], **options: object) -> list[str]:  # type: ignore[no-untyped-def]
    response = stub.Rerank(
        pb.RerankRequest(user_id=user, candidates=candidates, options=pb.RerankOptions(**options)), timeout=10
    )
    assert response.variant == pb.VARIANT_RERANKED, response.fallback_detail
    return [it.item_id for it in response.items]


def profile(stub, user: str) -> pb.GetUserProfileResponse:  # type: ignore[no-untyped-def]
    return stub.GetUserProfile(pb.GetUserProfileRequest(user_id=user, include_vector=True), timeout=10)


TOPIC_CANDIDATES = [candidate("c-football", 1.0, FOOTBALL + " cup final"), candidate("c-piano", 1.0, PIANO + " recital")]


def test_a_click_changes_the_very_next_rerank(stub) -> None:  # type: ignore[no-untyped-def]
    assert ranked_ids(stub, "u1", TOPIC_CANDIDATES) == ["c-football", "c-piano"]  # cold: upstream order
    assert record(stub, event("u1", "p1", PIANO, event_id="e1")).accepted == 1
    assert ranked_ids(stub, "u1", TOPIC_CANDIDATES) == ["c-piano", "c-football"]


def test_replayed_events_are_not_counted_twice(stub) -> None:  # type: ignore[no-untyped-def]
    batch = [event("u2", "f1", FOOTBALL, event_id="a"), event("u2", "p1", PIANO, event_id="b"),
             event("u2", "p1", PIANO, event_id="b")]  # a duplicate inside the batch, too
    first = record(stub, *batch)
    assert (first.accepted, first.duplicates) == (2, 1)
    before = profile(stub, "u2")
    again = record(stub, *batch)
    assert (again.accepted, again.duplicates) == (0, 3)
    after = profile(stub, "u2")
    assert after.event_count == before.event_count == 2
    np.testing.assert_allclose(after.vector, before.vector)
    # Events without an id are never de-duplicated.
    assert record(stub, event("u2", "p1", PIANO), event("u2", "p1", PIANO)).accepted == 2
    assert profile(stub, "u2").event_count == 4


def test_dedup_memory_is_bounded(make_server: ServerFactory) -> None:
    _, stub = make_server(fake_settings(max_event_ids_per_user=3))
    record(stub, *(event("u", "i", "x", event_id=f"e{i}") for i in range(4)))
    assert record(stub, event("u", "i", "x", event_id="e3")).duplicates == 1  # remembered
    assert record(stub, event("u", "i", "x", event_id="e0")).accepted == 1  # forgotten: 3 newer ids since


def test_decay_math_through_the_api_matches_hand_computed_values(make_server: ServerFactory) -> None:
    _, stub = make_server(fake_settings(half_life_seconds=100.0, session_mix=0.0))
    texts = {"i1": "alpha beta", "i2": "gamma delta", "i3": "epsilon zeta"}
    # Arrival order differs from event order: the dislike at t=50 arrives last.
    record(stub, event("u", "i1", texts["i1"], type=pb.EVENT_TYPE_CLICK, **at(T0)))
    record(stub, event("u", "i2", texts["i2"], type=pb.EVENT_TYPE_PURCHASE, **at(T0 + 100)))
    record(stub, event("u", "i3", texts["i3"], type=pb.EVENT_TYPE_DISLIKE, **at(T0 + 50)))
    v = dict(zip(texts, FakeEncoder(64).encode(list(texts.values())).astype(np.float64)))
    # Weights click=1, purchase=3, dislike=-1.5; decay to t=100 with half-life 100 s.
    expected = 1.0 * 0.5 * v["i1"] + 3.0 * 1.0 * v["i2"] - 1.5 * 2**-0.5 * v["i3"]
    np.testing.assert_allclose(profile(stub, "u").vector, expected / np.linalg.norm(expected), atol=1e-6)


def test_event_weight_override_and_negative_feedback(stub) -> None:  # type: ignore[no-untyped-def]
    record(stub, event("u3", "p1", PIANO, type=pb.EVENT_TYPE_DISLIKE))
    assert ranked_ids(stub, "u3", TOPIC_CANDIDATES) == ["c-football", "c-piano"]
    record(stub, event("u4", "p1", PIANO, type=pb.EVENT_TYPE_DISLIKE, weight=2.0))  # override: positive
    assert ranked_ids(stub, "u4", TOPIC_CANDIDATES) == ["c-piano", "c-football"]


def football_history(stub, user: str) -> None:  # type: ignore[no-untyped-def]
    record(stub, *(event(user, f"f{i}", f"{FOOTBALL} week{i}", **at(T0 + 60 * i)) for i in range(10)))


def test_topic_shift_shows_within_one_event(make_server: ServerFactory) -> None:
    _, stub = make_server(fake_settings())
    football_history(stub, "u")
    assert ranked_ids(stub, "u", TOPIC_CANDIDATES) == ["c-football", "c-piano"]
    record(stub, event("u", "p1", PIANO, **at(T0 + DAY)))  # the next day: a new session about piano
    assert ranked_ids(stub, "u", TOPIC_CANDIDATES) == ["c-piano", "c-football"]


def test_long_term_only_does_not_follow_a_single_event(make_server: ServerFactory) -> None:
    _, stub = make_server(fake_settings(session_mix=0.0))
    football_history(stub, "u")
    record(stub, event("u", "p1", PIANO, **at(T0 + DAY)))
    assert ranked_ids(stub, "u", TOPIC_CANDIDATES) == ["c-football", "c-piano"]


def test_session_ends_after_a_pause(make_server: ServerFactory) -> None:
    # The same piano click inside the football session (one minute later) is one of 10 session
    # events: the session still says football.
    _, stub = make_server(fake_settings())
    football_history(stub, "u")
    record(stub, event("u", "p1", PIANO, **at(T0 + 600)))
    assert ranked_ids(stub, "u", TOPIC_CANDIDATES) == ["c-football", "c-piano"]


def test_attention_pooling_serves_each_interest_separately(make_server: ServerFactory) -> None:
    # Two equal interests. The pooled vector sits between them, so a candidate mixing both topics
    # beats a pure one; attention scores each candidate against the history item most like it.
    history = [event("u", "f", FOOTBALL, **at(T0)), event("u", "p", PIANO, **at(T0 + 1))]
    candidates = [candidate("mixed", 1.0, "football league piano orchestra"), candidate("pure", 1.0, FOOTBALL)]
    _, plain = make_server(fake_settings(attention_weight=0.0))
    _, attentive = make_server(fake_settings(attention_weight=1.0, attention_temperature=0.05))
    for stub in (plain, attentive):
        record(stub, *history)
    assert ranked_ids(plain, "u", candidates) == ["mixed", "pure"]
    assert ranked_ids(attentive, "u", candidates) == ["pure", "mixed"]


def test_attention_respects_dislikes(make_server: ServerFactory) -> None:
    _, stub = make_server(fake_settings(attention_weight=1.0))
    record(stub, event("u", "f", FOOTBALL, **at(T0)), event("u", "p", PIANO, type=pb.EVENT_TYPE_DISLIKE, **at(T0 + 1)))
    assert ranked_ids(stub, "u", list(reversed(TOPIC_CANDIDATES))) == ["c-football", "c-piano"]


def test_stream_events_counts_and_deduplicates(stub) -> None:  # type: ignore[no-untyped-def]
    events = [event("s1", f"i{i % 5}", f"text {i % 5}", event_id=f"e{i % 50}") for i in range(120)]
    response = stub.StreamEvents(iter(events), timeout=10)
    assert (response.accepted, response.duplicates, response.without_vector) == (50, 70, 0)
    assert profile(stub, "s1").event_count == 50


def test_stream_applies_each_event_before_the_stream_ends(stub) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()

    def one_click_then_wait():  # type: ignore[no-untyped-def]
        yield event("s2", "p1", PIANO, event_id="s2-1")
        release.wait(10)

    call = stub.StreamEvents.future(one_click_then_wait(), timeout=20)
    try:
        deadline = time.monotonic() + 5
        order = ranked_ids(stub, "s2", TOPIC_CANDIDATES)
        while order != ["c-piano", "c-football"] and time.monotonic() < deadline:
            time.sleep(0.01)
            order = ranked_ids(stub, "s2", TOPIC_CANDIDATES)
        assert order == ["c-piano", "c-football"], "the streamed click was not applied while the stream was open"
        assert not call.done()
    finally:
        release.set()
    assert call.result().accepted == 1


def test_stream_rejects_a_bad_event_and_keeps_what_came_before(stub) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()

    def good_then_bad():  # type: ignore[no-untyped-def]
        yield event("s3", "p1", PIANO)
        release.wait(5)  # the good event is applied on its own before the bad one arrives
        yield pb.Event(user_id="s3", item_id="")

    call = stub.StreamEvents.future(good_then_bad(), timeout=10)
    deadline = time.monotonic() + 5
    while not profile(stub, "s3").found and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    with pytest.raises(grpc.RpcError) as err:
        call.result()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item_id" in err.value.details()
    assert profile(stub, "s3").event_count == 1


def test_stream_applies_the_events_before_a_refused_one_even_in_the_same_batch(stub) -> None:  # type: ignore[no-untyped-def]
    """[ok, bad, ok] sent at once (one batch on the server): the first is applied, the stream ends
    with INVALID_ARGUMENT naming event[1], the third is not applied. The outcome does not depend on
    how the server happened to batch the stream."""
    events = [event("s4", "p1", PIANO, event_id="s4-1"), pb.Event(user_id="s4", item_id="", event_id="s4-2"),
              event("s4", "p3", PIANO, event_id="s4-3")]
    with pytest.raises(grpc.RpcError) as err:
        stub.StreamEvents(iter(events), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("event[1].item_id"), err.value.details()
    view = profile(stub, "s4")
    assert view.event_count == 1 and [e.item_id for e in view.recent_events] == ["p1"]


def test_recent_events_are_bounded_and_drop_text(make_server: ServerFactory) -> None:
    _, stub = make_server(fake_settings(recent_events_per_user=3, vector_history_size=4))
    record(stub, *(event("u", f"i{i}", f"text {i}", **at(T0 + i)) for i in range(6)))
    view = profile(stub, "u")
    assert view.event_count == 6
    assert [e.item_id for e in view.recent_events] == ["i3", "i4", "i5"]
    assert all(not e.HasField("text") for e in view.recent_events)


def test_explanations_name_the_nearest_liked_history_item(stub) -> None:  # type: ignore[no-untyped-def]
    record(stub, event("u5", "f1", FOOTBALL), event("u5", "p1", PIANO, type=pb.EVENT_TYPE_DISLIKE))
    response = stub.Rerank(
        pb.RerankRequest(user_id="u5", candidates=TOPIC_CANDIDATES, options=pb.RerankOptions(explain=True)), timeout=10
    )
    nearest = {it.item_id: it.explanation.nearest_history_item_id for it in response.items}
    assert nearest == {"c-football": "f1", "c-piano": "f1"}  # the disliked item is no "because you liked"


def test_user_model_settings_are_validated() -> None:
    for bad in ({"session_mix": 1.5}, {"attention_weight": -0.1}, {"session_half_life_seconds": 0},
                {"max_event_ids_per_user": 0}, {"max_event_weight": 2.0}, {"max_event_skew_seconds": -1.0},
                {"event_weights": "click=inf"}):
        with pytest.raises(ValueError):
            fake_settings(**bad)
    assert math.isclose(fake_settings().users.session_mix, 0.5)
