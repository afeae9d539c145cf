"""Protobuf <-> plain types, with validation. Every error message names the offending field."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from reranker.serving import responsewire, wire
from reranker.config import LimitsSettings, UserModelSettings
from reranker.errors import InvalidRequest
from reranker.users.eventpolicy import EventLimits, check_id, check_text, checked_event
from reranker.types import (
    CandidateColumns,
    DecimalIds,
    Event,
    Explanation,
    Item,
    RankedItems,
    RecordResult,
    RerankOptions,
    RerankQuery,
    RerankResult,
    UpsertResult,
    UserProfileView,
)
from reranker.v1 import reranker_pb2 as pb


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits(EventLimits):
    """A request's limits: the event limits (eventpolicy.EventLimits, shared with the stream
    consumer) plus the request-level counts."""

    max_candidates: int
    max_events: int

    @classmethod
    def from_settings(cls, s: LimitsSettings, users: UserModelSettings) -> Limits:
        """The request limits, and the event limits of the users section."""
        return cls(max_id_chars=s.max_id_chars, max_text_chars=s.max_text_chars, max_event_weight=users.event_weight_limit(),
                   max_event_skew=users.max_event_skew_seconds, max_candidates=s.max_candidates,
                   max_events=s.max_events_per_request)


def _check_count(count: int, limit: int, name: str, setting: str) -> None:
    if count > limit:
        raise InvalidRequest(f"{name} has {count} entries; the limit is {limit} (setting {setting})")


def _check_fraction(value: float, name: str) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise InvalidRequest(f"{name} must be in [0, 1], got {value}")
    return value


def event_from_pb(msg: pb.Event, name: str, limits: Limits, default_user: str = "", now: float | None = None) -> Event:
    """An Event, validated by eventpolicy.checked_event (the stream consumer's check too); with `now`
    (server time) its timestamp is checked against max_event_skew."""
    user_id = msg.user_id or default_user
    if default_user and user_id != default_user:
        raise InvalidRequest(f"{name}.user_id {user_id!r} differs from the request's user_id")
    timestamp = None
    if msg.HasField("timestamp"):
        seconds, nanos = msg.timestamp.seconds, msg.timestamp.nanos
        if not 0 <= nanos < 1_000_000_000:
            raise InvalidRequest(f"{name}.timestamp.nanos must be in [0, 999999999], got {nanos}")
        timestamp = seconds + nanos / 1e9
    return checked_event(
        user_id, msg.item_id, msg.type, timestamp, msg.event_id, msg.text if msg.HasField("text") else None,
        msg.weight if msg.HasField("weight") else None, name=name, limits=limits, now=now,
    )


def events_from_pb(msgs: Sequence[pb.Event], field: str, limits: Limits, default_user: str = "",
                   now: float | None = None) -> tuple[Event, ...]:
    if not msgs:
        return ()
    _check_count(len(msgs), limits.max_events, field, "max_events_per_request")
    return tuple(event_from_pb(m, f"{field}[{i}]", limits, default_user, now) for i, m in enumerate(msgs))


def candidates_from_pb(msgs: Sequence[pb.Candidate], limits: Limits) -> CandidateColumns:
    """Candidates as columns, validated with array operations (one pass over the messages)."""
    n = len(msgs)
    if n == 0:
        raise InvalidRequest("candidates must not be empty")
    _check_count(n, limits.max_candidates, "candidates", "max_candidates")
    item_ids: list[str] = []
    scores: list[float] = []
    texts: list[str | None] = []
    add_id, add_score, add_text = item_ids.append, scores.append, texts.append
    for c in msgs:
        add_id(c.item_id)
        add_score(c.score)
        add_text(c.text)
    score_array = np.asarray(scores, dtype=np.float64)
    text_lengths = _validated_columns(
        item_ids, score_array, texts, limits,  # type: ignore[arg-type]
        ("candidates[{}].item_id", "candidates[{}].score", "candidates[{}].text"),
    )
    # proto3 `optional`: an empty string may be unset (no text) or set to "" (encode "").
    for i in np.flatnonzero(text_lengths == 0).tolist():
        if not msgs[i].HasField("text"):
            texts[i] = None
    return CandidateColumns(item_ids, score_array, texts)


def candidates_from_columns(msg: pb.CandidateColumns, limits: Limits) -> CandidateColumns:
    """CandidateColumns message -> columns: three repeated fields read as whole lists (C), no
    message per candidate. An empty text means "no text". The string columns are read as slices
    (`[:]`, one C loop in protobuf) rather than list(): 50k fewer instructions each at 500."""
    item_ids = msg.item_ids[:]
    n = len(item_ids)
    if n == 0:
        raise InvalidRequest("candidate_columns.item_ids must not be empty")
    _check_count(n, limits.max_candidates, "candidate_columns.item_ids", "max_candidates")
    scores = np.array(msg.scores, dtype=np.float64)
    if scores.shape[0] != n:
        raise InvalidRequest(f"candidate_columns.scores has {scores.shape[0]} values for {n} item_ids")
    given_texts = msg.texts[:]
    if given_texts and len(given_texts) != n:
        raise InvalidRequest(
            f"candidate_columns.texts has {len(given_texts)} values for {n} item_ids (give none or one each)"
        )
    texts: list[str | None] = given_texts or [""] * n  # type: ignore[assignment]
    text_lengths = _validated_columns(
        item_ids, scores, texts, limits,  # type: ignore[arg-type]
        ("candidate_columns.item_ids[{}]", "candidate_columns.scores[{}]", "candidate_columns.texts[{}]"),
    )
    if not given_texts:
        return CandidateColumns(item_ids, scores, [None] * n)
    if not text_lengths.all():
        for i in (text_lengths == 0).nonzero()[0].tolist():
            texts[i] = None
    return CandidateColumns(item_ids, scores, texts)


def _packed_array(data: bytes, dtype: np.dtype, name: str, kind: str) -> np.ndarray:
    if len(data) % dtype.itemsize:
        raise InvalidRequest(
            f"{name} is {len(data)} bytes, not a multiple of {dtype.itemsize} ({kind}, little-endian)"
        )
    return np.frombuffer(data, dtype=dtype)


def candidates_from_packed(msg: pb.PackedCandidates, limits: Limits) -> CandidateColumns:
    """PackedCandidates -> columns: ids and scores read in place with numpy.frombuffer (no Python
    object per candidate); the ids stay integers (DecimalIds). An empty text means "no text"."""
    ids = _packed_array(msg.item_ids, responsewire.PACKED_ID, "packed_candidates.item_ids", "int64")
    n = ids.shape[0]
    if n == 0:
        raise InvalidRequest("packed_candidates.item_ids must not be empty")
    _check_count(n, limits.max_candidates, "packed_candidates.item_ids", "max_candidates")
    given = _packed_array(msg.scores, responsewire.PACKED_SCORE, "packed_candidates.scores", "float32")
    if given.shape[0] != n:
        raise InvalidRequest(f"packed_candidates.scores has {given.shape[0]} values for {n} item_ids")
    scores = given.astype(np.float64)
    # One dot product checks them all: squares of float32 values summed in float64 cannot overflow
    # and cannot cancel, so the sum is finite exactly when every score is (and it raises no
    # floating-point warning on inf or nan, as inf + -inf in a plain sum would).
    if not math.isfinite(scores.dot(scores)):
        i = int(np.argmin(np.isfinite(given)))
        raise InvalidRequest(f"packed_candidates.scores[{i}] must be finite, got {given[i]}")
    texts: list[str | None]
    if msg.texts:
        texts = list(msg.texts)
        if len(texts) != n:
            raise InvalidRequest(
                f"packed_candidates.texts has {len(texts)} values for {n} item_ids (give none or one each)"
            )
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n)
        too_long = lengths > limits.max_text_chars
        if too_long.any():
            i = int(np.argmax(too_long))
            check_text(texts[i], f"packed_candidates.texts[{i}]", limits.max_text_chars)
        for i in np.flatnonzero(lengths == 0).tolist():
            texts[i] = None
    else:
        texts = [None] * n
    return CandidateColumns.unchecked(DecimalIds.of_int64(ids), scores, texts)


def _validated_columns(
    item_ids: list[str], scores: np.ndarray, texts: list[str], limits: Limits, names: tuple[str, str, str]
) -> np.ndarray:
    """Check ids, scores and texts with array operations; the error names the first offending
    candidate, its fields in declaration order (`names`: id, score, text field name patterns).
    Returns the text lengths."""
    n = len(item_ids)
    lengths = wire.str_lengths(item_ids + texts)  # one pass over both columns
    id_lengths, text_lengths = lengths[:n], lengths[n:]
    if (id_lengths.min() > 0 and id_lengths.max() <= limits.max_id_chars
            and text_lengths.max() <= limits.max_text_chars and np.isfinite(scores).all()):
        return text_lengths  # the common case: all valid, no per-candidate detail
    bad = (id_lengths == 0) | (id_lengths > limits.max_id_chars) | ~np.isfinite(scores)
    bad |= text_lengths > limits.max_text_chars
    if bad.any():
        i = int(np.argmax(bad))
        id_name, score_name, text_name = (name.format(i) for name in names)
        check_id(item_ids[i], id_name, limits.max_id_chars)
        if not math.isfinite(scores[i]):
            raise InvalidRequest(f"{score_name} must be finite, got {scores[i]}")
        check_text(texts[i], text_name, limits.max_text_chars)
    return text_lengths


def candidate_count(req: pb.RerankRequest) -> int:
    """Candidates in a request, in whichever form it sent them."""
    return (
        len(req.candidates)
        or len(req.candidate_columns.item_ids)
        or len(req.packed_candidates.item_ids) // responsewire.PACKED_ID.itemsize
    )


class ResponseForm(NamedTuple):
    """How a Rerank answer goes on the wire: the edge's choice, kept beside the query (the domain
    sees plain arrays). A NamedTuple: built once per request, it costs one C call."""

    columns: bool = False  # item columns instead of one item message each
    packed: bool = False  # the request came packed: packed items
    packed_item_ids: bool = False  # the packed answer carries the ids too
    packed_score_details: bool = False  # the packed answer carries semantic and upstream scores


def rerank_request(req: pb.RerankRequest, limits: Limits, now: float | None = None) -> tuple[RerankQuery, ResponseForm]:
    """The query, and the form its answer takes."""
    user_id = check_id(req.user_id, "user_id", limits.max_id_chars)
    packed = req.HasField("packed_candidates")
    columns = req.HasField("candidate_columns")
    if columns + packed + (len(req.candidates) > 0) > 1:
        raise InvalidRequest("set one of candidates, candidate_columns and packed_candidates")
    if packed:
        candidates = candidates_from_packed(req.packed_candidates, limits)
    elif columns:
        candidates = candidates_from_columns(req.candidate_columns, limits)
    else:
        candidates = candidates_from_pb(req.candidates, limits)
    options, form = _options(req.options, packed)
    if len(req.experiment) > limits.max_id_chars or len(req.request_id) > limits.max_id_chars:
        raise InvalidRequest(f"experiment and request_id are limited to {limits.max_id_chars} characters")
    events = req.context_events
    query = RerankQuery(
        user_id=user_id,
        candidates=candidates,
        context_events=events_from_pb(events, "context_events", limits, default_user=user_id, now=now) if events else (),
        top_k=req.top_k,
        options=options,
        experiment=req.experiment,
        request_id=req.request_id,
    )
    return query, form


# Validated options per (packed, RerankOptions bytes). Callers send one of a few option sets (most
# none at all): each is checked and built once per process, then found by one serialization of a
# message of a few bytes. Bounded: emptied when full.
_OPTIONS: dict[tuple[bool, bytes], tuple[RerankOptions, ResponseForm]] = {}
_OPTIONS_LIMIT = 1024


def _options(opts: pb.RerankOptions, packed: bool) -> tuple[RerankOptions, ResponseForm]:
    """The request's options, validated (frozen: shared by the requests that send the same), and the
    answer's form."""
    key = (packed, opts.SerializeToString())
    found = _OPTIONS.get(key)
    if found is None:
        found = _validated_options(opts, packed)
        if len(_OPTIONS) >= _OPTIONS_LIMIT:
            _OPTIONS.clear()
        _OPTIONS[key] = found
    return found


