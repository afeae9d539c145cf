"""CompactRedisProfileStore: compact profiles (compact.py) in Redis or a Redis Cluster.

One string key per user, `<prefix>:{<user_id>}:u`, holding exactly the bytes the in-process compact
store holds (~2-4 KB at 20 events, against ~49 KB in six keys for the full layout). The fold runs in
Python, the same code as in process, and the write is a compare-and-set on the profile's sequence
number (its first 8 bytes) in a short Lua script:

1. GET the profiles of a batch's users (one pipeline, fanned out by node in a cluster);
2. fold each user's events into a copy (the vectors of rows leaving the history are looked up
   here, from the item cache or the catalog) and bump its sequence number;
3. SET each, only if its stored sequence number is still the one read (one pipeline of scripts).

A user written by another replica in between is read and folded again (bounded retries), so
concurrent writers never lose an event and a replayed event id is never counted twice. The key
expires `ttl_seconds` after the user's last event. Everything else (failover to the in-process
fallback, replay, WAIT for replicas, Cluster redirects, dropping an unreadable value: here anything
`compact.decode` refuses, or a key of another type) is RedisProfileStore's.

A user whose profile is still in the six keys of the full layout (`<prefix>:{<user_id>}:p`, `:r`,
`:h`, `:i`, `:c`, `:cz`, written by a build before compact was the only layout) is converted the
first time it is read or written: the full profile is read (legacy.py), turned into the compact
profile that holds the same user model, and written with CONVERT_SCRIPT, which also deletes the old
keys (only while no compact profile exists and the old profile is still the one read). Only a user
without a compact profile is checked for old keys (one EXISTS, pipelined per batch). Old keys whose values cannot be read are deleted (counted as unreadable); the user starts over.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis

from reranker.types import Event, RecordResult
from reranker.users.compact import (
    CompactProfile, CompactProfileStore, VectorLookup, decode, encode, events_by_user, fold_events, repair_future_clock,
    user_state,
)
from reranker.users import legacy
from reranker.users.profiles import ProfileConfig, UnreadableProfile, UserState, log_name, log_repair
from reranker.users.redis_store import RedisProfileStore, value_of

log = logging.getLogger(__name__)

# KEYS[1]: the profile; ARGV: the sequence number read (8 bytes, '' = there was none), the new
# profile, the TTL in ms. 1 = written, 0 = another writer came first.
CAS_SCRIPT = r"""
local cur = redis.call('GET', KEYS[1])
if cur then
  if string.sub(cur, 1, 8) ~= ARGV[1] then return 0 end
