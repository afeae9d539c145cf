"""User profile stores: where the per-user state of the user model lives.

A store folds events (with their item vectors) into per-user state in O(d) per event and hands out
an immutable `UserState` for scoring; the math is in usermodel.py. Two stores implement the
`ProfileStore` protocol:

* `InProcessProfileStore` (default): a TTL + LRU bounded dict in this process.
* `RedisProfileStore` (redis_store.py): one Redis shared by many replicas.

Per user the state is: the decayed long-term sum L and session sum S (float64, d each) with their
reference time, counters,
the last `max_recent` events (without text), the newest `max_history` events that had a vector
(their vectors too; the session vector and attention pooling use them), and the 64-bit hashes of
the last `max_event_ids` event ids (idempotency: a replayed event id is not counted twice).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import math
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import cachetools
import numpy as np

from reranker.users import usermodel
from reranker.history import CandidateHistory
from reranker.itemkeys import item_key, item_keys
from reranker.users.consumed import ConsumedItems, hours_between
from reranker.types import Event, EventType, RecordResult

if TYPE_CHECKING:
    from reranker.config import Settings

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
    def from_settings(cls, s: Settings, dim: int) -> ProfileConfig:
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
            log_salt=s.log_user_salt,
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
    # in-process store shares one UserState per profile version (see InProcessProfileStore.get).
    derived: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)


def user_vector(state: UserState | None, settings: Settings) -> np.ndarray | None:
    """u = normalize((1 - m) L/|L| + m S/|S|), or None for a cold user (see usermodel.py).

    The one recipe for the user vector: the server and `reranker train` both call it.
    """
    if state is None:
        return None
    return usermodel.mix(state.long_term, session_of(state, settings), settings.session_mix)


def session_of(state: UserState, settings: Settings) -> np.ndarray:
    """S of the state; rebuilt from the vector history for a state saved before S was kept."""
    if state.session is not None:
        return state.session
    return usermodel.decayed_sum(state.history, state.ref_time, usermodel.decay_rate(settings.session_half_life_seconds))


def candidate_history(
    state: UserState,
    settings: Settings,
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
    else:
        unknown = (keys == 0).nonzero()[0]
        if unknown.size:
            keys = keys.copy()
            keys[unknown] = item_keys([item_ids[i] for i in unknown.tolist()])
    # Looked up once; the per-candidate columns are filled at the few consumed positions only.
    pos, hit = consumed.positions(keys)
    at = hit.nonzero()[0]
    counts, hours = np.zeros(n), np.full(n, math.inf)
    if not at.size:
        return CandidateHistory(counts, hours, consumed.repeat_rate)
    rows = pos[at]
    counts[at] = consumed.counts[rows]
    hours[at] = hours_between(consumed.last[rows], float(consumed.last.max()))
    mass, session_mass = np.zeros(n), np.zeros(n)
    mass[at], session_mass[at] = consumed.mass[rows], consumed.session_mass[rows]
    history = state.history
    history_keys = derived(state, "history_keys", lambda: item_keys(history.item_ids))
    own = history_keys[:, None] == keys[None, :]
    own_rows = own if own.any() else None  # None: consumed, but not among the history rows
    excluded = (hit & np.asarray(has_vector, dtype=bool)).nonzero()[0]
    user_vectors = np.zeros((0, state.long_term.shape[0]), dtype=np.float32)
    if excluded.size and user_vector is not None:
        session = derived(state, "session_vector", lambda: session_of(state, settings))
        user_vectors = usermodel.mix_without(
            state.long_term, session, settings.session_mix, np.asarray(vectors)[excluded], mass[excluded],
            session_mass[excluded],
        )
    else:
        excluded = excluded[:0]
    return CandidateHistory(counts, hours, consumed.repeat_rate, excluded, user_vectors, own_rows)


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


class _SeenIds:
    """The last `capacity` event-id hashes of one user: a numpy ring, 8 bytes per id, grown lazily."""

    __slots__ = ("hashes", "size", "next")

    def __init__(self) -> None:
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.size = 0
        self.next = 0

    def __contains__(self, hashed: int) -> bool:
        return bool(self.size) and bool((self.hashes[: self.size] == np.uint64(hashed)).any())

    def add(self, hashed: int, capacity: int) -> None:
        if self.size < capacity and self.size == len(self.hashes):
            grown = np.zeros(min(capacity, max(8, 2 * len(self.hashes))), dtype=np.uint64)
            grown[: self.size] = self.hashes
            self.hashes = grown
        if self.size < capacity:
            self.hashes[self.size] = hashed
            self.size += 1
            self.next = self.size % capacity
        else:
            self.hashes[self.next] = hashed
            self.next = (self.next + 1) % capacity

    def in_order(self) -> np.ndarray:
        """Oldest first (for snapshots)."""
        if self.size < len(self.hashes) or self.next == 0:
            return self.hashes[: self.size].copy()
        return np.concatenate([self.hashes[self.next : self.size], self.hashes[: self.next]])


# A recent event as kept in memory: (item_id, type, timestamp, event_id, weight). A tuple of
# atoms is untracked by Python's cyclic GC, so a million users' recent events cost the collector
# nothing (an Event object each would make every full collection walk them all).
RecentEvent = tuple[str, int, float, str, "float | None"]


def _recent_tuple(event: Event) -> RecentEvent:
    return (event.item_id, int(event.type), event.timestamp, event.event_id, event.weight)


def _recent_event(user_id: str, row: RecentEvent) -> Event:
    item_id, kind, timestamp, event_id, weight = row
    return Event(user_id, item_id, EventType(kind), timestamp, event_id, None, weight)


@dataclass(slots=True)
class _Profile:
    long_term: np.ndarray
    ref_time: float = 0.0
    folded: int = 0
    event_count: int = 0
    updated_at: float = 0.0
    recent: deque[RecentEvent] = dataclasses.field(default_factory=deque)
    hist_times: list[float] = dataclasses.field(default_factory=list)
    hist_items: list[str] = dataclasses.field(default_factory=list)
    hist_weights: list[float] = dataclasses.field(default_factory=list)
    hist_vectors: list[np.ndarray] = dataclasses.field(default_factory=list)
    seen: _SeenIds = dataclasses.field(default_factory=_SeenIds)
    session: np.ndarray | None = None  # float64 (d,), relative to ref_time; set on the first folded event
    consumed: ConsumedItems = dataclasses.field(default_factory=ConsumedItems.empty)

    def add_history(self, timestamp: float, item_id: str, weight: float, vector: np.ndarray, cap: int) -> None:
        """Insert in event-time order (ties: arrival order), then drop the oldest beyond `cap`."""
        at = bisect.bisect_right(self.hist_times, timestamp)
        for column, value in (
            (self.hist_times, timestamp), (self.hist_items, item_id),
            (self.hist_weights, weight), (self.hist_vectors, vector),
        ):
            column.insert(at, value)  # type: ignore[attr-defined]
            if len(column) > cap:  # type: ignore[arg-type]
                del column[0]  # type: ignore[attr-defined]

    def history(self, dim: int) -> usermodel.History:
        """The vector history as arrays (copies)."""
        if not self.hist_items:
            return usermodel.History.empty(dim)
        return usermodel.History(
            tuple(self.hist_items),
            np.array(self.hist_times, dtype=np.float64),
            np.array(self.hist_weights, dtype=np.float64),
            np.stack(self.hist_vectors),
        )

    def state(self, user_id: str, dim: int, recent: bool = True) -> UserState:
        """A consistent copy (arrays read-only: the store may share it between readers)."""
        history = self.history(dim)
        long_term = self.long_term.copy()
        session = None if self.session is None else self.session.copy()
        for array in (long_term, session, history.timestamps, history.weights, history.vectors):
            if array is not None:
                array.flags.writeable = False
        return UserState(
            user_id, long_term, self.ref_time, self.event_count, self.updated_at,
            tuple(_recent_event(user_id, row) for row in self.recent) if recent else (), history, session,
            self.consumed.freeze(),
        )

    def repair_future_clock(self, now: float, config: ProfileConfig) -> bool:
        """Re-anchor a reference time more than `max_clock_ahead` after `now` (see
        usermodel.repair_future_clock); True when it was repaired."""
        if self.folded == 0 or not self.ref_time > now + config.max_clock_ahead:
            return False
        history = self.history(config.dim)
        session = usermodel.decayed_sum(history, self.ref_time, config.session_rate) if self.session is None else self.session
        fixed = usermodel.repair_future_clock(
            self.long_term, session, self.ref_time, history, now, config.decay_rate, config.session_rate
        )
        self.consumed = repaired_consumed(self.consumed, history, self.ref_time, fixed, now, config)
        self.long_term, self.session, self.ref_time = fixed.long_term, fixed.session, fixed.ref_time
        self.hist_times = fixed.history.timestamps.tolist()
        self.recent = deque(
            ((item_id, kind, min(ts, now), event_id, weight) for item_id, kind, ts, event_id, weight in self.recent),
            maxlen=self.recent.maxlen,
        )
        return True


def repaired_consumed(
    consumed: ConsumedItems, history: usermodel.History, ref_time: float, fixed: usermodel.Repaired, now: float,
    config: ProfileConfig,
) -> ConsumedItems:
    """The consumed-item memory after a future-clock repair (usermodel.repair_future_clock), in
    step with the repaired L and S: newest times clamped to now; an exact repair rescales every
    mass as L and S were rescaled and moves the future rows' terms to now; a rebuild recounts the
    masses from the history rows L and S were rebuilt from. `history` and `ref_time` are before."""
    out = consumed.copy()
    out.last = np.minimum(out.last, now)
    if not len(out):
        return out
    pos, hit = out.positions(item_keys(history.item_ids))
    future = history.timestamps > now
    for rate, masses in ((config.decay_rate, out.mass), (config.session_rate, out.session_mass)):
        if fixed.exact:
            taken = usermodel.decayed_weights(history, ref_time, rate) * future
            np.subtract.at(masses, pos[hit], taken[hit])
            masses *= math.exp(rate * (ref_time - now))
            np.add.at(masses, pos[hit], (history.weights * future)[hit])
        else:
            masses[:] = 0.0
            np.add.at(masses, pos[hit], usermodel.decayed_weights(fixed.history, now, rate)[hit])
    return out


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
    """What the in-process stores (full and compact layouts) share: at most `max_users` profiles,
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


