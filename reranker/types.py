"""Plain data types shared by the service and its edges. No protobuf here."""

from __future__ import annotations

import enum
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np


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


class DecimalIds(Sequence[str]):
    """Integer item ids (an int64 array) seen as their decimal strings: id 42 is item "42".

    The packed form's ids. Integer and decimal string ids share one key space, so everything that
    works with string ids (profiles, the head's tables, the training log) works with these through
    the Sequence protocol (the strings are built once, on first use), while the hot path (dedup,
    the item cache, the packed answer) reads `values` with array operations.
    """

    __slots__ = ("values", "_strings")

    def __init__(self, values: np.ndarray | Sequence[int]) -> None:
        self.values: np.ndarray = np.asarray(values, dtype=np.int64)
        if self.values.ndim != 1:
            raise ValueError("DecimalIds takes a 1-D array of integers")
        self._strings: list[str] | None = None

    @classmethod
    def of_int64(cls, values: np.ndarray) -> DecimalIds:
        """A 1-D int64 array taken as it is (no conversion, no check): the request edge's and
        `take`'s ids."""
        ids = cls.__new__(cls)
        ids.values, ids._strings = values, None
        return ids

    @property
    def strings(self) -> list[str]:
        if self._strings is None:
            self._strings = list(map(str, self.values.tolist()))
        return self._strings

    def take(self, positions: np.ndarray) -> DecimalIds:
        """The ids at `positions` (a 1-D int array)."""
        return DecimalIds.of_int64(self.values[positions])

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> DecimalIds: ...
    def __getitem__(self, index: int | slice) -> str | DecimalIds:
        if isinstance(index, slice):
            return DecimalIds(self.values[index])
        return self.strings[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.strings)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DecimalIds):
            return bool(np.array_equal(self.values, other.values))
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return self.strings == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DecimalIds({self.values.tolist()!r})"


def take_ids(ids: Sequence[str], positions: np.ndarray) -> Sequence[str]:
    """The ids at `positions` (an int array), in that order; DecimalIds stay DecimalIds."""
    if isinstance(ids, DecimalIds):
        return ids.take(positions)
    at = positions.tolist()
    if len(at) < 2:  # itemgetter of one position returns the item itself, of none raises
        return [ids[i] for i in at]
    # One itemgetter call indexes them all in C: 136k instructions for 500 ids, against 191k for
    # map(ids.__getitem__, ...).
    return list(operator.itemgetter(*at)(ids))


def _id_column(ids: Sequence[str]) -> Sequence[str]:
    return ids if isinstance(ids, DecimalIds) else list(ids)


@dataclass(frozen=True, slots=True)
class Candidate:
    item_id: str
    score: float
    text: str | None = None


class CandidateColumns(Sequence[Candidate]):
    """Candidates stored column-wise: the Rerank hot path never builds one object per candidate.

    Behaves as a read-only sequence of `Candidate` (built on access) for code that wants objects.
    `scores` is float64; `texts[i]` is None when the candidate carried no text.
    """

    __slots__ = ("item_ids", "scores", "texts")

    def __init__(self, item_ids: Sequence[str], scores: np.ndarray | Sequence[float], texts: Sequence[str | None]) -> None:
        self.item_ids: Sequence[str] = _id_column(item_ids)  # a list, or DecimalIds (packed form)
        self.scores: np.ndarray = np.asarray(scores, dtype=np.float64)
        self.texts: list[str | None] = list(texts)
        if not len(self.item_ids) == self.scores.shape[0] == len(self.texts):
            raise ValueError("candidate columns differ in length")

    @classmethod
    def unchecked(cls, item_ids: Sequence[str], scores: np.ndarray, texts: list[str | None]) -> CandidateColumns:
        """Columns as the constructor keeps them (a list or DecimalIds, float64 scores, a list of texts
        that is not shared, all of one length), built and checked by their caller (the request edge):
        taken as they are, without the constructor's conversions, copy and checks."""
        columns = cls.__new__(cls)
        columns.item_ids, columns.scores, columns.texts = item_ids, scores, texts
        return columns

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> CandidateColumns:
        """The candidates as columns (returned as is when they already are)."""
        if isinstance(candidates, CandidateColumns):
            return candidates
        return cls(
            [c.item_id for c in candidates],
            np.fromiter((c.score for c in candidates), dtype=np.float64, count=len(candidates)),
            [c.text for c in candidates],
        )

    def take(self, positions: Sequence[int] | np.ndarray) -> CandidateColumns:
        """The candidates at the given positions, in that order."""
        idx = np.asarray(positions, dtype=np.int64)
        texts = self.texts
        return CandidateColumns(take_ids(self.item_ids, idx), self.scores[idx], [texts[i] for i in idx.tolist()])

    def __len__(self) -> int:
        return len(self.item_ids)

    @overload
    def __getitem__(self, index: int) -> Candidate: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Candidate]: ...
    def __getitem__(self, index: int | slice) -> Candidate | Sequence[Candidate]:
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        return Candidate(self.item_ids[index], float(self.scores[index]), self.texts[index])

    def __iter__(self) -> Iterator[Candidate]:
        for item_id, score, text in zip(self.item_ids, self.scores.tolist(), self.texts):
            yield Candidate(item_id, score, text)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CandidateColumns({len(self)} candidates)"


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
    consumed: str | None = None  # consumed-item policy (config.CONSUMED_POLICIES); None = the server's