elseif ARGV[1] ~= '' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS[1]: the compact profile, KEYS[2..]: the full layout's keys (`p` first); ARGV: the full
# profile's `seq` as read ('' = none), the compact profile, its TTL in ms. 1 = converted; 0 = a
# compact profile exists already, or the full one changed since it was read.
CONVERT_SCRIPT = r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if (redis.call('HGET', KEYS[2], 'seq') or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', unpack(KEYS, 2))
return 1
"""

MAX_ROUNDS = 16  # compare-and-set rounds for one batch before the call fails (and the fallback takes it)


def profile_key(prefix: str, user_id: str) -> str:
    """The one key a user's compact profile is kept at (the `{user_id}` hash tag: one Cluster slot)."""
    return f"{prefix}:{{{user_id}}}:u"


def read_profile(client: Any, user_id: str, dim: int, prefix: str = "reranker") -> CompactProfile | None:
    """The user's profile as a store keeps it in Redis, decoded, or None (for tools that check what
    was stored; the store itself reads through its fallback and repair paths)."""
    blob = client.get(profile_key(prefix, user_id))
    return None if blob is None else decode(blob, dim)


class CompactRedisProfileStore(RedisProfileStore):
    layout = "compact"

    def __init__(self, client: Any, config: ProfileConfig, *, lookup: VectorLookup, fallback: CompactProfileStore,
                 **kwargs: Any) -> None:
        super().__init__(client, config, fallback=fallback, **kwargs)  # type: ignore[arg-type]
        self.lookup = lookup
        self.converted = 0  # users whose full-layout keys were converted (see the module docstring)

    def keys(self, user_id: str) -> list[str]:
        return [profile_key(self._prefix, user_id)]

    # --- writes ----------------------------------------------------------------------------------
    def _apply_remote(self, events: Sequence[tuple[Event, np.ndarray | None]], now: float) -> RecordResult:
        by_user = events_by_user(events)
        wall = self._now()
        total = RecordResult()
        pending = list(by_user)
        for rounds in range(MAX_ROUNDS):
            read = self._writer.pipeline(transaction=False)
            for user_id in pending:
                read.get(self.keys(user_id)[0])
            blobs = read.execute(raise_on_error=False)
            old = self._with_old_keys([u for u, blob in zip(pending, blobs) if blob is None])
            writes, retry = [], []
            for user_id, blob in zip(pending, blobs):
                write = self._folded(user_id, blob, user_id in old, by_user[user_id], now, wall)
                if write is None:
                    retry.append(user_id)  # read again (new, or converted) in the next round
                else:
                    writes.append(write)
            written = self._run_per_user(CAS_SCRIPT, [(user_id, [expected, blob, self._ttl_ms])
                                                      for user_id, expected, blob, _, _ in writes])
            for (user_id, _, _, result, repeats), ok in zip(writes, written):
                if isinstance(ok, Exception):  # the key turned into another type meanwhile
                    self._drop_unreadable(user_id, self._writer, ok)
                    retry.append(user_id)
                elif int(ok) == 1:  # type: ignore[call-overload]
                    total = total + result
                    with self._lock:
                        self._repeats += repeats
                        self._consumed_events += result.accepted
                else:
                    retry.append(user_id)
            pending = retry
            if not pending:
                return total
            time.sleep(random.uniform(0.0, 0.001 * (rounds + 1)))  # out of step with the other writer
        raise redis.RedisError(f"{len(pending)} users were written by other replicas {MAX_ROUNDS} times in a row")

    def _folded(self, user_id: str, reply: object, has_old_keys: bool, events: list[tuple[Event, np.ndarray | None]],
                now: float, wall: float) -> tuple[str, bytes, bytes, RecordResult, int] | None:
        """(user, sequence number read, profile with the events folded in, counts, repeats) for the
        compare-and-set; None when the user must be read again: its value was unreadable (dropped),
        or its full-layout keys were just converted."""
        try:
            blob = value_of(reply)
            if blob is None and has_old_keys:
                self._convert(user_id, self._writer)
                return None
            p = CompactProfile.new(self.dim) if blob is None else decode(blob, self.dim)  # type: ignore[arg-type]
        except UnreadableProfile:
            self._drop_unreadable(user_id, self._writer)
            return None
        expected = b"" if blob is None else bytes(blob[:8])  # type: ignore[index]
        self._repair(user_id, p, wall)
        result, repeats = fold_events(p, events, now, self.config, self.lookup)
        p.seq += 1
        return user_id, expected, encode(p), result, repeats

    def _repair(self, user_id: str, p: CompactProfile, now: float) -> None:
        """Repair a decay clock more than `max_clock_ahead` after `now` (logged, counted)."""
        ahead = p.ref_time - now
        if repair_future_clock(p, now, self.config, self.lookup):
            self.repairs += 1
            log_repair("redis", user_id, ahead, self.config.log_salt)

    # --- the full layout's keys ----------------------------------------------------------------------
    def _with_old_keys(self, users: list[str]) -> set[str]:
        """Those of `users` (without a compact profile) that have full-layout keys: one round trip, only
        when a batch has users Redis holds no compact profile for."""
        if not users:
            return set()
        pipe = self._writer.pipeline(transaction=False)
        for user_id in users:
            pipe.exists(legacy.legacy_keys(self._prefix, user_id)[0])
        return {user_id for user_id, n in zip(users, pipe.execute()) if int(n)}

    def _convert(self, user_id: str, client: Any) -> None:
        """Convert the user's full-layout keys into a compact profile (module docstring); their
        values unreadable: deleted, counted, the user starts over."""
        keys = legacy.legacy_keys(self._prefix, user_id)
        pipe = client.pipeline(transaction=True)
        pipe.hget(keys[0], "seq")
        legacy.queue_legacy_reads(pipe, keys)
        replies = pipe.execute(raise_on_error=False)
        try:
            seq = value_of(replies[0])
            read = legacy.redis_profile([value_of(reply) for reply in replies[1:]], self.config)
        except UnreadableProfile as exc:
            client.delete(*keys)
            with self._lock:
                self.unreadable += 1
                self.unreadable_reasons[exc.reason] = self.unreadable_reasons.get(exc.reason, 0) + 1
            log.warning("the full-layout Redis profile of user %s is unreadable (%s: %s); its keys were deleted, "
                        "the user starts over", log_name(user_id, self.config.log_salt), exc.reason, exc)
            return
        if read is None:
            return
        full, ttl_ms = read
        p = legacy.to_compact(full, self.config)
        self._repair(user_id, p, self._now())
        args = [seq or b"", encode(p), ttl_ms if ttl_ms > 0 else self._ttl_ms]
        if int(self._eval(client, CONVERT_SCRIPT, [self.keys(user_id)[0], *keys], args)):  # type: ignore[call-overload]
            with self._lock:
                self.converted += 1

    # --- unreadable values -----------------------------------------------------------------------
    def _queue_check(self, pipe: Any, user_id: str) -> None:
        pipe.get(self.keys(user_id)[0])

    def _check(self, user_id: str, replies: list[object]) -> None:
        blob = value_of(replies[0])
        if blob is not None:
            decode(blob, self.dim)  # type: ignore[arg-type]

    # --- reads -----------------------------------------------------------------------------------
    def _get_remote(self, user_id: str, with_recent: bool = True) -> UserState | None:
        """The user's state; UnreadableProfile when the key holds anything but a compact profile."""
        key = self.keys(user_id)[0]
        blob = self._client.get(key)  # a key of another type: `get` checks the user's values
        if blob is None:
            if not self._client.exists(legacy.legacy_keys(self._prefix, user_id)[0]):
                return None
            self._convert(user_id, self._client)
            blob = self._client.get(key)
            if blob is None:
                return None
        p = decode(blob, self.dim)  # type: ignore[arg-type]
        if p.event_count == 0:
            return None
        self._repair(user_id, p, self._now())  # the next write stores the repair
        return user_state(user_id, p, self.config, self.lookup, recent=with_recent)
