"""RerankRequest.packed_candidates: int64 ids and float32 scores as raw little-endian bytes, the
answer as RerankResponse.packed_items, through real servers.

The same request in any form (messages, columns, packed) gives the same ranking, with the fixed
blend and with a trained head; a catalog loaded with decimal string ids serves packed requests;
every malformed packed field gets INVALID_ARGUMENT naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from reranker.client import RerankerClient, packed_candidates, unpack_items
from reranker.evaluation import train
from reranker.model.items import ItemVectorCache
from reranker.serving.server import build_server
from reranker.service import RerankService
from reranker.model.encoder import FakeEncoder
from reranker.types import DecimalIds
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc
from conftest import ServerFactory, event, fake_settings, wait_ready
from test_candidate_columns import _assert_refused
from test_head import make_head

TEXTS = ["space war epic", "love story in paris", "space station drama", "romantic comedy", "cooking show", ""]
# Items 0..9 watched together: the head's collaborative features have something to say.
HISTORIES = {"a": ["1", "2", "3"], "b": ["1", "2"], "c": ["1", "7", "2"], "d": ["4", "7"], "e": ["5", "6", "2"]}


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, pb_grpc.RerankerServiceStub]]:
    """Two servers, the fixed blend and a trained head, with the same catalog (string ids "0".."19")
    and the same user history."""
    head_path = Path(tmp_path_factory.mktemp("head")) / "head.npz"
    graph = train.item_graph(HISTORIES, train.TrainConfig())
    make_head(graph=graph, popularity={"2": 1.0, "5": 0.5, "11": 0.25}).save(head_path)
    servers, channels, out = [], [], {}
    for name, settings in (
        ("blend", fake_settings()),
        ("head", dataclasses.replace(fake_settings(), head_path=str(head_path))),
    ):
        running = build_server(settings, RerankService(settings, FakeEncoder(settings.model.fake_dim)))
        wait_ready(running)
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        stub = pb_grpc.RerankerServiceStub(channel)
        stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=str(k), text=f"item {k} {TEXTS[k % 5]}") for k in range(20)]))
        stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "1"), event("u", "2"), event("u", "42", text="space war")]))
        servers.append(running)
        channels.append(channel)
        out[name] = stub
    yield out
    for channel in channels:
        channel.close()
    for running in servers:
        running.stop(0)


def _requests(ids: list[int], scores: np.ndarray, texts: list[str | None], **common: object) -> dict[str, pb.RerankRequest]:
    """The same candidates in the three forms."""
    messages = [pb.Candidate(item_id=str(i), score=float(s)) for i, s in zip(ids, scores.tolist())]
    for m, t in zip(messages, texts):
        if t:
            m.text = t
    columns = pb.CandidateColumns(item_ids=[str(i) for i in ids], scores=scores.tolist(), texts=[t or "" for t in texts])
    options = common.pop("options", None) or pb.RerankOptions()
    packed_options = pb.RerankOptions()
    packed_options.CopyFrom(options)
    packed_options.packed_item_ids = packed_options.packed_score_details = True
    columns_options = pb.RerankOptions()
    columns_options.CopyFrom(options)
    columns_options.columns = True
    return {
        "messages": pb.RerankRequest(candidates=messages, options=options, **common),  # type: ignore[arg-type]
        "columns": pb.RerankRequest(candidate_columns=columns, options=columns_options, **common),  # type: ignore[arg-type]
        "packed": pb.RerankRequest(
            packed_candidates=packed_candidates(ids, scores, texts), options=packed_options, **common  # type: ignore[arg-type]
        ),
    }


def _answer(reply: pb.RerankResponse) -> list[tuple[str, int, float, float, float]]:
    """(id, original rank, final, semantic, upstream) per item, scores as float32 (the packed width)."""
    f32 = np.float32
    if reply.HasField("packed_items"):
        packed = unpack_items(reply)
        assert packed.item_ids is not None and packed.semantic_scores is not None and packed.upstream_scores is not None
        return [
            (str(i), int(p), float(f), float(s), float(u))
            for i, p, f, s, u in zip(
                packed.item_ids.tolist(), packed.positions.tolist(), packed.scores, packed.semantic_scores,
                packed.upstream_scores,
            )
        ]
    if reply.HasField("item_columns"):
        c = reply.item_columns
        rows = zip(c.item_ids, c.original_ranks, c.scores, c.semantic_scores, c.upstream_scores)
    else:
        rows = ((it.item_id, it.original_rank, it.score, it.semantic_score, it.upstream_score) for it in reply.items)
    return [(i, int(p), float(f32(f)), float(f32(s)), float(f32(u))) for i, p, f, s, u in rows]


_candidate = st.tuples(st.integers(-3, 30), st.floats(-1e3, 1e3, width=32), st.sampled_from([None, *TEXTS]))


@hsettings(max_examples=40, deadline=None)
@given(
    cands=st.lists(_candidate, min_size=1, max_size=25),
    top_k=st.integers(0, 8),
    diversity=st.sampled_from([0.0, 0.4]),
    server=st.sampled_from(["blend", "head"]),
    user=st.sampled_from(["u", "cold"]),
)
def test_the_same_request_in_any_form_gives_the_same_ranking(stubs, cands, top_k, diversity, server, user) -> None:  # type: ignore[no-untyped-def]
    ids = [c[0] for c in cands]
    scores = np.array([c[1] for c in cands], dtype=np.float32)
    texts = [c[2] for c in cands]
    stub = stubs[server]
    requests = _requests(ids, scores, texts, user_id=user, top_k=top_k, options=pb.RerankOptions(diversity=diversity))
    stub.Rerank(requests["messages"])  # encode every new text once: all three forms then see the same cache
    answers = {form: stub.Rerank(request) for form, request in requests.items()}
    variants = {reply.variant for reply in answers.values()}
    assert variants == {pb.VARIANT_RERANKED}
    expected = _answer(answers["messages"])
    assert _answer(answers["columns"]) == expected
    assert _answer(answers["packed"]) == expected
    unique = len(dict.fromkeys(ids))
    assert len(expected) == (min(top_k, unique) if top_k else unique)


def test_a_catalog_loaded_with_string_ids_serves_packed_requests(make_server: ServerFactory) -> None:
    _, stub = make_server()
    stub.UpsertItems(pb.UpsertItemsRequest(items=[
        pb.Item(item_id="42", text="space opera"), pb.Item(item_id="-7", text="love story"),
        pb.Item(item_id="042", text="not item 42"),  # not canonical: a different item than 42
    ]))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "42")]))
    reply = stub.Rerank(pb.RerankRequest(user_id="u", packed_candidates=packed_candidates([-7, 42, 43], [3.0, 2.0, 1.0])))
    assert (reply.cache_hits, reply.encoded, reply.without_vector) == (2, 0, 1)
    packed = unpack_items(reply)
    # 42, the item the user clicked (as "42"), is the same consumed item: for a user who never
    # repeats, the learned policy puts it last.
    assert reply.consumed_candidates == 1 and packed.positions.tolist()[-1] == 1
    assert packed.item_ids is None and packed.semantic_scores is None  # not asked for
    assert packed.positions.dtype == np.dtype("<i4") and packed.scores.dtype == np.dtype("<f4")
    # Texts in the packed form: "" means no text; a new id with a text is encoded and cached under "43".
    reply = stub.Rerank(pb.RerankRequest(user_id="u", packed_candidates=packed_candidates([43, 44], [1, 2], ["space", ""])))
    assert (reply.encoded, reply.without_vector) == (1, 1)
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[pb.Candidate(item_id="43", score=1.0)]))
    assert reply.cache_hits == 1


def test_packed_fail_open_and_bypass_answer_packed(make_server: ServerFactory) -> None:
    _, stub = make_server(fake_settings(kill_switch=True))
    request = pb.RerankRequest(
        user_id="u", top_k=2, packed_candidates=packed_candidates([5, 5, 6, 7], [1.0, 9.0, -2.5, 0.5]),
        options=pb.RerankOptions(packed_item_ids=True, packed_score_details=True),
    )
    packed = unpack_items(stub.Rerank(request))
    assert packed.variant == "bypassed"
    assert packed.positions.tolist() == [0, 2] and packed.item_ids.tolist() == [5, 6]  # type: ignore[union-attr]
    assert packed.scores.tolist() == [1.0, -2.5] and packed.upstream_scores.tolist() == [1.0, -2.5]  # type: ignore[union-attr]


def _raw(ids: bytes, scores: bytes, texts: tuple[str, ...] = ()) -> pb.PackedCandidates:
    return pb.PackedCandidates(item_ids=ids, scores=scores, texts=texts)


_IDS3 = np.arange(3, dtype="<i8").tobytes()
_SCORES3 = np.ones(3, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    ("packed", "message"),
    [
        (_raw(b"", b""), "packed_candidates.item_ids must not be empty"),
        (_raw(_IDS3 + b"\x01", _SCORES3), "packed_candidates.item_ids is 25 bytes, not a multiple of 8 (int64"),
        (_raw(_IDS3, _SCORES3[:-1]), "packed_candidates.scores is 11 bytes, not a multiple of 4 (float32"),
        (_raw(_IDS3, _SCORES3[:-4]), "packed_candidates.scores has 2 values for 3 item_ids"),
        (_raw(_IDS3, np.array([1, np.nan, 2], "<f4").tobytes()), "packed_candidates.scores[1] must be finite, got nan"),
        (_raw(_IDS3, np.array([1, 2, -np.inf], "<f4").tobytes()), "packed_candidates.scores[2] must be finite"),
        (_raw(_IDS3, np.array([np.inf, -np.inf, 1], "<f4").tobytes()), "packed_candidates.scores[0] must be finite, got inf"),
        (_raw(_IDS3, _SCORES3, ("a", "b")), "packed_candidates.texts has 2 values for 3 item_ids"),
        (_raw(_IDS3, _SCORES3, ("a", "x" * 5000, "")), "packed_candidates.texts[1] is 5000 characters"),
        (
            _raw(np.arange(11, dtype="<i8").tobytes(), np.ones(11, "<f4").tobytes()),
            "packed_candidates.item_ids has 11 entries; the limit is 10 (setting max_candidates)",
        ),
    ],
)
def test_malformed_packed_candidates_are_invalid_argument_naming_the_field(
    make_server: ServerFactory, packed: pb.PackedCandidates, message: str
) -> None:
    _, stub = make_server(fake_settings(max_candidates=10, max_text_chars=4096))
    request = pb.RerankRequest(user_id="u", packed_candidates=packed)
    request.packed_candidates.SetInParent()  # present even when empty
    _assert_refused(stub, request, message)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"candidates": [pb.Candidate(item_id="1", score=1.0)]}, "set one of candidates, candidate_columns and packed_candidates"),
        ({"candidate_columns": pb.CandidateColumns(item_ids=["1"], scores=[1.0])}, "set one of candidates"),
        ({"options": pb.RerankOptions(explain=True)}, "options.explain does not apply to packed_candidates"),
        ({"options": pb.RerankOptions(columns=True)}, "options.columns does not apply to packed_candidates"),
    ],
)
def test_packed_with_another_form_or_a_per_item_answer_is_refused(stub, extra, message) -> None:  # type: ignore[no-untyped-def]
    request = pb.RerankRequest(user_id="u", packed_candidates=packed_candidates([1, 2], [1.0, 2.0]), **extra)
    _assert_refused(stub, request, message)


def test_the_largest_finite_packed_scores_are_accepted(make_server: ServerFactory) -> None:
    """Every score at float32's largest magnitude, as many as max_candidates allows: all finite, served."""
    _, stub = make_server(fake_settings(max_candidates=500))
    top = np.finfo(np.float32).max
    scores = np.where(np.arange(500) % 3 == 0, -top, top).astype("<f4")
    request = pb.RerankRequest(user_id="u", packed_candidates=_raw(np.arange(500, dtype="<i8").tobytes(), scores.tobytes()))
    reply = stub.Rerank(request, timeout=10)
    assert sorted(np.frombuffer(reply.packed_items.positions, "<i4").tolist()) == list(range(500))


