"""What the Rerank stages share: the parts the service composed (Components), one request's state
as it moves through the stages (RerankContext), and what a cache-only attempt leaves for the
blocking one (Resume)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from reranker.cancellation import CancelToken
from reranker.config import Settings
from reranker.history import CandidateHistory
from reranker.learning.traininglog import TrainingLog
from reranker.metrics import Metrics
from reranker.ranking import scoring
from reranker.ranking.arms import Arm, ArmTable
from reranker.ranking.head import RankingHead
from reranker.types import CandidateColumns, RerankQuery
from reranker.users.profiles import ProfileStore, UserState

if TYPE_CHECKING:
    from reranker.pipeline.vectors import ItemVectors, Lookup


class Components(Protocol):
    """What the pipeline reads from the composition root; each attribute is read once per request
    where it can change (runtime settings, a hot-reloaded arm table)."""

    settings: Settings
    arms: ArmTable | None
    head: RankingHead | None
    model_version: str
    load_error: str
    profiles: ProfileStore | None
    vectors: ItemVectors | None
    training_log: TrainingLog | None
    metrics: Metrics
    event_weight_limit: float

    @property
    def ready(self) -> bool: ...

    def now(self) -> float: ...


@dataclass(slots=True)
class Resume:
    """Cache lookups a cache-only attempt made before it found work that blocks (encoding); the
    blocking run starts from them instead of looking up again. Nothing was written."""

    lookup: Lookup | None = None
    event_lookup: Lookup | None = None


@dataclass(slots=True)
class RerankContext:
    """One Rerank as it moves through the stages. The first block is given; each stage fills the
    fields under its name (unset until it ran: no per-request defaults) and later stages read them."""

    query: RerankQuery
    settings: Settings  # read once: a runtime settings change applies to the next request
    started: float
    time_remaining: float | None
    cancel: CancelToken | None
    cache_only: bool  # never wait: stop with a Resume where encoding would be needed
    resume: Resume | None
    # dedupe
    candidates: CandidateColumns = field(init=False)
    keep: np.ndarray = field(init=False)  # original position of each kept candidate
    # arm / bypass
    bucket: int = field(init=False)
    arm: Arm | None = field(init=False)
    arm_name: str = field(init=False)
    head: RankingHead | None = field(init=False)
    # vectors
    encode_budget: float = field(init=False)
    encode_started: float = field(init=False)
    keys: np.ndarray = field(init=False)  # the ids' consumed-item keys, from the item cache
    vectors: np.ndarray = field(init=False)
    has_vector: np.ndarray = field(init=False)
    hits: int = field(init=False)
    encoded: int = field(init=False)
    encode_ms: float = field(init=False)
    # user state
    score_started: float = field(init=False)
    state: UserState | None = field(init=False)
    user_vector: np.ndarray | None = field(init=False)
    seen: CandidateHistory = field(init=False)
    # score
    use_head: bool = field(init=False)
    ranking: scoring.Ranking = field(init=False)
    # consumed policy
    order: np.ndarray = field(init=False)
    consumed_count: int = field(init=False)
    dropped: int = field(init=False)
