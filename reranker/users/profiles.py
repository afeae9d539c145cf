"""User profile stores: where the per-user state of the user model lives.

A store folds events (with their item vectors) into per-user state in O(d) per event and hands out
an immutable `UserState` for scoring; the math is in usermodel.py, the one fold and the one layout
(a compact profile: one byte string per user) in compact.py. Two stores implement the
`ProfileStore` protocol:

* `CompactProfileStore` (compact.py, default): a TTL + LRU bounded dict in this process.
* `CompactRedisProfileStore` (compact_redis.py): one Redis shared by many replicas.

This module holds what they share: the settings of the fold (`ProfileConfig`), the scoring state
(`UserState`) and the recipes that read it, and the bounded in-process dict (`LocalStore`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import cachetools
import numpy as np

from reranker.users import usermodel
from reranker.history import CandidateHistory
from reranker.itemkeys import item_keys
from reranker.users.consumed import ConsumedItems, hours_between
from reranker.types import Event, RecordResult

if TYPE_CHECKING:
    from reranker.config import UserModelSettings

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    dim: int
    decay_rate: float  # lambda = ln 2 / half-life
    event_weights: dict[str, float]
    max_recent: int
    max_history: int
    max_event_ids: int
    max_consumed: int = 0  # consumed items remembered per user (see reranker.users.consumed)
    session_rate: float = usermodel.decay_rate(300.0)  # mu = ln 2 / session half-life
    max_clock_ahead: float = 3600.0  # a profile clock further ahead of now than this is repaired on load / read
    log_salt: str = ""  # the key of the hash that names a user in log lines (log_name)

    @classmethod
    def from_settings(cls, s: UserModelSettings, dim: int, log_salt: str = "") -> ProfileConfig:
        """From the users section; `log_salt` is the observability section's log_user_salt."""
        return cls(
            dim=dim,
            decay_rate=usermodel.decay_rate(s.half_life_seconds),
            event_weights=s.parsed_event_weights(),
            max_recent=s.recent_events_per_user,
            max_history=s.vector_history_size,
            max_event_ids=s.max_event_ids_per_user,
            max_consumed=s.consumed_items_per_user,
            session_rate=usermodel.decay_rate(s.session_half_life_seconds),
            max_clock_ahead=s.max_event_skew_seconds,
            log_salt=log_salt,
        )

    def weight_of(self, event: Event) -> float:
        if event.weight is not None:
            return float(event.weight)
        return self.event_weights.get(event.type.name.lower(), 1.0)


@dataclass(frozen=True, slots=True)
class UserState:
    """A consistent copy of one user's profile, safe to use without locks."""

    user_id: str
    long_term: np.ndarray  # float64 (d,): L relative to ref_time
    ref_time: float
    event_count: int
    updated_at: float
    recent: tuple[Event, ...]  # oldest first, arrival order, text dropped
    history: usermodel.History
    session: np.ndarray | None = None  # float64 (d,): S relative to ref_time; None = rebuild it from history
    # The consumed-item memory (read-only arrays): counts, times and long-term masses per item.
    consumed: ConsumedItems = dataclasses.field(default_factory=ConsumedItems.empty)
    # Values derived from this state (user vector, decayed weights), memoized by their users: the
    # in-process store shares one UserState per profile version (see CompactProfileStore.get).
    derived: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)


def user_vector(state: UserState | None, settings: UserModelSettings) -> np.ndarray | None:
    """u = normalize((1 - m) L/|L| + m S/|S|), or None for a cold user (see usermodel.py).

    The one recipe for the user vector: the server and `reranker train` both call it.
    """
    if state is None:
        return None
    return usermodel.mix(state.long_term, session_of(state, settings), settings.session_mix)


def session_of(state: UserState, settings: UserModelSettings) -> np.ndarray:
    """S of the state; rebuilt from the vector history for a state saved before S was kept."""
    if state.session is not None:
        return state.session
    return usermodel.decayed_sum(state.history, state.ref_time, usermodel.decay_rate(settings.session_half_life_seconds))