def test_the_same_options_are_judged_by_the_form_of_each_request(stub) -> None:  # type: ignore[no-untyped-def]
    """Options validated once are remembered with the form they came with: explain is refused with
    packed candidates and honoured with messages, however often and in whatever order they come; a
    bad option is refused every time."""
    explain = pb.RerankOptions(explain=True)
    packed = pb.RerankRequest(user_id="u", packed_candidates=packed_candidates([1, 2], [1.0, 2.0]), options=explain)
    messages = pb.RerankRequest(user_id="u", candidates=[pb.Candidate(item_id="1", score=1.0)], options=explain)
    for _ in range(2):
        _assert_refused(stub, packed, "options.explain does not apply to packed_candidates")
        assert stub.Rerank(messages, timeout=5).items[0].HasField("explanation")
    bad = pb.RerankRequest(user_id="u", candidates=[pb.Candidate(item_id="1", score=1.0)],
                           options=pb.RerankOptions(blend_weight=1.5))
    for _ in range(2):
        _assert_refused(stub, bad, "options.blend_weight must be in [0, 1], got 1.5")
    for k in range(1100):  # more option sets than the process remembers
        weight = pb.RerankOptions(blend_weight=k / 1100, packed_item_ids=k % 2 == 0)
        request = pb.RerankRequest(user_id="u", packed_candidates=packed_candidates([1, 2], [1.0, 2.0]), options=weight)
        ids = np.frombuffer(stub.Rerank(request, timeout=5).packed_items.item_ids, "<i8")
        assert sorted(ids.tolist()) == ([1, 2] if k % 2 == 0 else [])


