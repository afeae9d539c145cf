"""Events into user profiles: stamped with server time, their items' vectors resolved, folded in,
then handed to the training log (shared by RecordEvents and a Rerank's context events); and the
view of one profile (GetUserProfile)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reranker.cancellation import CancelToken
from reranker.pipeline.context import Components
from reranker.types import Event, RecordResult, UserProfileView
from reranker.users.eventpolicy import check_event_time, check_event_weight
from reranker.users.profiles import user_vector as user_vector_of

def stamped(root: Components, events: Sequence[Event], now: float) -> list[Event]:
    """Events with their time stamped (none given) or clamped (after now) to `now`; refused
    (InvalidRequest) beyond the time / weight policy (eventpolicy.py; the servicer checked it
    already with the request's field names, this guards the Python API)."""
    s = root.settings
    limit = root.event_weight_limit
    out, clamped = [], 0
    for i, e in enumerate(events):
        if e.weight is not None:
            check_event_weight(e.weight, f"events[{i}].weight", limit)
        if e.timestamp > now or e.timestamp != e.timestamp:
            check_event_time(e.timestamp, f"events[{i}].timestamp", now, s.users.max_event_skew_seconds)
            clamped += 1
        out.append(e if 0 < e.timestamp <= now else _with_timestamp(e, now))
    if clamped:
        root.metrics.event_times_clamped.inc(clamped)
    return out

def fold(
    root: Components, events: list[Event], vectors: np.ndarray, has_vector: np.ndarray, now: float
) -> RecordResult:
    """Stamped events (with their items' vectors) into the profile store, then the training log."""
    assert root.profiles is not None
    pairs = [(e, vectors[i] if has_vector[i] else None) for i, e in enumerate(events)]
    result = root.profiles.apply(pairs, now)
    training_log = root.training_log
    if training_log is not None:
        training_log.events(events)
    return result

def record(
    root: Components, events: Sequence[Event], timeout_s: float, cancel: CancelToken | None = None
) -> RecordResult:
    """Stamp, resolve (encoding where needed, waiting up to `timeout_s`) and fold `events`."""
    assert root.vectors is not None
    now = root.now()
    events = stamped(root, events, now)
    vectors, has_vector, _, _, _ = root.vectors.resolve(
        [e.item_id for e in events], [e.text for e in events], timeout_s, cancel
    )
    return fold(root, events, vectors, has_vector, now)

def profile_view(root: Components, user_id: str, include_vector: bool = False) -> UserProfileView:
    """Profile summary; `vector` is the user vector Rerank uses (long-term and session mixed)."""
    assert root.profiles is not None
    state = root.profiles.get(user_id)
    if state is None:
        return UserProfileView(user_id=user_id, found=False)
    vector: tuple[float, ...] = ()
    if include_vector:
        user_vector = user_vector_of(state, root.settings.users)
        vector = () if user_vector is None else tuple(float(x) for x in user_vector)
    return UserProfileView(
        user_id=user_id, found=True, event_count=state.event_count, recent_events=state.recent,
        vector=vector, updated_at=state.updated_at,
    )


def _with_timestamp(event: Event, now: float) -> Event:
    return Event(event.user_id, event.item_id, event.type, now, event.event_id, event.text, event.weight)