def candidate_history(
    state: UserState,
    settings: UserModelSettings,
    item_ids: Sequence[str],
    vectors: np.ndarray,
    has_vector: np.ndarray,
    user_vector: np.ndarray | None,
    keys: np.ndarray | None = None,
) -> CandidateHistory:
    """Which candidates the user consumed, when and how often; for consumed candidates, the user
    vector without their own events (leave-one-out: L - mass_c v_c, S - session_mass_c v_c)
    and which history rows are their own. The one recipe: the server and `reranker train` call it.
    `keys`: the ids' item keys where already known (the item cache keeps one per item), 0 = unknown."""
    consumed = state.consumed
    n = len(item_ids)
    if not len(consumed):
        return CandidateHistory.none(n)
    if keys is None:
        keys = item_keys(item_ids)
    elif np.count_nonzero(keys) < n:  # some unknown (0): count_nonzero is the cheap test, nonzero() the rare fix
        unknown = (keys == 0).nonzero()[0]
        keys = keys.copy()
        keys[unknown] = item_keys([item_ids[i] for i in unknown.tolist()])
    memory = derived(state, "consumed_columns", lambda: _ConsumedColumns.of(state))
    # Looked up once; everything after reads the few consumed positions only.
    pos, hit = consumed.positions(keys)
    at = hit.nonzero()[0]
    if not at.size:
        return CandidateHistory.none(n, consumed.repeat_rate)
    rows = pos.take(at)
    keys_at = consumed.keys.take(rows)  # = keys[at]
    if memory.history_consumed:
        # Every history row is an event on a remembered item, so only the consumed candidates can
        # own a row: compared there (k x m), not against every candidate (k x n).
        own_at = memory.history_column == keys_at
        own_rows = None  # None: consumed, but not among the history rows
        if np.count_nonzero(own_at):
            own_rows = np.zeros((own_at.shape[0], n), dtype=bool)
            own_rows[:, at] = own_at
    else:
        own = memory.history_column == keys
        own_rows = own if np.count_nonzero(own) else None
    with_vector = np.asarray(has_vector, dtype=bool).take(at)
    if np.count_nonzero(with_vector) == at.size:  # the usual case: every consumed candidate has a vector
        excluded, excluded_keys, excluded_rows = at, keys_at, rows
    else:
        excluded, excluded_keys, excluded_rows = at[with_vector], keys_at[with_vector], rows[with_vector]
    cosines = None
    if excluded.size and user_vector is not None:
        user_vectors, cosines = _left_out(state, settings, excluded_keys, np.asarray(vectors).take(excluded, axis=0),
                                          excluded_rows)
    else:
        excluded = excluded[:0]
        user_vectors = np.zeros((0, state.long_term.shape[0]), dtype=np.float32)
    counts = memory.counts.take(rows)
    return CandidateHistory(
        n, at, counts, memory.hours.take(rows), consumed.repeat_rate,
        at.size if memory.counted else int(np.count_nonzero(counts > 0)), excluded, user_vectors, own_rows, cosines,
    )


@dataclass(frozen=True, slots=True)
class _ConsumedColumns:
    """What candidate_history reads of a state's consumed memory and history, once per UserState
    (16 bytes per remembered item, 8 per history row)."""

    counts: np.ndarray  # (M,) float64: the memory's event counts
    hours: np.ndarray  # (M,) hours from each remembered item's newest event to the user's newest event
    history_column: np.ndarray  # (k, 1) item keys of the history rows
    history_consumed: bool  # every history row's item is in the consumed memory (the usual case)
    counted: bool  # every remembered item has events (counts > 0; always, but for odd stored data)

    @staticmethod
    def of(state: UserState) -> _ConsumedColumns:
        consumed, history = state.consumed, state.history
        history_keys = derived(state, "history_keys", lambda: item_keys(history.item_ids))
        out = _ConsumedColumns(
            consumed.counts.astype(np.float64), hours_between(consumed.last, float(consumed.last.max())),
            history_keys.reshape(-1, 1), bool(np.isin(history_keys, consumed.keys).all()), bool((consumed.counts > 0).all()),
        )
        for array in (out.counts, out.hours, out.history_column):
            array.flags.writeable = False
        return out


