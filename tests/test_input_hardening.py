"""Issue 6: generated and adversarial requests against a real server process.

Every answer must be a valid reordering of the request's candidates, or a clear INVALID_ARGUMENT /
RESOURCE_EXHAUSTED with a message; the server process must stay alive and its memory bounded.
The server runs as a child process (`python -m reranker serve --encoder fake`) so that a crash or
a memory blow-up shows as exactly that, not as a failure of the test process.

RERANKER_FUZZ_EXAMPLES=<n> raises the number of generated examples per property (default 150).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reranker.tools.harness import ServerProcess
from reranker.tools.loadtest import check_reordering
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc
from tests.conftest import REPO

EXAMPLES = int(os.environ.get("RERANKER_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
REJECTED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
# The fuzzed server may grow this much resident memory over the whole module (caches start empty;
# every accepted request can add a few item vectors and profiles of 32 floats).
RSS_BOUND_MB = 150
SERVICE = "/reranker.v1.RerankerService/"
METHODS = {
    "Rerank": (pb.RerankRequest, pb.RerankResponse),
    "RecordEvents": (pb.RecordEventsRequest, pb.RecordEventsResponse),
    "UpsertItems": (pb.UpsertItemsRequest, pb.UpsertItemsResponse),
    "GetUserProfile": (pb.GetUserProfileRequest, pb.GetUserProfileResponse),
}


class Fuzzed:
    """The server process, a channel to it, and counts of what was sent and how it was answered."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(
            server.target, options=[("grpc.max_send_message_length", 64 * 2**20)]
        )
        self.stub = pb_grpc.RerankerServiceStub(self.channel)
        self.sent: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()

    def raw(self, method: str) -> grpc.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)

    def expect_ok_or_rejected(self, kind: str, call: object) -> object | None:
        """Run `call()`; returns the response, or None for a clear rejection. Anything else fails."""
        self.sent[kind] += 1
        try:
            response = call()  # type: ignore[operator]
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            self.answers[code.name] += 1
            assert code in REJECTED, f"{kind}: {code} {exc.details()}"  # type: ignore[attr-defined]
            assert exc.details(), f"{kind}: {code} without a message"  # type: ignore[attr-defined]
            return None
        self.answers["OK"] += 1
        return response


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    args = ["--encoder", "fake", "--fake-dim", "32", "--max-workers", "4", "--metrics-address="]
    with ServerProcess(args, env={"PYTHONPATH": str(REPO)}) as server:
        server.wait_serving(60)
        target = Fuzzed(server)
        rss_start = server.rss()
        yield target
        target.channel.close()
        alive = server.proc.poll() is None
        status = server.health()
        rss_end = server.rss()
        growth = None if rss_start is None or rss_end is None else (rss_end - rss_start) / 2**20
        print(
            f"\n[fuzz] inputs sent: {sum(target.sent.values())} {dict(target.sent)}; answers: {dict(target.answers)}; "
            f"server alive={alive}; rss {rss_start and rss_start / 2**20:.1f} -> {rss_end and rss_end / 2**20:.1f} MiB"
        )
        assert alive, f"server died\n{server.log}"
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert "Traceback" not in server.log, server.log
        if growth is not None:
            assert growth < RSS_BOUND_MB, f"server RSS grew {growth:.1f} MiB"


# --- strategies -------------------------------------------------------------------------------------
TEXT = st.text(st.characters(codec="utf-8"), max_size=24)
ADVERSARIAL_IDS = st.sampled_from(
    ["", " ", "\x00", "../../etc/passwd", "/etc/shadow", "file:///etc/passwd", "C:\\boot.ini", "%s%n", "x" * 257, "é" * 256]
)
IDS = st.one_of(TEXT, ADVERSARIAL_IDS, st.sampled_from(["a", "b", "c"]))  # small pool -> duplicates
SCORES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0]),
)
ITEM_TEXTS = st.one_of(st.none(), TEXT, st.just("word " * 1000), st.just("y" * 4001))
EVENT_TYPES = st.one_of(st.sampled_from(list(pb.EventType.values())), st.integers(-(2**31), 2**31 - 1))
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def events(draw: st.DrawFn, user_ids: st.SearchStrategy[str] = IDS) -> pb.Event:
    e = pb.Event(event_id=draw(TEXT), user_id=draw(user_ids), item_id=draw(IDS), type=draw(EVENT_TYPES))
    if draw(st.booleans()):
        e.timestamp.seconds = draw(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 253_402_300_800))
        e.timestamp.nanos = draw(st.integers(-(2**31), 2**31 - 1) | st.integers(0, 999_999_999))
    text = draw(ITEM_TEXTS)
    if text is not None:
        e.text = text
    if draw(st.booleans()):
        e.weight = draw(FLOAT32)
    return e


