"""Protobuf <-> plain types, with validation. Every error message names the offending field."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from reranker.config import Settings
from reranker.errors import InvalidRequest
from reranker.types import (
    Candidate,
    Event,
    EventType,
    Item,
    RecordResult,
    RerankOptions,
    RerankQuery,
    RerankResult,
    UpsertResult,
    UserProfileView,
)
from reranker.v1 import reranker_pb2 as pb

_EVENT_TYPES = frozenset(int(t) for t in EventType)
# google.protobuf.Timestamp's valid range ends at 9999-12-31T23:59:59Z.
_MAX_TIMESTAMP_SECONDS = 253_402_300_799


@dataclass(frozen=True, slots=True)
class Limits:
    max_candidates: int
    max_text_chars: int
    max_id_chars: int
    max_events: int

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.max_candidates, s.max_text_chars, s.max_id_chars, s.max_events_per_request)


def _check_id(value: str, name: str, limits: Limits) -> str:
    if not value:
        raise InvalidRequest(f"{name} must not be empty")
    if len(value) > limits.max_id_chars:
        raise InvalidRequest(f"{name} is {len(value)} characters; the limit is {limits.max_id_chars}")
    return value


def _check_text(value: str, name: str, limits: Limits) -> str:
    if len(value) > limits.max_text_chars:
        raise InvalidRequest(f"{name} is {len(value)} characters; the limit is {limits.max_text_chars}")
    return value


def _check_count(count: int, limit: int, name: str, setting: str) -> None:
    if count > limit:
        raise InvalidRequest(f"{name} has {count} entries; the limit is {limit} (setting {setting})")


def _check_fraction(value: float, name: str) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise InvalidRequest(f"{name} must be in [0, 1], got {value}")
    return value


def event_from_pb(msg: pb.Event, name: str, limits: Limits, default_user: str = "") -> Event:
    user_id = msg.user_id or default_user
    _check_id(user_id, f"{name}.user_id", limits)
    if default_user and user_id != default_user:
        raise InvalidRequest(f"{name}.user_id {user_id!r} differs from the request's user_id")
    _check_id(msg.item_id, f"{name}.item_id", limits)
    if msg.type not in _EVENT_TYPES:
        raise InvalidRequest(f"{name}.type {msg.type} is not a known EventType")
    if len(msg.event_id) > limits.max_id_chars:
        raise InvalidRequest(f"{name}.event_id is longer than {limits.max_id_chars} characters")
    weight = None
    if msg.HasField("weight"):
        weight = msg.weight
        if not math.isfinite(weight):
            raise InvalidRequest(f"{name}.weight must be finite, got {weight}")
    timestamp = 0.0
    if msg.HasField("timestamp"):
        seconds, nanos = msg.timestamp.seconds, msg.timestamp.nanos
        if not 0 <= nanos < 1_000_000_000:
            raise InvalidRequest(f"{name}.timestamp.nanos must be in [0, 999999999], got {nanos}")
        if seconds > _MAX_TIMESTAMP_SECONDS:
            raise InvalidRequest(f"{name}.timestamp is after 9999-12-31")
        timestamp = seconds + nanos / 1e9
        if timestamp <= 0:
            raise InvalidRequest(f"{name}.timestamp must be after 1970-01-01")
    text = _check_text(msg.text, f"{name}.text", limits) if msg.HasField("text") else None
    return Event(user_id, msg.item_id, EventType(msg.type), timestamp, msg.event_id, text, weight)


def events_from_pb(msgs: Sequence[pb.Event], field: str, limits: Limits, default_user: str = "") -> tuple[Event, ...]:
    _check_count(len(msgs), limits.max_events, field, "max_events_per_request")
    return tuple(event_from_pb(m, f"{field}[{i}]", limits, default_user) for i, m in enumerate(msgs))


def rerank_query(req: pb.RerankRequest, limits: Limits) -> RerankQuery:
    user_id = _check_id(req.user_id, "user_id", limits)
    if not req.candidates:
        raise InvalidRequest("candidates must not be empty")
    _check_count(len(req.candidates), limits.max_candidates, "candidates", "max_candidates")
    candidates = []
    for i, c in enumerate(req.candidates):
        _check_id(c.item_id, f"candidates[{i}].item_id", limits)
        if not math.isfinite(c.score):
            raise InvalidRequest(f"candidates[{i}].score must be finite, got {c.score}")
        text = _check_text(c.text, f"candidates[{i}].text", limits) if c.HasField("text") else None
        candidates.append(Candidate(c.item_id, c.score, text))
    opts = req.options
    options = RerankOptions(
        blend_weight=_check_fraction(opts.blend_weight, "options.blend_weight") if opts.HasField("blend_weight") else None,
        diversity=_check_fraction(opts.diversity, "options.diversity") if opts.HasField("diversity") else None,
        bypass=opts.bypass,
        explain=opts.explain,
    )
    if len(req.experiment) > limits.max_id_chars or len(req.request_id) > limits.max_id_chars:
        raise InvalidRequest(f"experiment and request_id are limited to {limits.max_id_chars} characters")
    return RerankQuery(
        user_id=user_id,
        candidates=tuple(candidates),
        context_events=events_from_pb(req.context_events, "context_events", limits, default_user=user_id),
        top_k=req.top_k,
        options=options,
        experiment=req.experiment,
        request_id=req.request_id,
    )


def items_from_pb(req: pb.UpsertItemsRequest, limits: Limits) -> tuple[Item, ...]:
    if not req.items:
        raise InvalidRequest("items must not be empty")
    _check_count(len(req.items), limits.max_events, "items", "max_events_per_request")
    return tuple(
        Item(_check_id(it.item_id, f"items[{i}].item_id", limits), _check_text(it.text, f"items[{i}].text", limits))
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


def rerank_response(result: RerankResult) -> pb.RerankResponse:
    items = []
    for it in result.items:
        msg = pb.ScoredItem(
            item_id=it.item_id,
            score=it.score,
            semantic_score=it.semantic_score,
            upstream_score=it.upstream_score,
            original_rank=it.original_rank,
        )
        if it.explanation is not None:
            e = it.explanation
            msg.explanation.CopyFrom(
                pb.Explanation(
                    nearest_history_item_id=e.nearest_history_item_id,
                    nearest_history_similarity=e.nearest_history_similarity,
                    has_vector=e.has_vector,
                    summary=e.summary,
                )
            )
        items.append(msg)
    t = result.timing
    return pb.RerankResponse(
        items=items,
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
    )


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
