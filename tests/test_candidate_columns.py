"""RerankRequest.candidate_columns: the same candidates as parallel columns, through a real server.

Columns and one message per candidate must give the same answer; every malformed column gets
INVALID_ARGUMENT naming the column and the offending position; the client sends columns.
"""

from __future__ import annotations

import grpc
import pytest

from reranker.client import RerankerClient, to_columns
from reranker.v1 import reranker_pb2 as pb
from conftest import ServerFactory, candidate, event, fake_settings

TEXTS = ["space war epic", "love story in paris", None, "space station drama", "romantic comedy", None]


def _as_messages(ids: list[str], scores: list[float], texts: list[str | None]) -> list[pb.Candidate]:
    return [candidate(i, s, t) for i, s, t in zip(ids, scores, texts, strict=True)]


def _as_columns(ids: list[str], scores: list[float], texts: list[str | None]) -> pb.CandidateColumns:
    return pb.CandidateColumns(item_ids=ids, scores=scores, texts=[t or "" for t in texts])


def _answer(reply: pb.RerankResponse) -> list[tuple[str, float, float, float, int]]:
    return [(it.item_id, it.score, it.semantic_score, it.upstream_score, it.original_rank) for it in reply.items]


def test_columns_and_messages_give_the_same_answer(stub) -> None:  # type: ignore[no-untyped-def]
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="c2", text="space opera")]))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "h", "space war epic")]))
    ids = ["c0", "c1", "c2", "c3", "c4", "c0"]  # c0 twice: the first occurrence wins in both forms
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    by_columns = stub.Rerank(pb.RerankRequest(user_id="u", candidate_columns=_as_columns(ids, scores, TEXTS)))
    assert (by_columns.cache_hits, by_columns.encoded, by_columns.without_vector) == (1, 4, 0)  # c2 was upserted
    by_messages = stub.Rerank(pb.RerankRequest(user_id="u", candidates=_as_messages(ids, scores, TEXTS)))
    assert (by_messages.cache_hits, by_messages.encoded, by_messages.without_vector) == (5, 0, 0)
    assert by_columns.variant == by_messages.variant == pb.VARIANT_RERANKED
    assert _answer(by_columns) == _answer(by_messages)
    assert by_columns.items[0].item_id == "c0"  # the same text as the user's history item


def test_columns_without_texts_rank_uncached_items_by_upstream_score(stub) -> None:  # type: ignore[no-untyped-def]
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "h", "space war epic")]))
    reply = stub.Rerank(
        pb.RerankRequest(user_id="u", candidate_columns=pb.CandidateColumns(item_ids=["a", "b"], scores=[0.1, 0.9]))
    )
    assert reply.variant == pb.VARIANT_RERANKED
    assert [it.item_id for it in reply.items] == ["b", "a"]
    assert (reply.encoded, reply.without_vector) == (0, 2)