def test_packed_bytes_are_little_endian_whatever_the_host() -> None:
    packed = packed_candidates(np.array([1, 2**40], dtype=">i8"), np.array([0.5, -1.0], dtype=">f4"))
    assert packed.item_ids == (1).to_bytes(8, "little") + (2**40).to_bytes(8, "little")
    assert np.frombuffer(packed.scores, "<f4").tolist() == [0.5, -1.0]


# --- the item cache's integer key space --------------------------------------------------------------
_op = st.tuples(st.sampled_from(["put", "lookup"]), st.lists(st.integers(-5, 40), min_size=1, max_size=12))


@hsettings(max_examples=80, deadline=None)
@given(st.lists(_op, max_size=30), st.integers(4, 24))
def test_integer_lookups_equal_string_lookups_through_puts_and_evictions(ops, capacity) -> None:  # type: ignore[no-untyped-def]
    cache = ItemVectorCache(capacity, dim=4, initial_rows=2)
    rng = np.random.default_rng(0)
    for kind, keys in ops:
        ids = [str(k) for k in keys]
        if kind == "put":
            cache.put(ids, [f"text {k}" for k in keys], rng.random((len(keys), 4)).astype(np.float32))
            continue
        by_string, hit_s = cache.lookup(ids, [None] * len(ids))
        by_int, hit_i = cache.lookup(DecimalIds(keys), [None] * len(ids))
        np.testing.assert_array_equal(hit_i, hit_s)
        np.testing.assert_array_equal(by_int, by_string)
    # The integer index holds exactly the cached decimal ids.
    keys, rows = cache._row_of_int.items()
    assert {str(k): r for k, r in zip(keys.tolist(), rows.tolist())} == {
        item_id: int.from_bytes(row, "little") for item_id, row in cache._row_of.items()
    }