class InProcessProfileStore(LocalStore):
    """Full-layout profiles (`_Profile`, item vectors copied in) in this process (see LocalStore)."""

    backend = "in-process"
    layout = "full"

    def apply(self, events: Sequence[tuple[Event, np.ndarray | None]], now: float) -> RecordResult:
        """Fold events in order. The lock is taken per event, so a large batch never holds up a
        Rerank (which runs on the server's event loop) for longer than one event's fold."""
        accepted = duplicates = without_vector = 0
        for event, vector in events:
            with self._lock:
                outcome = self._apply_one(event, vector, now)
            if outcome == "duplicate":
                duplicates += 1
                continue
            accepted += 1
            without_vector += outcome == "no vector"
        return RecordResult(accepted, duplicates, without_vector)

    def _apply_one(self, event: Event, vector: np.ndarray | None, now: float) -> str:
        """One event, under the lock: "duplicate", "no vector" or "folded"."""
        c = self.config
        profile = self._profiles.get(event.user_id)
        if profile is None:
            profile = _Profile(
                np.zeros(self.dim, dtype=np.float64), recent=deque(maxlen=c.max_recent), session=np.zeros(self.dim)
            )
        self._profiles[event.user_id] = profile  # (re)insert refreshes the TTL
        if event.event_id:
            hashed = event_id_hash(event.event_id)
            if hashed in profile.seen:
                return "duplicate"
            profile.seen.add(hashed, c.max_event_ids)
        self._states.pop(event.user_id, None)
        profile.event_count += 1
        profile.updated_at = now
        profile.recent.append(_recent_tuple(event))
        key = item_key(event.item_id)
        if vector is None:
            self._count_consumed(profile.consumed.add(key, event.timestamp, 0.0, c.max_consumed))
            return "no vector"
        weight = c.weight_of(event)
        if profile.session is None:
            profile.session = np.zeros(self.dim)
        previous, first = profile.ref_time, profile.folded == 0
        profile.ref_time = usermodel.fold(
            profile.long_term, profile.ref_time, first, event.timestamp, weight, vector, c.decay_rate,
            profile.session, c.session_rate,
        )
        profile.consumed.rescale(
            usermodel.frame_factor(previous, profile.ref_time, first, c.decay_rate),
            usermodel.frame_factor(previous, profile.ref_time, first, c.session_rate),
        )
        mass = weight * usermodel.frame_factor(event.timestamp, profile.ref_time, False, c.decay_rate)
        session_mass = weight * usermodel.frame_factor(event.timestamp, profile.ref_time, False, c.session_rate)
        self._count_consumed(profile.consumed.add(key, event.timestamp, mass, c.max_consumed, session_mass))
        profile.folded += 1
        vector32 = np.array(vector, dtype=np.float32)  # a copy: never keep a whole batch array alive
        profile.add_history(event.timestamp, event.item_id, weight, vector32, c.max_history)
        return "folded"

    def _count_consumed(self, repeat: bool) -> None:
        self.consumed_events += 1
        self.repeats += repeat

    def get(self, user_id: str, *, recent: bool = True) -> UserState | None:
        """Without recent events, the state of a recently read user is shared, not rebuilt: one
        UserState per profile version for up to `max_states` users (derived values memoized on
        it, see `derived`), dropped on the user's next event."""
        with self._lock:
            profile = self._profiles.get(user_id)
            if profile is None:
                self.misses += 1
                self._states.pop(user_id, None)
                return None
            self.hits += 1
            if recent or not self._states.maxsize:
                return profile.state(user_id, self.dim, recent)
            state = self._states.get(user_id)
            if state is None:
                state = self._states[user_id] = profile.state(user_id, self.dim, recent=False)
            return state

    def held_bytes(self, user_id: str) -> int:
        """Bytes held for one user (arrays, history lists, recent-event tuples, id ring); 0 if unknown.
        Every part is capped by a setting, so this is bounded however many events the user sends."""
        with self._lock:
            p = self._profiles.get(user_id)
            if p is None:
                return 0
            total = p.long_term.nbytes + (0 if p.session is None else p.session.nbytes) + p.seen.hashes.nbytes
            total += p.consumed.nbytes
            total += sum(v.nbytes for v in p.hist_vectors) + sum(map(sys.getsizeof, p.hist_items))
            total += 8 * 2 * len(p.hist_times)
            return total + sum(sys.getsizeof(row) + sum(map(sys.getsizeof, row)) for row in p.recent)

    # --- snapshot support ------------------------------------------------------------------------
    def export_chunks(self, size: int) -> Iterator[list[tuple[str, _Profile]]]:
        """Consistent copies of all live profiles, `size` users per list (see export_in_chunks)."""
        return export_in_chunks(self._profiles, self._lock, size, _copy)

    def restore(self, user_id: str, profile: _Profile, now: float | None = None) -> bool:
        """Put a profile (from a snapshot) in place; with `now`, a clock more than `max_clock_ahead`
        after it is repaired first (logged, counted). True when it was repaired."""
        ahead = 0.0 if now is None else profile.ref_time - now
        repaired = now is not None and profile.repair_future_clock(now, self.config)
        if repaired:
            log_repair("snapshot", user_id, ahead, self.config.log_salt)
        with self._lock:
            self.repairs += repaired
            self._profiles[user_id] = profile
            self._states.pop(user_id, None)
        return repaired


def _copy(profile: _Profile) -> _Profile:
    seen = _SeenIds()
    seen.hashes, seen.size, seen.next = profile.seen.hashes.copy(), profile.seen.size, profile.seen.next
    return dataclasses.replace(
        profile,
        long_term=profile.long_term.copy(),
        session=None if profile.session is None else profile.session.copy(),
        recent=deque(profile.recent, maxlen=profile.recent.maxlen),
        hist_times=list(profile.hist_times),
        hist_items=list(profile.hist_items),
        hist_weights=list(profile.hist_weights),
        hist_vectors=list(profile.hist_vectors),
        seen=seen,
        consumed=profile.consumed.copy(),
    )


def log_repair(source: str, user_id: str, ahead: float, salt: str = "") -> None:
    log.warning("profile of user %s from %s had its decay clock %.0f s ahead of now (a future event folded by an "
                "older build, or the server clock went back); repaired: its events after now count as at now",
                log_name(user_id, salt), source, ahead)


# Kept for code written against the first version.
UserProfileStore = InProcessProfileStore
