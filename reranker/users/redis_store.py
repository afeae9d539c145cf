"""RedisProfileStore: what a profile store in one Redis (or a Redis Cluster) shared by all replicas
needs whatever it stores: failover to an in-process fallback and replay, WAIT for replicas, Cluster
routing, scripts run per user, dropping an unreadable value. The profile itself, its key and the
compare-and-set write are CompactRedisProfileStore's (compact_redis.py): one layout, one fold
(compact.fold_events), in Python, for every store.

Redis Cluster: a `redis_url` of `redis+cluster://host:port` (or `rediss+cluster://`) names any node of
a cluster; the client (redis-py's RedisCluster) discovers the others and follows MOVED/ASK redirects,
so a slot migration is invisible to the store. The Lua scripts touch only their KEYS, which all
carry the same `{user_id}` hash tag, so one user's update runs on one node; the batch pipeline
fans out by node. A node that fails (a failover in progress) fails that call like a lost single
Redis: the store serves from the fallback and replays once the cluster answers again.

An unreadable value at one user's key (a key of another type, junk, a wrong size, an id that is not
UTF-8, a number that is not finite) is that user's problem alone: the user reads as new, and the
store deletes the user's key with a compare-and-delete on what it read (RESET_SCRIPT), counted by
reason (`unreadable_reasons`) and logged under the user's hash (profiles.log_name). A script's error
reply is returned for its user only; the user's key is read again, dropped if unreadable, and its
events fold into a new profile. An error reply whose user reads fine is Redis' own: the store fails
over (below).

Redis down: the store never raises to the service. A failed call marks the store degraded for
`retry_seconds` and serves from an in-process fallback store instead: events recorded meanwhile go
there (so this replica still personalizes them) and into a bounded replay buffer, which a
background thread writes to Redis (idempotently, by event id) once Redis answers again; then the
fallback is cleared. The transition is logged and visible as `degraded` / `last_error` / `failovers`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from reranker.errors import Overloaded
from reranker.users.pending import PendingEvents
from reranker.users.profiles import (
    LocalStore, ProfileConfig, UnreadableProfile, UserState, log_name,
)
from reranker.types import Event, RecordResult

if TYPE_CHECKING:
    from reranker.config import RedisSettings

log = logging.getLogger(__name__)

# Deletes one user's keys if each still holds what was read (its DUMP; '' = absent): an unreadable
# value is dropped, never a value that another replica wrote meanwhile. 1 = deleted.
RESET_SCRIPT = r"""
for i, key in ipairs(KEYS) do
  if (redis.call('DUMP', key) or '') ~= ARGV[i] then return 0 end