def _assert_refused(stub, request: pb.RerankRequest, message: str) -> None:  # type: ignore[no-untyped-def]
    """Rerank answers INVALID_ARGUMENT with `message` in its details."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Rerank(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (pb.CandidateColumns(), "candidate_columns.item_ids must not be empty"),
        (pb.CandidateColumns(item_ids=["a", "b"], scores=[1.0]), "candidate_columns.scores has 1 values for 2 item_ids"),
        (pb.CandidateColumns(item_ids=["a"], scores=[1.0], texts=["x", "y"]), "candidate_columns.texts has 2 values"),
        (pb.CandidateColumns(item_ids=["a", "", "c"], scores=[1, 2, 3]), "candidate_columns.item_ids[1] must not be empty"),
        (pb.CandidateColumns(item_ids=["a", "b", "c"], scores=[1, 2, float("nan")]), "candidate_columns.scores[2] must be finite"),
        (pb.CandidateColumns(item_ids=["a", "b"], scores=[1, 2], texts=["ok", "x" * 5000]), "candidate_columns.texts[1] is 5000 characters"),
        (pb.CandidateColumns(item_ids=[f"i{k}" for k in range(11)], scores=[1.0] * 11), "(setting max_candidates)"),
        # Lengths count characters, whatever the encoding, and a NUL inside a string is a character too.
        (pb.CandidateColumns(item_ids=["a", "b"], scores=[1, 2], texts=["ok", "é" * 4097]), "candidate_columns.texts[1] is 4097 characters"),
        (pb.CandidateColumns(item_ids=["a", "b"], scores=[1, 2], texts=["a\x00b", "x" * 4097]), "candidate_columns.texts[1] is 4097 characters"),
        (pb.CandidateColumns(item_ids=["a\x00", "b"], scores=[1, 2], texts=["", "\x00" * 4097]), "candidate_columns.texts[1] is 4097 characters"),
    ],
)
def test_malformed_columns_are_invalid_argument_naming_the_column(
    make_server: ServerFactory, columns: pb.CandidateColumns, message: str
) -> None:
    _, stub = make_server(fake_settings(max_candidates=10, max_text_chars=4096))
    request = pb.RerankRequest(user_id="u", candidate_columns=columns)
    request.candidate_columns.SetInParent()  # present even when empty
    _assert_refused(stub, request, message)


def test_columns_at_the_length_limits_are_accepted(make_server: ServerFactory) -> None:
    """Ids and texts count characters (not UTF-8 bytes); NULs and empty texts are characters / no text."""
    _, stub = make_server(fake_settings(max_text_chars=4096))
    columns = pb.CandidateColumns(item_ids=["a\x00b", "ü", "c"], scores=[0.1, 0.9, 0.5], texts=["é" * 4096, "", "x\x00"])
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidate_columns=columns), timeout=5)
    assert sorted(it.item_id for it in reply.items) == ["a\x00b", "c", "ü"]
    assert (reply.encoded, reply.without_vector) == (2, 1)  # "ü" came without text


def test_both_forms_at_once_are_refused(stub) -> None:  # type: ignore[no-untyped-def]
    request = pb.RerankRequest(
        user_id="u", candidates=[candidate("a", 1.0)], candidate_columns=pb.CandidateColumns(item_ids=["b"], scores=[1.0])
    )
    _assert_refused(stub, request, "set one of candidates, candidate_columns and packed_candidates")


def test_the_client_sends_columns_and_falls_back_to_messages_for_an_empty_text(make_server: ServerFactory) -> None:
    running, _ = make_server(fake_settings())
    columns = to_columns([("a", 0.5, "text a"), ("b", 0.25), pb.Candidate(item_id="c", score=0.1)])
    assert columns == pb.CandidateColumns(item_ids=["a", "b", "c"], scores=[0.5, 0.25, 0.1], texts=["text a", "", ""])
    assert to_columns([("a", 0.5), ("b", 0.25)]) == pb.CandidateColumns(item_ids=["a", "b"], scores=[0.5, 0.25])
    assert to_columns([("a", 0.5, "")]) is None  # "" must be encoded as a text: only messages can say so
    request = RerankerClient.rerank_request("u", [("a", 0.5, "x"), ("b", 0.9)])
    assert not request.candidates and list(request.candidate_columns.item_ids) == ["a", "b"]
    with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=5) as client:
        outcome = client.rerank_or_upstream("u", [("a", 0.5, "x"), ("b", 0.9), ("c", 0.1, "")])
        assert outcome.reranked and sorted(outcome.item_ids) == ["a", "b", "c"]
        assert outcome.response is not None and outcome.response.encoded == 2  # "x" and ""
        outcome = client.rerank_or_upstream("u", [("a", 0.5, "x"), ("b", 0.9)])
        assert outcome.reranked and outcome.response is not None and outcome.response.cache_hits == 1
    assert b"reranker_rerank_candidates_sum 5.0" in running.service.metrics.exposition()


def _answer_of_columns(reply: pb.RerankResponse) -> list[tuple[str, float, float, float, int]]:
    c = reply.item_columns
    return list(zip(c.item_ids, c.scores, c.semantic_scores, c.upstream_scores, c.original_ranks, strict=True))


def test_columns_answer_carries_the_same_order_and_scores_as_items(stub) -> None:  # type: ignore[no-untyped-def]
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "h", "space war epic")]))
    ids, scores = ["c0", "c1", "c2", "c3", "c4", "c0"], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    as_items = stub.Rerank(pb.RerankRequest(user_id="u", candidate_columns=_as_columns(ids, scores, TEXTS), top_k=4))
    as_columns = stub.Rerank(
        pb.RerankRequest(
            user_id="u", candidate_columns=_as_columns(ids, scores, TEXTS), top_k=4, options=pb.RerankOptions(columns=True)
        )
    )
    assert as_columns.variant == as_items.variant == pb.VARIANT_RERANKED
    assert not as_columns.items and as_columns.HasField("item_columns") and not as_items.HasField("item_columns")
    assert _answer_of_columns(as_columns) == _answer(as_items)
    assert len(_answer(as_items)) == 4
    bypassed = stub.Rerank(  # the upstream-order paths answer in columns too
        pb.RerankRequest(
            user_id="u", candidate_columns=_as_columns(ids, scores, TEXTS), options=pb.RerankOptions(columns=True, bypass=True)
        )
    )
    assert bypassed.variant == pb.VARIANT_BYPASSED
    assert list(bypassed.item_columns.item_ids) == ["c0", "c1", "c2", "c3", "c4"]
    assert list(bypassed.item_columns.original_ranks) == [0, 1, 2, 3, 4]


def test_columns_answer_with_explanations_is_refused(stub) -> None:  # type: ignore[no-untyped-def]
    request = pb.RerankRequest(
        user_id="u", candidates=[candidate("a", 1.0)], options=pb.RerankOptions(columns=True, explain=True)
    )
    _assert_refused(stub, request, "options.columns answers without explanations")


def test_the_client_reads_a_columns_answer(make_server: ServerFactory) -> None:
    running, stub = make_server(fake_settings())
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "h", "space war epic")]))
    given = [("a", 0.9, "love story in paris"), ("b", 0.1, "space war epic"), ("c", 0.5)]
    with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=5) as client:
        by_items = client.rerank_or_upstream("u", given)
        by_columns = client.rerank_or_upstream("u", given, columns=True)
    assert by_columns.reranked and by_columns.response is not None and by_columns.response.HasField("item_columns")
    assert by_columns.item_ids == by_items.item_ids and sorted(by_columns.item_ids) == ["a", "b", "c"]