# Leave-one-out rows kept per user state (each ~3 KB at d = 384: its key holds the item vector's
# bytes): a request's few consumed candidates, not the whole consumed memory, so a cached state stays
# within tens of KB more (user_state_cache_size states are kept).
LEFT_OUT_KEPT = 16


def _left_out(state: UserState, settings: UserModelSettings, keys: np.ndarray, vectors: np.ndarray,
              rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """usermodel.mix_without for consumed candidates (item `keys`, their `vectors`, their `rows` in
    the consumed memory), and each one's cosine to its own row, computed once per UserState and
    item vector: a warm user's consumed candidates come back request after request, and their
    leave-one-out vectors do not change until the user's next event (a new state). Row by row the
    same arithmetic as one call for all."""
    # item key -> (its vector's bytes, the row, the cosine): the bytes tell a re-encoded item's new vector apart
    memo: dict[int, tuple[bytes, np.ndarray, np.float32]] = derived(state, "left_out", dict)
    found: list[tuple[bytes, np.ndarray, np.float32] | None] = []
    missing = []
    for i, (key, vector) in enumerate(zip(keys.tolist(), vectors)):
        entry = memo.get(key)
        if entry is None or entry[0] != vector.tobytes():
            entry = None
            missing.append(i)
        found.append(entry)
    if missing:
        consumed = state.consumed
        session = derived(state, "session_vector", lambda: session_of(state, settings))
        at = rows[missing]
        computed = usermodel.mix_without(state.long_term, session, settings.session_mix, vectors[missing],
                                         consumed.mass[at], consumed.session_mass[at])
        cosines = np.einsum("md,md->m", np.asarray(vectors[missing], dtype=np.float32), computed)
        if len(memo) + len(missing) > LEFT_OUT_KEPT:  # bounded: a state's memory stays small
            memo.clear()
        for i, row, cosine in zip(missing, computed, cosines):
            row.flags.writeable = False
            entry = found[i] = (vectors[i].tobytes(), row, cosine)
            if len(memo) < LEFT_OUT_KEPT:
                memo[int(keys[i])] = entry
    # np.array of the (d,) rows: the same (m, d) float32 array as np.stack, without its Python-level checks
    return (np.array([entry[1] for entry in found]),  # type: ignore[index]
            np.array([entry[2] for entry in found], dtype=np.float32))  # type: ignore[index]


def on_liked_rows(seen: CandidateHistory, state: UserState) -> CandidateHistory:
    """`seen` with `own_rows` restricted to the history rows the head reads (`positive_history`)."""
    if seen.own_rows is None:
        return seen
    liked = state.history.weights > 0
    return seen if liked.all() else dataclasses.replace(seen, own_rows=seen.own_rows[liked])


def derived(state: UserState, key: str, compute: Callable[[], T]) -> T:
    """`compute()`, once per UserState: the in-process store shares one state per profile version
    (for its `user_state_cache_size` most recently read users), so a warm user's vector and
    weights are computed once per event, not once per request."""
    try:
        return state.derived[key]  # type: ignore[no-any-return]
    except KeyError:
        value = state.derived[key] = compute()
        return value


def positive_history(state: UserState) -> np.ndarray:
    """Vectors of the history items with positive weight (what the user liked), float32."""
    liked = state.history.weights > 0
    if liked.all():  # the usual case: no copy
        return state.history.vectors.astype(np.float32, copy=False)
    return state.history.vectors[liked].astype(np.float32, copy=False)


def positive_history_ids(state: UserState) -> list[str]:
    """Ids of the history items with positive weight (what the user liked), oldest first.

    The trained head's collaborative features (covisit, transition) look these up in its tables.
    They come from the vector history (the newest `vector_history_size` events), which the Rerank
    path reads anyway, not from the recent-events buffer.
    """
    history = state.history
    return [item_id for item_id, weight in zip(history.item_ids, history.weights.tolist()) if weight > 0]


class ProfileStore(Protocol):
    """What the service needs from a profile store (in-process or shared)."""

    backend: str
    hits: int  # get() calls that found the user (metrics)
    misses: int
    repeats: int  # events on an already consumed item, over all users this store has seen
    consumed_events: int  # all events counted for `repeats`

    def __len__(self) -> int:
        """Users held in this process."""
        ...

    def apply(self, events: Sequence[tuple[Event, np.ndarray | None]], now: float) -> RecordResult:
        """Fold events (with their item vector, or None when unknown) into their users' profiles."""
        ...

    def get(self, user_id: str, *, recent: bool = True) -> UserState | None:
        """The user's state, or None for an unknown user. `recent=False` leaves `recent` empty
        (the Rerank hot path does not read it)."""
        ...

    def close(self) -> None: ...


UNREADABLE_REASONS = ("wrong_type", "layout", "bad_utf8", "non_finite")


class UnreadableProfile(ValueError):
    """A stored value that is not a profile this build can read: a key of another type, junk, a
    wrong layout, an id that is not UTF-8, a number that is not finite. `reason` is one of
    UNREADABLE_REASONS; the message never quotes the user id."""

    def __init__(self, message: str, reason: str = "layout") -> None:
        super().__init__(message)
        self.reason = reason


def log_name(user_id: str, salt: str = "") -> str:
    """How a log line names a user: a short stable hash, never the id (docs/operations.md, "Logs").
    The access log's `user_hash` (keyed with `log_user_salt` when it is set), so an operator can
    follow one user from its RPCs to its profile."""
    return hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8, key=salt.encode()[:64]).hexdigest()


