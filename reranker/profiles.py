"""UserProfileStore: time-decayed, event-weighted pooling of item vectors, updated in O(d) per event.

The long-term vector is S = sum_i w_i * exp(-lambda * (T - t_i)) * v_i, kept relative to a reference
time T (the newest event time seen). A newer event rescales S once and adds; an older
(out-of-order) event is added with its own decay factor. Both are O(d) and give exactly the same S
as recomputing from scratch. The user vector is S / |S| (cosine scoring ignores the scale).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field

import cachetools
import numpy as np

from reranker.types import Event, RecordResult, UserProfileView


@dataclass(slots=True)
class _Recent:
    event: Event
    vector: np.ndarray | None


@dataclass
class UserProfile:
    dim: int
    max_recent: int
    vector: np.ndarray = field(init=False)
    ref_time: float = 0.0
    event_count: int = 0
    folded_count: int = 0  # events that contributed a vector
    updated_at: float = 0.0
    recent: deque[_Recent] = field(init=False)
    seen_event_ids: dict[str, None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vector = np.zeros(self.dim, dtype=np.float64)
        self.recent = deque(maxlen=self.max_recent)


class UserProfileStore:
    def __init__(
        self,
        *,
        dim: int,
        max_users: int,
        ttl_seconds: float,
        half_life_seconds: float,
        event_weights: dict[str, float],
        max_recent: int,
        max_event_ids: int = 1000,
    ) -> None:
        self.dim = dim
        self._decay = math.log(2.0) / half_life_seconds
        self._weights = event_weights
        self._max_recent = max_recent
        self._max_event_ids = max_event_ids
        self._profiles: cachetools.TTLCache[str, UserProfile] = cachetools.TTLCache(max_users, ttl_seconds)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._profiles)

    def weight_of(self, event: Event) -> float:
        if event.weight is not None:
            return float(event.weight)
        return self._weights.get(event.type.name.lower(), 1.0)

    def apply(self, events: list[tuple[Event, np.ndarray | None]], now: float) -> RecordResult:
        """Fold events (with their item vectors, or None if unknown) into their users' profiles."""
        accepted = duplicates = without_vector = 0
        with self._lock:
            for event, vector in events:
                profile = self._profiles.get(event.user_id)
                if profile is None:
                    profile = UserProfile(self.dim, self._max_recent)
                if event.event_id:
                    if event.event_id in profile.seen_event_ids:
                        duplicates += 1
                        self._profiles[event.user_id] = profile
                        continue
                    profile.seen_event_ids[event.event_id] = None
                    if len(profile.seen_event_ids) > self._max_event_ids:
                        profile.seen_event_ids.pop(next(iter(profile.seen_event_ids)))
                accepted += 1
                profile.event_count += 1
                profile.updated_at = now
                profile.recent.append(_Recent(event, vector))
                if vector is None:
                    without_vector += 1
                else:
                    self._fold(profile, event, vector)
                self._profiles[event.user_id] = profile  # (re)insert refreshes the TTL
        return RecordResult(accepted, duplicates, without_vector)

    def _fold(self, profile: UserProfile, event: Event, vector: np.ndarray) -> None:
        weight = self.weight_of(event)
        if profile.folded_count == 0:
            profile.ref_time = event.timestamp
        profile.folded_count += 1
        if event.timestamp >= profile.ref_time:
            profile.vector *= math.exp(-self._decay * (event.timestamp - profile.ref_time))
            profile.ref_time = event.timestamp
            profile.vector += weight * vector
        else:
            profile.vector += weight * math.exp(-self._decay * (profile.ref_time - event.timestamp)) * vector

    def user_vector(self, user_id: str) -> np.ndarray | None:
        """Normalized user vector, or None for a cold user (no profile or no usable signal)."""
        with self._lock:
            profile = self._profiles.get(user_id)
            if profile is None:
                self.misses += 1
                return None
            self.hits += 1
            norm = float(np.linalg.norm(profile.vector))
            if norm <= 1e-9:
                return None
            return (profile.vector / norm).astype(np.float32)

    def history(self, user_id: str) -> tuple[list[str], np.ndarray]:
        """Item ids and vectors of the recent events that had a vector and positive weight."""
        with self._lock:
            profile = self._profiles.get(user_id)
            if profile is None:
                return [], np.zeros((0, self.dim), dtype=np.float32)
            rows = [r for r in profile.recent if r.vector is not None and self.weight_of(r.event) > 0]
        if not rows:
            return [], np.zeros((0, self.dim), dtype=np.float32)
        return [r.event.item_id for r in rows], np.stack([r.vector for r in rows]).astype(np.float32)

    def view(self, user_id: str, include_vector: bool) -> UserProfileView:
        with self._lock:
            profile = self._profiles.get(user_id)
            if profile is None:
                return UserProfileView(user_id=user_id, found=False)
            vector: tuple[float, ...] = ()
            if include_vector:
                norm = float(np.linalg.norm(profile.vector))
                if norm > 1e-9:
                    vector = tuple(float(x) for x in profile.vector / norm)
            return UserProfileView(
                user_id=user_id,
                found=True,
                event_count=profile.event_count,
                recent_events=tuple(r.event for r in profile.recent),
                vector=vector,
                updated_at=profile.updated_at,
            )
