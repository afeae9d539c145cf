"""Plain data types shared by the service and its edges. No protobuf here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EventType(enum.IntEnum):
    """Mirrors reranker.v1.EventType (same numbers)."""

    UNSPECIFIED = 0
    VIEW = 1
    CLICK = 2
    ADD_TO_CART = 3
    PURCHASE = 4
    LIKE = 5
    DISLIKE = 6
    SKIP = 7


class Variant(enum.IntEnum):
    """Mirrors reranker.v1.Variant."""

    UNSPECIFIED = 0
    RERANKED = 1
    CONTROL = 2
    BYPASSED = 3
    FALLBACK = 4


class FallbackReason(enum.IntEnum):
    """Mirrors reranker.v1.FallbackReason."""

    NONE = 0
    DEADLINE = 1
    ENCODER_ERROR = 2
    NOT_READY = 3
    OVERLOADED = 4
    INTERNAL = 5


@dataclass(frozen=True, slots=True)
class Candidate:
    item_id: str
    score: float
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    user_id: str
    item_id: str
    type: EventType = EventType.CLICK
    timestamp: float = 0.0  # unix seconds; 0 = "now", filled in by the service
    event_id: str = ""
    text: str | None = None
    weight: float | None = None  # overrides the configured weight of `type`


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    text: str


@dataclass(frozen=True, slots=True)
class RerankOptions:
    blend_weight: float | None = None
    diversity: float | None = None
    bypass: bool = False
    explain: bool = False


@dataclass(frozen=True, slots=True)
class RerankQuery:
    user_id: str
    candidates: tuple[Candidate, ...]
    context_events: tuple[Event, ...] = ()
    top_k: int = 0
    options: RerankOptions = field(default_factory=RerankOptions)
    experiment: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Explanation:
    has_vector: bool
    nearest_history_item_id: str = ""
    nearest_history_similarity: float = 0.0
    summary: str = ""


@dataclass(frozen=True, slots=True)
class ScoredItem:
    item_id: str
    score: float
    semantic_score: float
    upstream_score: float
    original_rank: int
    explanation: Explanation | None = None


@dataclass(frozen=True, slots=True)
class Timing:
    total_ms: float = 0.0
    encode_ms: float = 0.0
    score_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class RerankResult:
    items: tuple[ScoredItem, ...]
    variant: Variant
    model_version: str
    request_id: str = ""
    fallback_reason: FallbackReason = FallbackReason.NONE
    fallback_detail: str = ""
    cold_user: bool = False
    timing: Timing = field(default_factory=Timing)
    cache_hits: int = 0
    encoded: int = 0
    without_vector: int = 0
    bucket: int = 0


@dataclass(frozen=True, slots=True)
class RecordResult:
    accepted: int = 0
    duplicates: int = 0
    without_vector: int = 0

    def __add__(self, other: RecordResult) -> RecordResult:
        return RecordResult(
            self.accepted + other.accepted,
            self.duplicates + other.duplicates,
            self.without_vector + other.without_vector,
        )


@dataclass(frozen=True, slots=True)
class UpsertResult:
    upserted: int
    encoded: int


@dataclass(frozen=True, slots=True)
class UserProfileView:
    user_id: str
    found: bool
    event_count: int = 0
    recent_events: tuple[Event, ...] = ()
    vector: tuple[float, ...] = ()
    updated_at: float = 0.0
