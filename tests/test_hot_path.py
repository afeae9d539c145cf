"""The Rerank hot path (columnar candidates, vectorized validation, wire-encoded response),
asserted through a real gRPC server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from reranker.serving import convert, wire
from reranker.ranking import scoring
from reranker.users import usermodel
from reranker.users.profiles import candidate_history, user_vector
from reranker.model.encoder import FakeEncoder
from reranker.types import DecimalIds, FallbackReason, RankedItems, RerankResult, Timing, Variant
from reranker.v1 import reranker_pb2 as pb
from conftest import candidate, event, fake_settings


def _titles(n: int) -> list[str]:
    return [f"movie {i} about {'space war' if i % 3 == 0 else 'love story'} ({1950 + i % 60})" for i in range(n)]


def test_500_cached_candidates_match_a_reference_ranking(stub, service) -> None:
    titles = _titles(500)
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=f"i{k}", text=t) for k, t in enumerate(titles)]))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "i0"), event("u", "i3")]))
    rng = np.random.default_rng(1)
    upstream = rng.random(500)
    reply = stub.Rerank(
        pb.RerankRequest(user_id="u", candidates=[candidate(f"i{k}", upstream[k], titles[k]) for k in range(500)])
    )
    assert reply.variant == pb.VARIANT_RERANKED
    assert (reply.cache_hits, reply.encoded, reply.without_vector) == (500, 0, 0)
    # Reference: the same scoring core over vectors computed independently of the cache.
    vectors = FakeEncoder(service.settings.model.fake_dim).encode(titles)
    s = service.settings
    state = service.profiles.get("u")
    user = user_vector(state, s.users)
    has = np.ones(500, bool)
    ids = [f"i{k}" for k in range(500)]
    seen = candidate_history(state, s.users, ids, vectors, has, user)  # i0 and i3 were consumed
    semantic = scoring.personal_semantic(
        vectors, has, user, state.history.vectors,
        usermodel.decayed_weights(state.history, state.ref_time, usermodel.decay_rate(s.users.half_life_seconds)),
        attention_weight=s.users.attention_weight, temperature=s.users.attention_temperature,
        own_rows=seen.own_rows, cosine=seen.cosine(vectors, user),
    )
    ranking = scoring.rank(upstream, vectors, has, user, weight=s.ranking.blend_weight, semantic=semantic)
    order, _ = scoring.apply_consumed_policy(ranking.order, seen.consumed, "demote")  # learned, no repeats
    assert reply.consumed_candidates == 2 and {it.item_id for it in reply.items[-2:]} == {"i0", "i3"}
    assert [it.item_id for it in reply.items] == [f"i{k}" for k in order]
    assert [it.original_rank for it in reply.items] == order.tolist()
    np.testing.assert_allclose([it.score for it in reply.items], ranking.final[order], rtol=1e-6)
    np.testing.assert_allclose([it.semantic_score for it in reply.items], ranking.semantic[order], atol=1e-6)
    assert [it.upstream_score for it in reply.items] == upstream[order].tolist()


def test_changed_text_reencodes_and_missing_text_uses_cache(stub) -> None:
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="a", text="red apple")]))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "a")]))
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1, "green pear"), candidate("b", 0)]))
    assert (reply.cache_hits, reply.encoded, reply.without_vector) == (0, 1, 1)
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1), candidate("a", 0, "x")]))
    assert (reply.cache_hits, reply.encoded, len(reply.items)) == (1, 0, 1)  # duplicate id dropped


def test_empty_text_is_encoded_but_unset_text_is_not(stub) -> None:
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "h", text="anything")]))
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("e", 1, ""), candidate("n", 0)]))
    assert (reply.encoded, reply.without_vector) == (1, 1)


def test_duplicates_keep_first_occurrence_and_original_rank(stub) -> None:
    reply = stub.Rerank(
        pb.RerankRequest(user_id="cold", candidates=[candidate("x", 3), candidate("y", 2), candidate("x", 9), candidate("z", 1)])
    )
    assert [(it.item_id, it.original_rank, it.upstream_score) for it in reply.items] == [("x", 0, 3), ("y", 1, 2), ("z", 3, 1)]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (candidate("", 1.0), "candidates[2].item_id must not be empty"),
        (candidate("x" * 300, 1.0), "candidates[2].item_id is 300 characters"),
        (candidate("ok", float("nan")), "candidates[2].score must be finite"),
        (candidate("ok", float("-inf")), "candidates[2].score must be finite"),
        (candidate("ok", 1.0, "t" * 5000), "candidates[2].text is 5000 characters"),
    ],
)
def test_vectorized_validation_names_the_first_bad_candidate(stub, bad, message) -> None:
    cands = [candidate("a", 1), candidate("b", 2), bad, candidate("", float("nan"))]
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(pb.RerankRequest(user_id="u", candidates=cands))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_top_k_and_fail_open_paths_use_the_same_encoding(make_server) -> None:
    _, stub = make_server(fake_settings(kill_switch=True))
    reply = stub.Rerank(pb.RerankRequest(user_id="u", top_k=2, candidates=[candidate(f"c{k}", -k) for k in range(5)]))
    assert reply.variant == pb.VARIANT_BYPASSED
    assert [(it.item_id, it.score, it.upstream_score, it.original_rank) for it in reply.items] == [
        ("c0", 0.0, 0.0, 0), ("c1", -1.0, -1.0, 1)
    ]


def test_explanations_still_reach_the_caller(stub) -> None:
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "h", text="space war")]))
    reply = stub.Rerank(
        pb.RerankRequest(
            user_id="u", candidates=[candidate("a", 1, "space war"), candidate("b", 2)], options=pb.RerankOptions(explain=True)
        )
    )
    by_id = {it.item_id: it.explanation for it in reply.items}
    assert by_id["a"].has_vector and by_id["a"].nearest_history_item_id == "h"
    assert not by_id["b"].has_vector


_ids = st.text(min_size=1, max_size=300)
_doubles = st.floats(allow_nan=False, allow_infinity=True, width=64)
# Rows of (item_id, score, semantic_score, upstream_score, original_rank).
_rows = st.lists(st.tuples(_ids, _doubles, _doubles, _doubles, st.integers(0, 2**32 - 1)), min_size=0, max_size=40)
_HEADER = dict(model_version="m", request_id="r", bucket=3)


def _result_of(rows: list[tuple]) -> RerankResult:
    columns = ([r[k] for r in rows] for k in range(5))
    return RerankResult(items=RankedItems(*columns), variant=Variant.RERANKED, **_HEADER)  # type: ignore[arg-type]


@hsettings(max_examples=60, deadline=None)
@given(_rows)
def test_wire_encoded_items_equal_protobuf_built_items(rows) -> None:
    result = _result_of(rows)
    expected = pb.RerankResponse(
        items=[
            pb.ScoredItem(item_id=r[0], score=r[1], semantic_score=r[2], upstream_score=r[3], original_rank=r[4])
            for r in rows
        ],
        variant=pb.VARIANT_RERANKED, timing=pb.Timing(), **_HEADER,
    )
    got = convert.rerank_response(result)
    assert got == expected
    assert pb.RerankResponse.FromString(got.SerializeToString()) == expected
    # What the server sends: the serialized header followed by the items, never a message per item.
    assert pb.RerankResponse.FromString(convert.encode_rerank_response(result).data) == expected


@hsettings(max_examples=60, deadline=None)
@given(_rows)
def test_wire_encoded_item_columns_equal_protobuf_built_columns(rows) -> None:
    columns = [[r[k] for r in rows] for k in range(5)]
    expected = pb.RerankResponse(
        variant=pb.VARIANT_RERANKED, timing=pb.Timing(), **_HEADER,
        item_columns=pb.ItemColumns(
            item_ids=columns[0], scores=columns[1], semantic_scores=columns[2], upstream_scores=columns[3],
            original_ranks=columns[4],
        ),
    )
    expected.item_columns.SetInParent()  # present even when empty: the caller asked for columns
    got = pb.RerankResponse.FromString(convert.encode_rerank_response(_result_of(rows), columns=True).data)
    assert got == expected
    assert got.HasField("item_columns")
    # Byte for byte what protobuf writes for the field.
    field = pb.RerankResponse(item_columns=expected.item_columns)
    field.item_columns.SetInParent()
    assert wire.encode_item_columns(_result_of(rows).items) == field.SerializeToString()


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 300), st.integers(0, 2**14 + 5), st.integers(0, 2**32 - 1)), max_size=60))
def test_packed_varints_match_protobuf_for_any_values(values: list[int]) -> None:
    """Repeats, several zeros, values of one to five bytes (original_ranks is uint32)."""
    reference = pb.ItemColumns(original_ranks=values).SerializeToString()
    payload = wire._packed_varints(np.array(values, dtype=np.int64))
    assert reference == (bytes([0x2A]) + wire.varint(len(payload)) + payload if values else b"")


@pytest.mark.parametrize("top", [0, 127, 128, 300, 16383, 16384, 2**32 - 1])
def test_packed_rank_varints_match_protobuf(top: int) -> None:
    ranks = np.unique(np.concatenate([np.arange(min(top, 500) + 1), np.linspace(0, top, 50).astype(np.int64)]))
    reference = pb.ItemColumns(original_ranks=ranks.tolist()).SerializeToString()
    payload = wire._packed_varints(ranks)
    assert reference == bytes([0x2A]) + wire.varint(len(payload)) + payload


_texts = st.text(max_size=40)
_counts = st.integers(0, 2**32 - 1)
_timing_ms = st.one_of(st.just(0.0), st.just(-0.0), st.floats(width=64))


@st.composite
def _results(draw: st.DrawFn) -> tuple[RerankResult, bool, bool]:
    """A RerankResult with any header values, and packed DecimalIds items (and the packed options)."""
    n = draw(st.integers(0, 30))
    ids = draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=n, max_size=n))
    floats = st.lists(st.floats(width=32), min_size=n, max_size=n)
    items = RankedItems(DecimalIds(ids), draw(floats), draw(floats), draw(floats),
                        draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n)))
    result = RerankResult(
        items=items, variant=draw(st.sampled_from(Variant)), model_version=draw(_texts), request_id=draw(_texts),
        fallback_reason=draw(st.sampled_from(FallbackReason)), fallback_detail=draw(_texts), cold_user=draw(st.booleans()),
        timing=Timing(draw(_timing_ms), draw(_timing_ms), draw(_timing_ms)), cache_hits=draw(_counts),
        encoded=draw(_counts), without_vector=draw(_counts), bucket=draw(st.integers(0, 9999)), arm=draw(_texts),
        consumed_candidates=draw(_counts), consumed_dropped=draw(_counts),
    )
    return result, draw(st.booleans()), draw(st.booleans())


def _protobuf_header(r: RerankResult) -> pb.RerankResponse:
    t = r.timing
    return pb.RerankResponse(
        variant=int(r.variant), fallback_reason=int(r.fallback_reason), fallback_detail=r.fallback_detail,
        model_version=r.model_version, request_id=r.request_id, cold_user=r.cold_user,
        timing=pb.Timing(total_ms=t.total_ms, encode_ms=t.encode_ms, score_ms=t.score_ms), cache_hits=r.cache_hits,
        encoded=r.encoded, without_vector=r.without_vector, bucket=r.bucket, arm=r.arm,
        consumed_candidates=r.consumed_candidates, consumed_dropped=r.consumed_dropped,
    )


def test_the_hand_written_response_knows_every_field_the_proto_has() -> None:
    """responsewire writes RerankResponse, Timing and PackedItems by hand: a field added to the proto
    must be added there too (and to the property test below), or answers would silently lack it."""
    known = {
        "RerankResponse": {"items", "variant", "fallback_reason", "fallback_detail", "model_version", "request_id",
                           "cold_user", "timing", "cache_hits", "encoded", "without_vector", "bucket", "item_columns",
                           "consumed_candidates", "consumed_dropped", "packed_items", "arm"},
        "Timing": {"total_ms", "encode_ms", "score_ms"},
        "PackedItems": {"positions", "scores", "item_ids", "semantic_scores", "upstream_scores"},
    }
    for message, names in known.items():
        fields = {f.name for f in getattr(pb, message).DESCRIPTOR.fields}
        assert fields == names, f"{message} fields changed: update serving/responsewire.py ({fields ^ names})"


@hsettings(max_examples=150, deadline=None)
@given(_results())
def test_hand_written_header_and_packed_items_are_the_bytes_protobuf_serializes(drawn) -> None:  # type: ignore[no-untyped-def]
    result, item_ids, score_details = drawn
    items = result.items
    expected = _protobuf_header(result)
    # The header before the items (messages and columns forms): byte for byte.
    assert convert.encode_rerank_response(result).data == expected.SerializeToString() + wire.encode_ranked_items(items)
    assert convert.encode_rerank_response(result, columns=True).data == (
        expected.SerializeToString() + wire.encode_item_columns(items)
    )
    # The packed form: packed_items (present even when empty) in its place among the header's fields.
    packed = expected.packed_items
    packed.SetInParent()
    packed.positions = items.original_ranks.astype("<i4").tobytes()
    packed.scores = items.scores.astype("<f4").tobytes()
    if item_ids:
        packed.item_ids = items.item_ids.values.astype("<i8").tobytes()
    if score_details:
        packed.semantic_scores = items.semantic_scores.astype("<f4").tobytes()
        packed.upstream_scores = items.upstream_scores.astype("<f4").tobytes()
    form = convert.ResponseForm(packed=True, packed_item_ids=item_ids, packed_score_details=score_details)
    assert convert.encode_rerank_response(result, False, form).data == expected.SerializeToString()
