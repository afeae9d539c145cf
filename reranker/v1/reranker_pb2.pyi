import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_VIEW: _ClassVar[EventType]
    EVENT_TYPE_CLICK: _ClassVar[EventType]
    EVENT_TYPE_ADD_TO_CART: _ClassVar[EventType]
    EVENT_TYPE_PURCHASE: _ClassVar[EventType]
    EVENT_TYPE_LIKE: _ClassVar[EventType]
    EVENT_TYPE_DISLIKE: _ClassVar[EventType]
    EVENT_TYPE_SKIP: _ClassVar[EventType]

class ConsumedPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSUMED_POLICY_UNSPECIFIED: _ClassVar[ConsumedPolicy]
    CONSUMED_POLICY_KEEP: _ClassVar[ConsumedPolicy]
    CONSUMED_POLICY_DEMOTE: _ClassVar[ConsumedPolicy]
    CONSUMED_POLICY_DROP: _ClassVar[ConsumedPolicy]
    CONSUMED_POLICY_LEARNED: _ClassVar[ConsumedPolicy]

class Variant(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VARIANT_UNSPECIFIED: _ClassVar[Variant]
    VARIANT_RERANKED: _ClassVar[Variant]
    VARIANT_CONTROL: _ClassVar[Variant]
    VARIANT_BYPASSED: _ClassVar[Variant]
    VARIANT_FALLBACK: _ClassVar[Variant]

class FallbackReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FALLBACK_REASON_UNSPECIFIED: _ClassVar[FallbackReason]
    FALLBACK_REASON_DEADLINE: _ClassVar[FallbackReason]
    FALLBACK_REASON_ENCODER_ERROR: _ClassVar[FallbackReason]
    FALLBACK_REASON_NOT_READY: _ClassVar[FallbackReason]
    FALLBACK_REASON_OVERLOADED: _ClassVar[FallbackReason]
    FALLBACK_REASON_INTERNAL: _ClassVar[FallbackReason]
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_VIEW: EventType
EVENT_TYPE_CLICK: EventType
EVENT_TYPE_ADD_TO_CART: EventType
EVENT_TYPE_PURCHASE: EventType
EVENT_TYPE_LIKE: EventType
EVENT_TYPE_DISLIKE: EventType
EVENT_TYPE_SKIP: EventType
CONSUMED_POLICY_UNSPECIFIED: ConsumedPolicy
CONSUMED_POLICY_KEEP: ConsumedPolicy
CONSUMED_POLICY_DEMOTE: ConsumedPolicy
CONSUMED_POLICY_DROP: ConsumedPolicy
CONSUMED_POLICY_LEARNED: ConsumedPolicy
VARIANT_UNSPECIFIED: Variant
VARIANT_RERANKED: Variant
VARIANT_CONTROL: Variant
VARIANT_BYPASSED: Variant
VARIANT_FALLBACK: Variant
FALLBACK_REASON_UNSPECIFIED: FallbackReason
FALLBACK_REASON_DEADLINE: FallbackReason
FALLBACK_REASON_ENCODER_ERROR: FallbackReason
FALLBACK_REASON_NOT_READY: FallbackReason
FALLBACK_REASON_OVERLOADED: FallbackReason
FALLBACK_REASON_INTERNAL: FallbackReason

class Candidate(_message.Message):
    __slots__ = ("item_id", "score", "text")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    text: str
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class CandidateColumns(_message.Message):
    __slots__ = ("item_ids", "scores", "texts")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class PackedCandidates(_message.Message):
    __slots__ = ("item_ids", "scores", "texts")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    item_ids: bytes
    scores: bytes
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[bytes] = ..., scores: _Optional[bytes] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "user_id", "item_id", "type", "timestamp", "text", "weight")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    item_id: str
    type: EventType
    timestamp: _timestamp_pb2.Timestamp
    text: str
    weight: float
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., type: _Optional[_Union[EventType, str]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., text: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class RerankOptions(_message.Message):
    __slots__ = ("blend_weight", "diversity", "bypass", "explain", "columns", "consumed", "packed_item_ids", "packed_score_details")
    BLEND_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    BYPASS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    PACKED_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    PACKED_SCORE_DETAILS_FIELD_NUMBER: _ClassVar[int]
    blend_weight: float
    diversity: float
    bypass: bool
    explain: bool
    columns: bool
    consumed: ConsumedPolicy
    packed_item_ids: bool
    packed_score_details: bool
    def __init__(self, blend_weight: _Optional[float] = ..., diversity: _Optional[float] = ..., bypass: _Optional[bool] = ..., explain: _Optional[bool] = ..., columns: _Optional[bool] = ..., consumed: _Optional[_Union[ConsumedPolicy, str]] = ..., packed_item_ids: _Optional[bool] = ..., packed_score_details: _Optional[bool] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("user_id", "candidates", "candidate_columns", "context_events", "top_k", "options", "experiment", "request_id", "packed_candidates")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PACKED_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    candidate_columns: CandidateColumns
    context_events: _containers.RepeatedCompositeFieldContainer[Event]
    top_k: int
    options: RerankOptions
    experiment: str
    request_id: str
    packed_candidates: PackedCandidates
    def __init__(self, user_id: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., candidate_columns: _Optional[_Union[CandidateColumns, _Mapping]] = ..., context_events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., top_k: _Optional[int] = ..., options: _Optional[_Union[RerankOptions, _Mapping]] = ..., experiment: _Optional[str] = ..., request_id: _Optional[str] = ..., packed_candidates: _Optional[_Union[PackedCandidates, _Mapping]] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("nearest_history_item_id", "nearest_history_similarity", "has_vector", "summary")
    NEAREST_HISTORY_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    NEAREST_HISTORY_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    HAS_VECTOR_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    nearest_history_item_id: str
    nearest_history_similarity: float
    has_vector: bool
    summary: str
    def __init__(self, nearest_history_item_id: _Optional[str] = ..., nearest_history_similarity: _Optional[float] = ..., has_vector: _Optional[bool] = ..., summary: _Optional[str] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "semantic_score", "upstream_score", "original_rank", "explanation")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_SCORE_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_SCORE_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_RANK_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    semantic_score: float
    upstream_score: float
    original_rank: int
    explanation: Explanation
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., semantic_score: _Optional[float] = ..., upstream_score: _Optional[float] = ..., original_rank: _Optional[int] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("total_ms", "encode_ms", "score_ms")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    SCORE_MS_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    encode_ms: float
    score_ms: float
    def __init__(self, total_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., score_ms: _Optional[float] = ...) -> None: ...

class ItemColumns(_message.Message):
    __slots__ = ("item_ids", "scores", "semantic_scores", "upstream_scores", "original_ranks")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_SCORES_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_SCORES_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_RANKS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    semantic_scores: _containers.RepeatedScalarFieldContainer[float]
    upstream_scores: _containers.RepeatedScalarFieldContainer[float]
    original_ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., semantic_scores: _Optional[_Iterable[float]] = ..., upstream_scores: _Optional[_Iterable[float]] = ..., original_ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class PackedItems(_message.Message):
    __slots__ = ("positions", "scores", "item_ids", "semantic_scores", "upstream_scores")
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_SCORES_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_SCORES_FIELD_NUMBER: _ClassVar[int]
    positions: bytes
    scores: bytes
    item_ids: bytes
    semantic_scores: bytes
    upstream_scores: bytes
    def __init__(self, positions: _Optional[bytes] = ..., scores: _Optional[bytes] = ..., item_ids: _Optional[bytes] = ..., semantic_scores: _Optional[bytes] = ..., upstream_scores: _Optional[bytes] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("items", "variant", "fallback_reason", "fallback_detail", "model_version", "request_id", "cold_user", "timing", "cache_hits", "encoded", "without_vector", "bucket", "item_columns", "arm", "consumed_candidates", "consumed_dropped", "packed_items")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_DETAIL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COLD_USER_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    WITHOUT_VECTOR_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    ITEM_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_DROPPED_FIELD_NUMBER: _ClassVar[int]
    PACKED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    variant: Variant
    fallback_reason: FallbackReason
    fallback_detail: str
    model_version: str
    request_id: str
    cold_user: bool
    timing: Timing
    cache_hits: int
    encoded: int
    without_vector: int
    bucket: int
    item_columns: ItemColumns
    arm: str
    consumed_candidates: int
    consumed_dropped: int
    packed_items: PackedItems
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., variant: _Optional[_Union[Variant, str]] = ..., fallback_reason: _Optional[_Union[FallbackReason, str]] = ..., fallback_detail: _Optional[str] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., cold_user: _Optional[bool] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., cache_hits: _Optional[int] = ..., encoded: _Optional[int] = ..., without_vector: _Optional[int] = ..., bucket: _Optional[int] = ..., item_columns: _Optional[_Union[ItemColumns, _Mapping]] = ..., arm: _Optional[str] = ..., consumed_candidates: _Optional[int] = ..., consumed_dropped: _Optional[int] = ..., packed_items: _Optional[_Union[PackedItems, _Mapping]] = ...) -> None: ...

class RecordEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class RecordEventsResponse(_message.Message):
    __slots__ = ("accepted", "duplicates", "without_vector")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    WITHOUT_VECTOR_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    without_vector: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., without_vector: _Optional[int] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item_id", "text")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    text: str
    def __init__(self, item_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("upserted", "encoded")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    encoded: int
    def __init__(self, upserted: _Optional[int] = ..., encoded: _Optional[int] = ...) -> None: ...

class GetUserProfileRequest(_message.Message):
    __slots__ = ("user_id", "include_vector")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTOR_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    include_vector: bool
    def __init__(self, user_id: _Optional[str] = ..., include_vector: _Optional[bool] = ...) -> None: ...

class GetUserProfileResponse(_message.Message):
    __slots__ = ("user_id", "found", "event_count", "recent_events", "vector", "updated_at")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    RECENT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    found: bool
    event_count: int
    recent_events: _containers.RepeatedCompositeFieldContainer[Event]
    vector: _containers.RepeatedScalarFieldContainer[float]
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., found: _Optional[bool] = ..., event_count: _Optional[int] = ..., recent_events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., vector: _Optional[_Iterable[float]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