def _validated_options(opts: pb.RerankOptions, packed: bool) -> tuple[RerankOptions, ResponseForm]:
    options = RerankOptions(
        blend_weight=_check_fraction(opts.blend_weight, "options.blend_weight") if opts.HasField("blend_weight") else None,
        diversity=_check_fraction(opts.diversity, "options.diversity") if opts.HasField("diversity") else None,
        bypass=opts.bypass,
        explain=opts.explain,
        consumed=_consumed_policy(opts.consumed),
    )
    form = ResponseForm(opts.columns, packed, opts.packed_item_ids, opts.packed_score_details)
    if form.columns and options.explain:
        raise InvalidRequest("options.columns answers without explanations: unset explain or columns")
    if packed and (form.columns or options.explain):
        name = "options.columns" if form.columns else "options.explain"
        raise InvalidRequest(f"{name} does not apply to packed_candidates (the answer is packed_items)")
    return options, form


def _consumed_policy(value: int) -> str | None:
    if value == pb.CONSUMED_POLICY_UNSPECIFIED:
        return None
    try:
        return pb.ConsumedPolicy.Name(value).removeprefix("CONSUMED_POLICY_").lower()
    except ValueError:
        raise InvalidRequest(f"options.consumed: unknown policy {value}") from None


def items_from_pb(req: pb.UpsertItemsRequest, limits: Limits) -> tuple[Item, ...]:
    if not req.items:
        raise InvalidRequest("items must not be empty")
    _check_count(len(req.items), limits.max_events, "items", "max_events_per_request")
    return tuple(
        Item(check_id(it.item_id, f"items[{i}].item_id", limits.max_id_chars),
             check_text(it.text, f"items[{i}].text", limits.max_text_chars))
        for i, it in enumerate(req.items)
    )


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def event_to_pb(event: Event) -> pb.Event:
    msg = pb.Event(event_id=event.event_id, user_id=event.user_id, item_id=event.item_id, type=int(event.type))
    if event.timestamp > 0:
        msg.timestamp.CopyFrom(_timestamp(event.timestamp))
    if event.text is not None:
        msg.text = event.text
    if event.weight is not None:
        msg.weight = event.weight
    return msg


