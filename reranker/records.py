"""The rows of the interaction data: events, upstream lists as served, and the error a malformed
file raises. The training log writes and reads them (reranker.learning.traininglog), the offline
evaluation reads and writes them (reranker.evaluation.formats); they sit below both.
"""

from __future__ import annotations

from dataclasses import dataclass

from reranker.types import EventType

EVENT_TYPES = {t.name.lower(): t for t in EventType if t is not EventType.UNSPECIFIED}


class FormatError(ValueError):
    """A data file does not follow the documented format; the message names file and line."""


@dataclass(frozen=True, slots=True)
class Interaction:
    user_id: str
    item_id: str
    timestamp: float
    event_type: str = "click"


@dataclass(frozen=True, slots=True)
class CandidateRow:
    item_id: str
    score: float
    label: int | None = None


@dataclass(frozen=True, slots=True)
class ServedList:
    """One upstream list as served: its rows in the upstream's order, and when it was served
    (None: unknown; then its label is the user's leave-last-out target)."""

    list_id: str
    user_id: str
    timestamp: float | None
    rows: tuple[CandidateRow, ...]