def test_client_rerank_packed_returns_arrays_and_fails_open(make_server: ServerFactory) -> None:
    running, stub = make_server()
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=str(k), text=TEXTS[k]) for k in range(5)]))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "2")]))
    ids, scores = np.array([0, 1, 2, 3, 1]), np.array([0.9, 0.8, 0.1, 0.6, 0.5])
    with RerankerClient(f"127.0.0.1:{running.port}", timeout_s=5.0) as client:
        ranking = client.rerank_packed("u", ids, scores, top_k=3, with_item_ids=True)
    assert ranking.reranked and ranking.item_ids is not None
    assert ranking.item_ids.tolist() == ids[ranking.positions].tolist()
    assert len(ranking.positions) == 3 and ranking.item_ids[0] in (0, 2)  # "space war epic" / "space station drama"
    with RerankerClient("127.0.0.1:1", timeout_s=0.2, retries=0) as dead:
        fallback = dead.rerank_packed("u", ids, scores, top_k=3)
        assert (fallback.variant, fallback.reason) == ("error", "UNAVAILABLE")
        assert fallback.positions.tolist() == [0, 1, 2] and fallback.item_ids.tolist() == [0, 1, 2]  # type: ignore[union-attr]
        with pytest.raises(grpc.RpcError):
            dead.rerank_packed("u", ids, scores, fail_open=False)