def _explanation_pb(e: Explanation) -> pb.Explanation:
    return pb.Explanation(
        nearest_history_item_id=e.nearest_history_item_id,
        nearest_history_similarity=e.nearest_history_similarity,
        has_vector=e.has_vector,
        summary=e.summary,
    )


def _response_header(result: RerankResult) -> pb.RerankResponse:
    """Every RerankResponse field but `items`."""
    t = result.timing
    return pb.RerankResponse(
        variant=int(result.variant),
        fallback_reason=int(result.fallback_reason),
        fallback_detail=result.fallback_detail,
        model_version=result.model_version,
        request_id=result.request_id,
        cold_user=result.cold_user,
        timing=pb.Timing(total_ms=t.total_ms, encode_ms=t.encode_ms, score_ms=t.score_ms),
        cache_hits=result.cache_hits,
        encoded=result.encoded,
        without_vector=result.without_vector,
        bucket=result.bucket,
        arm=result.arm,
        consumed_candidates=result.consumed_candidates,
        consumed_dropped=result.consumed_dropped,
    )


def rerank_response(result: RerankResult) -> pb.RerankResponse:
    msg = _response_header(result)
    items = RankedItems.of(result.items)
    if items.explanations is None:
        # The repeated field in wire format, merged into the message in one parse.
        msg.MergeFromString(wire.encode_ranked_items(items))
        return msg
    for it in items:
        scored = msg.items.add(
            item_id=it.item_id,
            score=it.score,
            semantic_score=it.semantic_score,
            upstream_score=it.upstream_score,
            original_rank=it.original_rank,
        )
        if it.explanation is not None:
            scored.explanation.CopyFrom(_explanation_pb(it.explanation))
    return msg