@st.composite
def rerank_requests(draw: st.DrawFn) -> pb.RerankRequest:
    user_id = draw(IDS)
    req = pb.RerankRequest(
        user_id=user_id,
        top_k=draw(st.integers(0, 2**32 - 1) | st.integers(0, 5)),
        experiment=draw(TEXT | ADVERSARIAL_IDS),
        request_id=draw(TEXT | ADVERSARIAL_IDS),
    )
    for _ in range(draw(st.integers(0, 25))):
        c = req.candidates.add(item_id=draw(IDS), score=draw(SCORES))
        text = draw(ITEM_TEXTS)
        if text is not None:
            c.text = text
    if draw(st.booleans()):
        req.candidates.extend(list(req.candidates))  # every id duplicated
    form = draw(st.sampled_from(["messages", "columns", "both", "ragged columns"]))
    if form != "messages":
        _to_columns(req, keep_messages=form == "both")
        if form == "ragged columns":  # columns of different lengths
            req.candidate_columns.scores.append(draw(SCORES))
    same_user = st.one_of(st.just(user_id), st.just(""), IDS)
    req.context_events.extend(draw(st.lists(events(same_user), max_size=4)))
    if draw(st.booleans()):
        req.options.blend_weight = draw(FLOAT32)
    if draw(st.booleans()):
        req.options.diversity = draw(FLOAT32)
    req.options.bypass = draw(st.booleans())
    req.options.explain = draw(st.booleans())
    req.options.columns = draw(st.booleans())  # with explain: a clear rejection
    return req


@st.composite
def valid_rerank_requests(draw: st.DrawFn) -> pb.RerankRequest:
    """Requests that are valid but extreme: they must be answered with a personalized order."""
    ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
    user_id = draw(ids)
    req = pb.RerankRequest(user_id=user_id, top_k=draw(st.integers(0, 40)))
    finite = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1e308, -1e308, 0.0, 5e-324])
    for _ in range(draw(st.integers(1, 30))):
        c = req.candidates.add(item_id=draw(ids | st.sampled_from(["a", "b"])), score=draw(finite))
        text = draw(st.none() | st.text(st.characters(codec="utf-8"), max_size=60))
        if text is not None:
            c.text = text
    for _ in range(draw(st.integers(0, 3))):
        e = req.context_events.add(user_id=user_id, item_id=draw(ids), type=draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7])))
        e.text = draw(st.text(max_size=30))
        if draw(st.booleans()):  # within max_event_weight (6 with the default event weights)
            e.weight = draw(st.floats(-6.0, 6.0, width=32))
        if draw(st.booleans()):  # up to server time (later ones are refused, see test_event_hygiene.py)
            e.timestamp.seconds = draw(st.integers(1, 1_750_000_000))
    if draw(st.booleans()):
        req.options.blend_weight = draw(st.floats(0, 1, width=32))
    if draw(st.booleans()):
        req.options.diversity = draw(st.floats(0, 1, width=32))
    req.options.explain = draw(st.booleans())
    req.options.columns = not req.options.explain and draw(st.booleans())
    if draw(st.booleans()):
        _to_columns(req, keep_messages=False)
    return req


def _to_columns(req: pb.RerankRequest, *, keep_messages: bool) -> None:
    """Move (or copy) the request's candidates into candidate_columns."""
    cands = list(req.candidates)
    req.candidate_columns.SetInParent()
    req.candidate_columns.item_ids.extend(c.item_id for c in cands)
    req.candidate_columns.scores.extend(c.score for c in cands)
    if any(c.HasField("text") for c in cands):
        req.candidate_columns.texts.extend(c.text for c in cands)
    if not keep_messages:
        del req.candidates[:]