# Built once per Rerank, read-only by convention and not frozen: a frozen dataclass's __init__ sets
# each field through object.__setattr__, about 2,000 callgrind instructions a field (RerankResult:
# 30,000 frozen, 11,000 not).
@dataclass(slots=True)
class RerankQuery:
    user_id: str
    candidates: Sequence[Candidate]  # a tuple of Candidate, or CandidateColumns on the hot path
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


class RankedItems(Sequence[ScoredItem]):
    """A Rerank answer stored column-wise (best first); a read-only sequence of `ScoredItem`.

    Building 500 ScoredItem objects per request costs more than scoring them, so the service
    returns columns and convert.py encodes them straight into the response.
    """

    __slots__ = ("item_ids", "scores", "semantic_scores", "upstream_scores", "original_ranks", "explanations")

    def __init__(
        self,
        item_ids: Sequence[str],
        scores: np.ndarray | Sequence[float],
        semantic_scores: np.ndarray | Sequence[float],
        upstream_scores: np.ndarray | Sequence[float],
        original_ranks: np.ndarray | Sequence[int],
        explanations: Sequence[Explanation | None] | None = None,
    ) -> None:
        self.item_ids: Sequence[str] = _id_column(item_ids)  # a list, or DecimalIds (packed form)
        self.scores = np.asarray(scores, dtype=np.float64)
        self.semantic_scores = np.asarray(semantic_scores, dtype=np.float64)
        self.upstream_scores = np.asarray(upstream_scores, dtype=np.float64)
        self.original_ranks = np.asarray(original_ranks, dtype=np.int64)
        self.explanations = None if explanations is None else list(explanations)
        n = len(self.item_ids)
        if not (
            self.scores.shape == self.semantic_scores.shape == self.upstream_scores.shape
            == self.original_ranks.shape == (n,)
        ) or (self.explanations is not None and len(self.explanations) != n):
            raise ValueError("ranked item columns differ in length")

    @classmethod
    def unchecked(
        cls, item_ids: Sequence[str], scores: np.ndarray, semantic_scores: np.ndarray, upstream_scores: np.ndarray,
        original_ranks: np.ndarray, explanations: list[Explanation | None] | None = None,
    ) -> RankedItems:
        """Columns as the constructor keeps them (a list or DecimalIds, float64 score arrays, int64
        ranks, all of one length), from a caller that built them so (the Rerank stages): taken as
        they are, without the constructor's conversions and checks."""
        items = cls.__new__(cls)
        items.item_ids, items.scores, items.semantic_scores = item_ids, scores, semantic_scores
        items.upstream_scores, items.original_ranks, items.explanations = upstream_scores, original_ranks, explanations
        return items

    @classmethod
    def of(cls, items: Sequence[ScoredItem]) -> RankedItems:
        if isinstance(items, RankedItems):
            return items
        explanations = [it.explanation for it in items]
        return cls(
            [it.item_id for it in items],
            [it.score for it in items],
            [it.semantic_score for it in items],
            [it.upstream_score for it in items],
            [it.original_rank for it in items],
            explanations if any(e is not None for e in explanations) else None,
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    @overload
    def __getitem__(self, index: int) -> ScoredItem: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ScoredItem]: ...
    def __getitem__(self, index: int | slice) -> ScoredItem | Sequence[ScoredItem]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(len(self))[index])
        return ScoredItem(
            self.item_ids[index],
            float(self.scores[index]),
            float(self.semantic_scores[index]),
            float(self.upstream_scores[index]),
            int(self.original_ranks[index]),
            None if self.explanations is None else self.explanations[index],
        )

    def __iter__(self) -> Iterator[ScoredItem]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RankedItems({len(self)} items)"


@dataclass(slots=True)  # not frozen: see RerankQuery
class Timing:
    total_ms: float = 0.0
    encode_ms: float = 0.0
    score_ms: float = 0.0


@dataclass(slots=True)  # not frozen: see RerankQuery
class RerankResult:
    items: Sequence[ScoredItem]  # a tuple of ScoredItem, or RankedItems on the hot path
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
    arm: str = ""  # "control", "treatment" or an experiment_arms name; "" when bypassed
    consumed_candidates: int = 0  # candidates the user had already consumed
    consumed_dropped: int = 0  # of those, removed by consumed_policy=drop


# The order a Rerank answer served (metrics and access-log label `order`): the user's personalized
# order, a cold user's upstream order under the reranked variant, or the upstream order for any other
# reason (control, bypass, fallback).
PERSONALIZED, COLD, UPSTREAM = "personalized", "cold", "upstream"


def order_of(result: RerankResult) -> str:
    """PERSONALIZED, COLD or UPSTREAM: what `result` served (a cold user's VARIANT_RERANKED is COLD)."""
    if result.variant is not Variant.RERANKED:
        return UPSTREAM
    return COLD if result.cold_user else PERSONALIZED


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