end
redis.call('DEL', unpack(KEYS))
return 1
"""

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def redis_client(url: str, *, timeout_s: float, connect_timeout_s: float) -> redis.Redis | RedisCluster:
    """A client for `url`: one Redis (redis://, rediss://, unix://) or a Redis Cluster
    (redis+cluster://host:port, any node; rediss+cluster:// for TLS). No client-side retries of a
    failed call: the caller fails over at once (the replay buffer is the retry). Cluster redirects
    (MOVED, ASK, TRYAGAIN during a slot migration) are followed by the cluster client regardless."""
    if is_cluster_url(url):
        plain = url.replace("+cluster", "", 1)
        return RedisCluster.from_url(plain, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s,
                                     retry=Retry(NoBackoff(), 0))
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s,
                                retry=Retry(NoBackoff(), 0))


# What a failed call raises: a cluster client also raises RedisClusterException (not a RedisError),
# e.g. when no node of the cluster answers or a slot is not covered during a failover.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)

_REPLAY_CHUNK = 500


def value_of(reply: object) -> object:
    """A read of one user's key as replied in a pipeline: a key of another type (WRONGTYPE) is that
    user's unreadable value; any other error is Redis' and is raised."""
    if isinstance(reply, Exception):
        if isinstance(reply, redis.ResponseError) and "WRONGTYPE" in str(reply):
            raise UnreadableProfile("a key of the user holds another type of value", "wrong_type")
        raise reply
    return reply


def _redacted(text: str) -> str:
    """An error message without the user ids that Redis and redis-py quote in key names."""
    return re.sub(r"\{[^{}]*\}", "{...}", text)


class RedisProfileStore:
    """The shared store's transport (module docstring); a subclass names the user's keys (`keys`),
    writes (`_apply_remote`), reads (`_get_remote`) and says what is unreadable (`_queue_check`,
    `_check`)."""

    backend = "redis"
    layout = ""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        config: ProfileConfig,
        *,
        write_client: redis.Redis | RedisCluster | None = None,
        fallback: LocalStore,
        ttl_seconds: float,
        prefix: str = "reranker",
        retry_seconds: float = 5.0,
        replay_limit: int = 10_000,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 2000,
        pending_path: str = "",
        clock: object = time.monotonic,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.dim = config.dim
        self._client = client  # reads on the Rerank path: short timeout
        self._writer = write_client or client  # event batches: may take longer
        self._script_shas: dict[str, str] = {}  # script text -> its SHA1 as loaded
        self._fallback = fallback
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._prefix = prefix
        self._retry_seconds = retry_seconds
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms
        self._replay: deque[tuple[Event, np.ndarray | None]] = deque(maxlen=replay_limit)
        self._pending = PendingEvents(pending_path) if pending_path else None
        self._clock = clock
        self._now = now  # wall clock: is a profile's decay clock ahead of it?
        self.repairs = 0  # profiles whose future clock was repaired (metrics)
        self.unreadable = 0  # users whose unreadable value was dropped (metrics, by reason below)
        self.unreadable_reasons: dict[str, int] = {}
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._topology_stale = False  # a cluster's node -> slot table to fetch again before retrying
        self._replaying = False
        self._replay_thread: threading.Thread | None = None
        self.degraded = False
        self.last_error = ""
        self.failovers = 0  # calls served by the fallback because Redis failed
        self.hits = 0
        self.misses = 0
        self.replay_dropped = 0
        self._repeats = self._consumed_events = 0  # written through this replica (see `repeats`)
        if self._pending is not None:
            self._replay.extend(self._pending.load(self.dim))

    @classmethod
    def from_settings(cls, s: RedisSettings, config: ProfileConfig, *, fallback: LocalStore,
                      ttl_seconds: float, snapshot_path: str = "", now: Callable[[], float] = time.time,
                      **extra: object) -> RedisProfileStore:
        """From the redis section; `ttl_seconds` and `snapshot_path` (the replay buffer is kept next to
        the snapshot at shutdown) come from the users section."""
        timeout = s.redis_timeout_ms / 1000.0
        write_timeout = s.redis_write_timeout_ms / 1000.0
        client = redis_client(s.redis_url, timeout_s=timeout, connect_timeout_s=timeout)
        writer = redis_client(s.redis_url, timeout_s=write_timeout, connect_timeout_s=timeout)
        store = cls(
            client, config, write_client=writer, fallback=fallback, ttl_seconds=ttl_seconds, prefix=s.redis_prefix,
            retry_seconds=s.redis_retry_seconds, replay_limit=s.redis_replay_events, now=now,
            wait_replicas=s.redis_wait_replicas, wait_timeout_ms=max(1, int(s.redis_write_timeout_ms)),
            pending_path=f"{snapshot_path}.redis-pending" if snapshot_path else "", **extra,
        )
        store._start_replay()  # events kept at the last shutdown, if any
        return store

    def apply(self, events: Sequence[tuple[Event, np.ndarray | None]], now: float) -> RecordResult:
        if self._usable():
            try:
                result = self._apply_remote(events, now)
                self._mark_up()
                self._start_replay()
                return result
            except REDIS_ERRORS as exc:
                self._mark_down(exc)
        with self._lock:
            if len(self._replay) + len(events) > (self._replay.maxlen or 0):
                # Dropping the oldest would lose events already acknowledged: refuse these instead.
                self.replay_dropped += len(events)
                raise Overloaded(
                    f"Redis is unreachable and its replay buffer is full ({self._replay.maxlen} events, setting "
                    "redis_replay_events): events are refused until Redis answers again"
                )
            self._replay.extend(events)
        return self._fallback.apply(events, now)

    def _apply_remote(self, events: Sequence[tuple[Event, np.ndarray | None]], now: float) -> RecordResult:
        """Fold the events into the users' profiles in Redis (raises a Redis error to fail over)."""
        raise NotImplementedError

    def _run_per_user(self, script: str, calls: list[tuple[str, list[object]]]) -> list[object]:
        """One EVALSHA of `script` per (user, args), on the user's keys, in one pipeline (fanned out by
        node in a cluster), then the WAITs; a NOSCRIPT (Redis restarted: scripts are not persisted)
        loads it again once. Returns each script's reply; a plain error reply (a key of another
        type, the script failing on a value it read) is returned in its place, for the caller to
        check the user's values. Any other error (Redis out of memory, read-only, ...) is raised."""
        for attempt in (1, 2):
            sha = self._script_shas.get(script)
            if sha is None:
                sha = self._script_shas[script] = self._writer.script_load(script)
            pipe = self._writer.pipeline(transaction=False)
            users = [user_id for user_id, _ in calls]
            for user_id, args in calls:
                keys = self.keys(user_id)
                # execute_command, not .evalsha: redis-py's cluster pipeline blocks the method (a
                # NOSCRIPT there is not reloaded for it), yet routes the command by its keys.
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            self._queue_waits(pipe, users)
            out = pipe.execute(raise_on_error=False)
            replies, acks = out[: len(users)], out[len(users):]
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                self._script_shas.pop(script, None)
                if attempt == 2:
                    raise next(r for r in replies if isinstance(r, redis.exceptions.NoScriptError))
                continue
            for reply in (*acks, *replies):
                if isinstance(reply, Exception) and type(reply) is not redis.ResponseError:
                    raise reply
            self._check_waits(acks)
            return replies  # type: ignore[no-any-return]
        raise AssertionError("unreachable")

    def _eval(self, client: redis.Redis | RedisCluster, script: str, keys: list[str], args: list[object]) -> object:
        """EVALSHA of `script` on `keys` (loaded on first use, and again after a NOSCRIPT)."""
        for attempt in (1, 2):
            sha = self._script_shas.get(script)
            if sha is None:
                sha = self._script_shas[script] = client.script_load(script)
            try:
                return client.evalsha(sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                self._script_shas.pop(script, None)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # --- unreadable values -----------------------------------------------------------------------
    def _queue_check(self, pipe: object, user_id: str) -> None:
        """Queue the reads `_check` reads."""
        raise NotImplementedError

    def _check(self, user_id: str, replies: list[object]) -> None:
        """Raise UnreadableProfile unless the user's keys hold a profile this store can read."""
        raise NotImplementedError

    def _drop_unreadable(self, user_id: str, client: redis.Redis | RedisCluster,
                         error: Exception | None = None) -> bool:
        """Read all of one user's keys again and, when a value is unreadable, delete them all if they
        still hold what was read (RESET_SCRIPT): counted by reason and logged under the user's hash;
        the user starts over. True when something was unreadable. When everything reads fine, the
        `error` a script replied (if any) was not the user's values: it is raised."""
        keys = self.keys(user_id)
        pipe = client.pipeline(transaction=True)
        for key in keys:
            pipe.dump(key)
        self._queue_check(pipe, user_id)
        replies = pipe.execute(raise_on_error=False)
        dumps = [value_of(d) or b"" for d in replies[: len(keys)]]
        try:
            self._check(user_id, replies[len(keys):])
        except UnreadableProfile as exc:
            if int(self._eval(client, RESET_SCRIPT, keys, dumps)):  # type: ignore[call-overload]
                with self._lock:
                    self.unreadable += 1
                    self.unreadable_reasons[exc.reason] = self.unreadable_reasons.get(exc.reason, 0) + 1
                log.warning("the Redis profile of user %s is unreadable (%s: %s); its keys were deleted, the user "
                            "starts over", log_name(user_id, self.config.log_salt), exc.reason, exc)
            return True
        if error is not None:
            raise error
        return False

    def _queue_waits(self, pipe: object, users: list[str]) -> None:
        """WAIT for `wait_replicas` replicas after the scripts, on each master that ran some (a
        pipeline sends one node's commands on one connection, in order, so WAIT covers them)."""
        if self._wait_replicas <= 0:
            return
        if isinstance(self._writer, RedisCluster):
            nodes = {}
            for user_id in users:
                node = self._writer.get_node_from_key(self.keys(user_id)[0])
                nodes[node.name] = node
            for node in nodes.values():
                pipe.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms,  # type: ignore[attr-defined]
                                     target_nodes=node)
        else:
            pipe.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms)  # type: ignore[attr-defined]

    def _check_waits(self, acks: list[object]) -> None:
        for ack in acks:  # a WAIT refused (the master demoted to a replica in a failover): not confirmed
            if isinstance(ack, Exception):
                raise ack
        short = [int(a) for a in acks if int(a) < self._wait_replicas]  # type: ignore[call-overload]
        if short:
            raise redis.RedisError(f"only {min(short)} of {self._wait_replicas} replicas acknowledged a write "
                                   f"within {self._wait_timeout_ms} ms (redis_wait_replicas)")

    def _start_replay(self) -> None:
        """Write the events kept during an outage into Redis, in the background (requests don't wait).

        Order does not matter: the fold is exact for out-of-order events and ids de-duplicate.
        """
        with self._lock:
            if not self._replay or self._replaying:
                return
            self._replaying = True

        def run() -> None:
            try:
                self._flush_replay()
            except REDIS_ERRORS as exc:
                self._mark_down(exc)
            finally:
                self._replaying = False

        self._replay_thread = threading.Thread(target=run, name="redis-replay", daemon=True)
        self._replay_thread.start()

    def _flush_replay(self) -> None:
        with self._lock:
            if not self._replay:
                return
            pending = list(self._replay)
            self._replay.clear()
        try:
            while pending:
                self._apply_remote(pending[:_REPLAY_CHUNK], time.time())
                del pending[:_REPLAY_CHUNK]
        except REDIS_ERRORS:
            with self._lock:
                self._replay.extendleft(reversed(pending))
            raise
        self._fallback.clear()
        if self._pending is not None:
            self._pending.remove()
        log.info("replayed the events recorded while Redis was unavailable")

    # --- reads -----------------------------------------------------------------------------------
    def get(self, user_id: str, *, recent: bool = True) -> UserState | None:
        """The user's state from Redis; None for a new user, and for one whose value is unreadable
        (dropped: see `_drop_unreadable`); the fallback's while Redis is unavailable."""
        if self._usable():
            try:
                try:
                    state = self._get_remote(user_id, recent)
                except UnreadableProfile:
                    state = None
                    self._drop_unreadable(user_id, self._client)
                except redis.ResponseError as exc:
                    if type(exc) is not redis.ResponseError:
                        raise
                    state = None
                    self._drop_unreadable(user_id, self._client, exc)  # raises it if the values read fine
                if state is None:
                    self.misses += 1
                else:
                    self.hits += 1
                self._mark_up()
                self._start_replay()
                return state
            except REDIS_ERRORS as exc:
                self._mark_down(exc)
        return self._fallback.get(user_id, recent=recent)

    @property
    def repeats(self) -> int:
        """Repeats among the events this replica wrote (to Redis, or to its fallback during an outage)."""
        return self._repeats + self._fallback.repeats

    @property
    def consumed_events(self) -> int:
        return self._consumed_events + self._fallback.consumed_events

    def __len__(self) -> int:
        """Users held in this process: the outage fallback's (0 while Redis is healthy)."""
        return len(self._fallback)

    # --- health ----------------------------------------------------------------------------------
    def _get_remote(self, user_id: str, with_recent: bool = True) -> UserState | None:
        """The user's state from Redis (UnreadableProfile for a value this store cannot read)."""
        raise NotImplementedError

    def _usable(self) -> bool:
        if not self.degraded:
            return True
        if self._clock() < self._down_until:  # type: ignore[operator]
            return False
        if self._topology_stale:
            # A cluster client refreshes its node -> slot table on a failed call, but one taken
            # while a failover was in progress still names the dead master (redis-py then keeps
            # dialing it); ask the cluster again before retrying.
            self._topology_stale = False
            try:
                for client in (self._client, self._writer):
                    if isinstance(client, RedisCluster):
                        client.nodes_manager.initialize()
            except REDIS_ERRORS as exc:
                self._mark_down(exc)
                return False
        return True

    def _mark_down(self, exc: Exception) -> None:
        was = self.degraded
        self.failovers += 1
        self.degraded = True
        self._topology_stale = True
        self.last_error = _redacted(f"{type(exc).__name__}: {exc}")
        self._down_until = self._clock() + self._retry_seconds  # type: ignore[operator]
        if not was:
            log.warning("Redis profile store unavailable (%s); using the in-process fallback for %.0f s",
                        self.last_error, self._retry_seconds)

    def _mark_up(self) -> None:
        if self.degraded:
            log.info("Redis profile store is back")
        self.degraded = False

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except REDIS_ERRORS:
            return False

    def close(self) -> None:
        if self._replay_thread is not None:  # a background replay holds events: let it finish first
            self._replay_thread.join(timeout=30)
        try:
            self._flush_replay()
        except REDIS_ERRORS as exc:
            if self._pending is None:
                log.error("could not replay %d events into Redis at shutdown (%s); they are lost: set snapshot_path "
                          "to keep them in a file until the next start", len(self._replay), _redacted(str(exc)))
            else:
                log.warning("could not replay %d events into Redis at shutdown (%s); kept in %s for the next start",
                            len(self._replay), _redacted(str(exc)), self._pending.path)
        if self._pending is not None and self._replay:
            with self._lock:
                self._pending.save(list(self._replay))
        self._client.close()
        self._writer.close()