def _assert_sane_rerank(req: pb.RerankRequest, resp: pb.RerankResponse) -> None:
    problem = check_reordering(req, resp)
    assert problem is None, problem
    for it in resp.items:
        assert math.isfinite(it.score) and math.isfinite(it.semantic_score) and math.isfinite(it.upstream_score), it
    columns = resp.item_columns
    assert req.options.columns == resp.HasField("item_columns")
    assert all(map(math.isfinite, [*columns.scores, *columns.semantic_scores, *columns.upstream_scores]))
    if resp.variant == pb.VARIANT_FALLBACK:
        # Fail-open for these inputs would mean an internal error, not a model problem.
        assert resp.fallback_reason != pb.FALLBACK_REASON_INTERNAL, resp.fallback_detail


# --- properties -------------------------------------------------------------------------------------
@FUZZ
@given(req=rerank_requests())
def test_arbitrary_rerank_requests_get_a_valid_reordering_or_a_clear_rejection(fuzzed: Fuzzed, req: pb.RerankRequest) -> None:
    resp = fuzzed.expect_ok_or_rejected("rerank", lambda: fuzzed.stub.Rerank(req, timeout=10))
    if resp is not None:
        _assert_sane_rerank(req, resp)  # type: ignore[arg-type]


@FUZZ
@given(req=valid_rerank_requests())
def test_valid_but_extreme_rerank_requests_are_personalized(fuzzed: Fuzzed, req: pb.RerankRequest) -> None:
    fuzzed.sent["rerank-valid"] += 1
    resp = fuzzed.stub.Rerank(req, timeout=10)
    fuzzed.answers["OK"] += 1
    _assert_sane_rerank(req, resp)
    assert resp.variant == pb.VARIANT_RERANKED, (resp.variant, resp.fallback_detail)


@FUZZ
@given(evs=st.lists(events(), max_size=6), items=st.lists(st.tuples(IDS, TEXT | ADVERSARIAL_IDS), max_size=6), user=IDS)
def test_arbitrary_writes_and_profile_reads_are_answered_or_rejected(
    fuzzed: Fuzzed, evs: list[pb.Event], items: list[tuple[str, str]], user: str
) -> None:
    fuzzed.expect_ok_or_rejected("record", lambda: fuzzed.stub.RecordEvents(pb.RecordEventsRequest(events=evs), timeout=10))
    fuzzed.expect_ok_or_rejected("stream", lambda: fuzzed.stub.StreamEvents(iter(evs), timeout=10))
    upsert = pb.UpsertItemsRequest(items=[pb.Item(item_id=i, text=t) for i, t in items])
    fuzzed.expect_ok_or_rejected("upsert", lambda: fuzzed.stub.UpsertItems(upsert, timeout=10))
    profile = fuzzed.expect_ok_or_rejected(
        "profile", lambda: fuzzed.stub.GetUserProfile(pb.GetUserProfileRequest(user_id=user, include_vector=True), timeout=10)
    )
    if profile is not None:
        assert all(math.isfinite(x) for x in profile.vector)  # type: ignore[attr-defined]