def event_id_hash(event_id: str) -> int:
    """Stable 64-bit hash of an event id (what the dedup memory stores instead of the string)."""
    digest = hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


P = TypeVar("P")


def export_in_chunks(profiles: cachetools.Cache[str, P], lock: threading.Lock, size: int,
                     copy: Callable[[P], P]) -> Iterator[list[tuple[str, P]]]:
    """`copy` of every live profile (least recently used first), `size` users per list, for
    snapshots. The lock is taken per user, so a snapshot of many users never holds up requests for
    longer than one user's copy. Users that expire or are evicted meanwhile are skipped."""
    with lock:
        user_ids = list(profiles.keys())
    for start in range(0, len(user_ids), size):
        chunk = []
        for user_id in user_ids[start : start + size]:
            with lock:
                profile = profiles.get(user_id)
                copied = None if profile is None else copy(profile)
            if copied is not None:
                chunk.append((user_id, copied))
        if chunk:
            yield chunk


class LocalStore:
    """The in-process store's bounds and bookkeeping: at most `max_users` profiles,
    each dropped after `ttl_seconds` untouched; the ready-to-score states of the `max_states` most
    recently read users; one lock; the counters the metrics read."""

    layout = ""

    def __init__(self, config: ProfileConfig, *, max_users: int, ttl_seconds: float, max_states: int = 0,
                 lock: AbstractContextManager[Any] | None = None) -> None:
        """`lock`: the one lock every read, write and snapshot copy takes (default a threading.Lock;
        a benchmark passes one that times its holds)."""
        self.config = config
        self.dim = config.dim
        self._profiles: cachetools.TTLCache[str, Any] = cachetools.TTLCache(max_users, ttl_seconds)
        self._states: cachetools.LRUCache[str, UserState] = cachetools.LRUCache(max_states)
        self._lock = lock if lock is not None else threading.Lock()
        self.hits = 0
        self.misses = 0
        self.repeats = 0  # events on an item their user had already consumed, over all users (the
        self.consumed_events = 0  # population's repeat rate: the prior of consumed_policy=learned)
        self.repairs = 0  # profiles whose future clock was repaired (metrics)

    def __len__(self) -> int:
        with self._lock:
            return len(self._profiles)

    def clear(self) -> None:
        with self._lock:
            self._profiles.clear()
            self._states.clear()

    def close(self) -> None:
        pass


def log_repair(source: str, user_id: str, ahead: float, salt: str = "") -> None:
    log.warning("profile of user %s from %s had its decay clock %.0f s ahead of now (a future event folded by an "
                "older build, or the server clock went back); repaired: its events after now count as at now",
                log_name(user_id, salt), source, ahead)