@dataclass(slots=True)  # not frozen: built per request (see types.RerankQuery)
class EncodedRerankResponse:
    """A serialized RerankResponse and the result it encodes (read by observability.Observer)."""

    data: bytes
    result: RerankResult


def encode_rerank_response(
    result: RerankResult, columns: bool = False, packed: ResponseForm | None = None
) -> EncodedRerankResponse:
    """The RerankResponse bytes, without building a message per item when there are no explanations:
    the header (responsewire) followed by the `items` field (protobuf merges fields in any order), or
    with `columns`, the header with `item_columns` (whole columns, no message per item), or with
    `packed` (the form of a packed request), the header with `packed_items`."""
    items = RankedItems.of(result.items)
    if packed is not None:
        data = responsewire.header(
            result, responsewire.packed_items(items, packed.packed_item_ids, packed.packed_score_details)
        )
    elif columns:
        data = responsewire.header(result) + wire.encode_item_columns(items)
    elif items.explanations is None:
        data = responsewire.header(result) + wire.encode_ranked_items(items)
    else:
        data = rerank_response(result).SerializeToString()
    return EncodedRerankResponse(data, result)


def serialize_rerank_response(response: EncodedRerankResponse | pb.RerankResponse) -> bytes:
    """gRPC response serializer of Rerank."""
    if isinstance(response, EncodedRerankResponse):
        return response.data
    return response.SerializeToString()


def record_response(result: RecordResult) -> pb.RecordEventsResponse:
    return pb.RecordEventsResponse(
        accepted=result.accepted, duplicates=result.duplicates, without_vector=result.without_vector
    )


def upsert_response(result: UpsertResult) -> pb.UpsertItemsResponse:
    return pb.UpsertItemsResponse(upserted=result.upserted, encoded=result.encoded)


def profile_response(view: UserProfileView) -> pb.GetUserProfileResponse:
    msg = pb.GetUserProfileResponse(
        user_id=view.user_id,
        found=view.found,
        event_count=view.event_count,
        recent_events=[event_to_pb(e) for e in view.recent_events],
        vector=list(view.vector),
    )
    if view.updated_at > 0:
        msg.updated_at.CopyFrom(_timestamp(view.updated_at))
    return msg


def chunked(events: Iterable[pb.Event], size: int) -> Iterable[list[pb.Event]]:
    """Group a stream of events into lists of at most `size` (for StreamEvents)."""
    batch: list[pb.Event] = []
    for event in events:
        batch.append(event)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