@st.composite
def corrupted_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    """A serialized request of some method with bytes flipped, inserted, cut, or invalid UTF-8 spliced in."""
    method = draw(st.sampled_from(sorted(METHODS)))
    seed = {
        "Rerank": draw(rerank_requests()),
        "RecordEvents": pb.RecordEventsRequest(events=draw(st.lists(events(), min_size=1, max_size=3))),
        "UpsertItems": pb.UpsertItemsRequest(items=[pb.Item(item_id="item", text="some text")]),
        "GetUserProfile": pb.GetUserProfileRequest(user_id=draw(TEXT)),
    }[method].SerializeToString()
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "cut", "utf8", "junk"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(pos, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "cut":
            del data[pos:]
        elif op == "utf8":
            data[pos:pos] = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
        else:
            data = bytearray(draw(st.binary(max_size=64)))
    return method, bytes(data)


@FUZZ
@given(case=corrupted_bytes())
def test_corrupted_request_bytes_never_get_an_internal_error(fuzzed: Fuzzed, case: tuple[str, bytes]) -> None:
    method, data = case
    response_type = METHODS[method][1]
    raw = fuzzed.expect_ok_or_rejected("raw-" + method, lambda: fuzzed.raw(method)(data, timeout=10))
    if raw is not None:
        response_type.FromString(raw)  # a real answer parses


# --- fixed adversarial cases ----------------------------------------------------------------------------
def test_invalid_utf8_in_candidate_text_is_invalid_argument(fuzzed: Fuzzed) -> None:
    req = pb.RerankRequest(user_id="u", candidates=[pb.Candidate(item_id="i", score=1.0, text="TEXT")])
    data = req.SerializeToString().replace(b"TEXT", b"T\xffXT")
    with pytest.raises(grpc.RpcError) as info:
        fuzzed.raw("Rerank")(data, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad UTF-8" in info.value.details() and "RerankRequest" in info.value.details()


def test_invalid_utf8_in_a_streamed_event_names_the_message(fuzzed: Fuzzed) -> None:
    good = pb.Event(user_id="u", item_id="ITEM").SerializeToString()
    stream = fuzzed.channel.stream_unary(SERVICE + "StreamEvents", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        stream(iter([good, good.replace(b"ITEM", b"IT\xc3\x28M")]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("stream message 1 ")


def test_deeply_nested_wire_data_is_invalid_argument(fuzzed: Fuzzed) -> None:
    # 100k nested start-group tags of an unknown field: a parser-recursion attack.
    with pytest.raises(grpc.RpcError) as info:
        fuzzed.raw("Rerank")(b"\xfb\x06" * 100_000, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_100k_candidates_are_refused_with_the_limit_named(fuzzed: Fuzzed) -> None:
    req = pb.RerankRequest(user_id="u", candidates=[pb.Candidate(item_id=f"i{i}", score=i) for i in range(100_000)])
    with pytest.raises(grpc.RpcError) as info:
        fuzzed.stub.Rerank(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_candidates" in info.value.details()


def test_a_message_above_the_size_limit_is_resource_exhausted(fuzzed: Fuzzed) -> None:
    text = "w " * 2000
    req = pb.RerankRequest(user_id="u", candidates=[pb.Candidate(item_id=f"i{i}", score=1, text=text) for i in range(5000)])
    assert req.ByteSize() > 16 * 2**20
    with pytest.raises(grpc.RpcError) as info:
        fuzzed.stub.Rerank(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()


def test_100k_events_in_one_request_are_refused(fuzzed: Fuzzed) -> None:
    evs = [pb.Event(user_id="u", item_id=f"i{i}") for i in range(100_000)]
    for call in (
        lambda: fuzzed.stub.RecordEvents(pb.RecordEventsRequest(events=evs), timeout=30),
        lambda: fuzzed.stub.Rerank(pb.RerankRequest(user_id="u", candidates=[pb.Candidate(item_id="a")], context_events=evs), timeout=30),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_events_per_request" in info.value.details()


def test_a_long_event_stream_is_applied_in_bounded_chunks(fuzzed: Fuzzed) -> None:
    n = 20_000
    evs = (pb.Event(user_id=f"stream-user-{i % 50}", item_id=f"i{i % 300}", event_id=f"s{i}") for i in range(n))
    resp = fuzzed.stub.StreamEvents(evs, timeout=120)
    assert resp.accepted == n and resp.duplicates == 0


def test_unknown_enum_values_are_invalid_argument(fuzzed: Fuzzed) -> None:
    ev = pb.Event(user_id="u", item_id="i", type=42)
    with pytest.raises(grpc.RpcError) as info:
        fuzzed.stub.RecordEvents(pb.RecordEventsRequest(events=[ev]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[0].type 42 is not a known EventType" in info.value.details()


@pytest.mark.parametrize("seconds,nanos", [(253_402_300_800, 0), (2**62, 0), (10, -1), (10, 10**9), (-5, 0)])
def test_out_of_range_timestamps_are_invalid_argument(fuzzed: Fuzzed, seconds: int, nanos: int) -> None:
    ev = pb.Event(user_id="u", item_id="i")
    ev.timestamp.seconds, ev.timestamp.nanos = seconds, nanos
    with pytest.raises(grpc.RpcError) as info:
        fuzzed.stub.RecordEvents(pb.RecordEventsRequest(events=[ev]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[0].timestamp" in info.value.details()


def test_extreme_upstream_scores_keep_their_order_and_finite_scores(fuzzed: Fuzzed) -> None:
    req = pb.RerankRequest(
        user_id="extreme-user",
        candidates=[pb.Candidate(item_id="hi", score=1e308), pb.Candidate(item_id="mid", score=0.0), pb.Candidate(item_id="lo", score=-1e308)],
        options=pb.RerankOptions(blend_weight=0.0),
    )
    resp = fuzzed.stub.Rerank(req, timeout=10)
    assert [it.item_id for it in resp.items] == ["hi", "mid", "lo"]
    assert all(math.isfinite(it.score) for it in resp.items), [it.score for it in resp.items]
