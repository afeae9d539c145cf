"""RedisProfileStore: user profiles in one Redis shared by all replicas (read-your-writes everywhere).

Keys per user (the `{user_id}` hash tag keeps them in one Redis Cluster slot):

    <prefix>:{<user_id>}:p    hash: lt (L as packed float64), st (S, the same), ref, folded, count, seq, updated
    <prefix>:{<user_id>}:r    list: recent events (JSON), newest first, capped at max_recent
    <prefix>:{<user_id>}:h    sorted set: events with a vector, score = event time, capped at max_history
    <prefix>:{<user_id>}:i    sorted set: 8-byte event-id hashes, capped at max_event_ids
    <prefix>:{<user_id>}:c    hash: 8-byte item key -> (count, newest time, mass, mass frame) as 4 float64
                              (reranker.users.consumed; the mass is in L's frame at `mass frame`, scaled
                              to the current reference time when read), capped at max_consumed
    <prefix>:{<user_id>}:cz   sorted set: item key by newest time (which consumed item to forget first)

Every update of a user is one Lua script run (atomic in Redis), so replicas updating the same user
at the same time never lose an event and a replayed event id is never counted twice. The script
does the same float64 arithmetic as usermodel.fold. All six keys expire `ttl_seconds` after the
user's last event; bound the total with Redis' own `maxmemory` + `volatile-lru` policy.

A user whose decay clock `ref` is more than `max_event_skew_seconds` after now (a future event
folded by an older build), or whose state has no `st` yet (written before the session vector was kept), is repaired
before anything is folded into it and when it is read: the script refuses to fold into it, the
store rebuilds the state in Python (usermodel.repair_future_clock) and writes it back with a
compare-and-set script, then folds. A clock repair is logged and counted (`repairs`).

Redis Cluster: a `redis_url` of `redis+cluster://host:port` (or `rediss+cluster://`) names any node of
a cluster; the client (redis-py's RedisCluster) discovers the others and follows MOVED/ASK redirects,
so a slot migration is invisible to the store. The Lua scripts touch only their KEYS, which all
carry the same `{user_id}` hash tag, so one user's update runs on one node; the batch pipeline
fans out by node. A node that fails (a failover in progress) fails that call like a lost single
Redis: the store serves from the fallback and replays once the cluster answers again.

An unreadable value at one user's keys (a key of another type, junk, a wrong size, an id that is not
UTF-8, a number that is not finite) is that user's problem alone: the user reads as new, and the
store deletes the user's keys with a compare-and-delete on what it read (RESET_SCRIPT), counted by
reason (`unreadable_reasons`) and logged under the user's hash (profiles.log_name). Writes: the APPLY
script refuses such a hash before writing (-2), and a script's error reply is returned for its user
only; either way the user's keys are read again, dropped if unreadable, and its events fold into a
new profile. An error reply whose user reads fine is Redis' own: the store fails over (below).

Redis down: the store never raises to the service. A failed call marks the store degraded for
`retry_seconds` and serves from an in-process fallback store instead: events recorded meanwhile go
there (so this replica still personalizes them) and into a bounded replay buffer, which a
background thread writes to Redis (idempotently, by event id) once Redis answers again; then the
fallback is cleared. The transition is logged and visible as `degraded` / `last_error` / `failovers`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
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
from reranker.users import usermodel
from reranker.users.pending import PendingEvents
from reranker.itemkeys import item_key
from reranker.users.consumed import ConsumedItems
from reranker.users.profiles import (
    InProcessProfileStore, ProfileConfig, UnreadableProfile, UserState, event_id_hash, log_name, log_repair,
)
from reranker.types import Event, EventType, RecordResult

if TYPE_CHECKING:
    from reranker.config import RedisSettings

log = logging.getLogger(__name__)

APPLY_SCRIPT = r"""
local hkey, rkey, zkey, ikey, ckey, czkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local rate = tonumber(ARGV[1])
local max_recent = tonumber(ARGV[2])
local max_hist = tonumber(ARGV[3])
local max_ids = tonumber(ARGV[4])
local ttl_ms = tonumber(ARGV[5])
local now = ARGV[6]
local dim = tonumber(ARGV[7])
local srate = tonumber(ARGV[8])
local max_ref = tonumber(ARGV[9])
local max_consumed = tonumber(ARGV[10])
local fmt_f = '<' .. string.rep('f', dim)
local fmt_d = '<' .. string.rep('d', dim)

local function finite(x) return x == x and x ~= math.huge and x ~= -math.huge end
local st = redis.call('HMGET', hkey, 'lt', 'ref', 'folded', 'count', 'seq', 'st', 'repeats', 'cevents')
-- A value this script cannot read (not a number, not finite, a vector of another size) is refused
-- before anything is written: -2, and the store drops the user's keys (an unreadable value).
for j = 2, 8 do
  if j ~= 6 and st[j] and not (tonumber(st[j]) and finite(tonumber(st[j]))) then return {-2, 0, 0, 0, 0} end
end
local stored = {}
for _, j in ipairs({1, 6}) do
  if st[j] then
    if #st[j] ~= 8 * dim then return {-2, 0, 0, 0, 0} end
    local v = {struct.unpack(fmt_d, st[j])}
    v[dim + 1] = nil
    local sum = 0.0  -- NaN and inf carry through the sum, which finite sums of weights cannot overflow
    for k = 1, dim do sum = sum + v[k] end
    if not finite(sum) then return {-2, 0, 0, 0, 0} end
    stored[j] = v
  end
end
local ref = tonumber(st[2]) or 0
local folded = tonumber(st[3]) or 0
local count = tonumber(st[4]) or 0
local seq = tonumber(st[5]) or 0
local repeats = tonumber(st[7]) or 0
local cevents = tonumber(st[8]) or 0
if folded > 0 and (ref > max_ref or not st[6]) then
  return {-1, 0, 0, 0, 0}  -- a clock ahead of now, or no session sum yet: the store repairs it first
end
local lt = nil
local ss = nil

-- One event on item `ck` (8-byte key) at time ts whose weights in L's and S's frames at `ref`
-- are `mass` and `smass`. Stored: count, newest time, both masses and the frame they are in.
local function consume(ck, ts, mass, smass)
  cevents = cevents + 1
  local old = redis.call('HGET', ckey, ck)
  local n, last, m, sm = 1, ts, mass, smass
  if old then
    if #old ~= 40 then error('a consumed-item entry of ' .. #old .. ' bytes') end
    local on, olast, om, osm, oref = struct.unpack('<ddddd', old)
    if not (finite(on) and finite(olast) and finite(om) and finite(osm) and finite(oref)) then
      error('a consumed-item entry that is not finite')
    end
    repeats = repeats + 1
    n = on + 1
    if olast > last then last = olast end
    m = om * math.exp(-rate * (ref - oref)) + mass
    sm = osm * math.exp(-srate * (ref - oref)) + smass
  else
    if max_consumed <= 0 then return end
    if redis.call('HLEN', ckey) >= max_consumed then
      local oldest = redis.call('ZRANGE', czkey, 0, 0)
      if oldest[1] then
        redis.call('HDEL', ckey, oldest[1])
        redis.call('ZREM', czkey, oldest[1])
      end
    end
  end
  redis.call('HSET', ckey, ck, struct.pack('<ddddd', n, last, m, sm, ref))
  redis.call('ZADD', czkey, last, ck)
end

local accepted, duplicates, without = 0, 0, 0
for i = 11, #ARGV, 7 do
  local id_hash, ts_s, w, vec, recent, header, ck = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local ts = tonumber(ts_s)
  local dup = false
  if id_hash ~= '' then
    if redis.call('ZSCORE', ikey, id_hash) then
      dup = true
    else
      seq = seq + 1
      redis.call('ZADD', ikey, seq, id_hash)
      redis.call('ZREMRANGEBYRANK', ikey, 0, -(max_ids + 1))
    end
  end
  if dup then
    duplicates = duplicates + 1
  else
    accepted = accepted + 1
    count = count + 1
    seq = seq + 1
    redis.call('LPUSH', rkey, recent)
    if vec == '' then
      without = without + 1
      consume(ck, ts, 0.0, 0.0)
    else
      if lt == nil then
        if stored[1] then lt = stored[1] else lt = {} for k = 1, dim do lt[k] = 0.0 end end
        if stored[6] then ss = stored[6] else ss = {} for k = 1, dim do ss[k] = 0.0 end end
      end
      local v = {struct.unpack(fmt_f, vec)}
      if folded == 0 then ref = ts end
      folded = folded + 1
      if ts >= ref then
        if ts > ref then
          local f = math.exp(-rate * (ts - ref))
          for k = 1, dim do lt[k] = lt[k] * f end
          f = math.exp(-srate * (ts - ref))
          for k = 1, dim do ss[k] = ss[k] * f end
        end
        ref = ts
        for k = 1, dim do lt[k] = lt[k] + w * v[k] end
        for k = 1, dim do ss[k] = ss[k] + w * v[k] end
        consume(ck, ts, w, w)
      else
        local c = w * math.exp(-rate * (ref - ts))
        for k = 1, dim do lt[k] = lt[k] + c * v[k] end
        local sc = w * math.exp(-srate * (ref - ts))
        for k = 1, dim do ss[k] = ss[k] + sc * v[k] end
        consume(ck, ts, c, sc)
      end
      redis.call('ZADD', zkey, ts_s, string.format('%016d', seq) .. header .. vec)
    end
  end
end
if lt ~= nil then
  lt[dim + 1] = nil
  ss[dim + 1] = nil
  redis.call('HSET', hkey, 'lt', struct.pack(fmt_d, unpack(lt, 1, dim)), 'st', struct.pack(fmt_d, unpack(ss, 1, dim)))
end
if accepted > 0 then
  redis.call('HSET', hkey, 'ref', string.format('%.17g', ref), 'folded', folded, 'count', count, 'seq', seq, 'updated', now,
             'repeats', repeats, 'cevents', cevents)
  redis.call('LTRIM', rkey, 0, max_recent - 1)
  redis.call('ZREMRANGEBYRANK', zkey, 0, -(max_hist + 1))
elseif seq > 0 then
  redis.call('HSET', hkey, 'seq', seq)
end
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ttl_ms) end
return {accepted, duplicates, without, repeats - (tonumber(st[7]) or 0), cevents - (tonumber(st[8]) or 0)}
"""

# Replaces a user's L, S, reference time and history rows, if `ref` is still what the repair read.
REPAIR_SCRIPT = r"""
local hkey, zkey = KEYS[1], KEYS[2]
if redis.call('HGET', hkey, 'ref') ~= ARGV[1] then return 0 end
redis.call('HSET', hkey, 'lt', ARGV[2], 'st', ARGV[3], 'ref', ARGV[4])
if ARGV[5] == '1' then
  redis.call('DEL', zkey)
  for i = 6, #ARGV, 2 do redis.call('ZADD', zkey, ARGV[i], ARGV[i + 1]) end
end
return 1
"""

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

_HIST_HEADER = struct.Struct("<ddI")  # timestamp, weight, item id length; then item id, then float32 vector
_SEQ_CHARS = 16
_REPLAY_CHUNK = 500
_KEY_TYPES = ("hash", "list", "zset", "zset", "hash", "zset")  # of keys(): p, r, h, i, c, cz
_FIELDS = ("lt", "ref", "count", "updated", "st", "folded", "repeats", "cevents", "seq")  # of `p`, as read


def _recent_json(event: Event) -> str:
    return json.dumps([event.item_id, int(event.type), event.timestamp, event.event_id, event.weight],
                      separators=(",", ":"))


def _recent_from_json(user_id: str, raw: bytes) -> Event:
    """A recent event as `_recent_json` wrote it (UnreadableProfile for anything else)."""
    try:
        item_id, kind, timestamp, event_id, weight = json.loads(raw)
        if not (isinstance(item_id, str) and isinstance(event_id, str) and isinstance(timestamp, (int, float))
                and (weight is None or isinstance(weight, (int, float)))):
            raise TypeError("a field of the wrong type")
        event = Event(user_id, item_id, EventType(kind), float(timestamp), event_id, None,
                      None if weight is None else float(weight))
    except UnicodeDecodeError:
        raise UnreadableProfile("a recent event is not UTF-8", "bad_utf8") from None
    except (ValueError, TypeError) as exc:
        raise UnreadableProfile(f"a recent event is not one this build wrote ({type(exc).__name__})") from None
    if not (math.isfinite(event.timestamp) and (event.weight is None or math.isfinite(event.weight))):
        raise UnreadableProfile("a recent event has a time or weight that is not finite", "non_finite")
    return event


def _number(raw: bytes | None, field: str) -> float:
    """A number field of the profile hash (0 when absent); what Lua's tonumber reads, finite."""
    if raw is None:
        return 0.0
    try:
        if b"_" in raw:  # Python reads 1_000, Lua does not
            raise ValueError(raw)
        value = float(raw)
    except ValueError:
        raise UnreadableProfile(f"profile field {field!r} is not a number") from None
    if not math.isfinite(value):
        raise UnreadableProfile(f"profile field {field!r} is not finite", "non_finite")
    return value


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


def _frame_factor(rate: float, ref_time: float, frame: np.ndarray) -> np.ndarray:
    """exp(-rate (ref_time - frame)): masses stored in an older frame brought to ref_time. A frame
    later than ref_time by more than a future-clock repair rescales exactly (rate x ahead > 20) was
    written under a clock the repair rebuilt L and S from the history rows: those masses count 0."""
    exponent = -rate * (ref_time - frame)
    return np.where(exponent > 20.0, 0.0, np.exp(np.minimum(exponent, 20.0)))


class RedisProfileStore:
    backend = "redis"
    layout = "full"

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        config: ProfileConfig,
        *,
        write_client: redis.Redis | RedisCluster | None = None,
        fallback: InProcessProfileStore,
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
    def from_settings(cls, s: RedisSettings, config: ProfileConfig, *, fallback: InProcessProfileStore,
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

    def keys(self, user_id: str) -> list[str]:
        base = f"{self._prefix}:{{{user_id}}}:"
        return [base + "p", base + "r", base + "h", base + "i", base + "c", base + "cz"]

    # --- writes ----------------------------------------------------------------------------------
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
        c = self.config
        by_user: dict[str, list[str]] = {}
        for event, vector in events:
            args = by_user.setdefault(event.user_id, [])
            id_hash = event_id_hash(event.event_id).to_bytes(8, "little") if event.event_id else b""
            weight = c.weight_of(event)
            if vector is None:
                vec, header = b"", b""
            else:
                vec = np.asarray(vector, dtype="<f4").tobytes()
                item = event.item_id.encode("utf-8", "surrogatepass")
                header = _HIST_HEADER.pack(event.timestamp, weight, len(item)) + item
            item_key_bytes = item_key(event.item_id).to_bytes(8, "little")
            args.extend([id_hash, repr(event.timestamp), repr(weight), vec, _recent_json(event), header, item_key_bytes])
        wall = self._now()  # `now` stamps `updated`; the decay clock is checked against the store's clock
        head = [repr(c.decay_rate), c.max_recent, c.max_history, c.max_event_ids, self._ttl_ms, repr(now), self.dim,
                repr(c.session_rate), repr(wall + c.max_clock_ahead), c.max_consumed]
        total = RecordResult()
        for _ in range(4):  # users refused for a repair or a dropped value go round again (then they fold)
            results = self._run_per_user(APPLY_SCRIPT, [(user_id, [*head, *args]) for user_id, args in by_user.items()])
            refused = {}
            for (user_id, args), reply in zip(by_user.items(), results):
                if isinstance(reply, Exception) or int(reply[0]) == -2:  # type: ignore[index]
                    refused[user_id] = args  # a value the script could not read: dropped, then the user starts over
                    self._drop_unreadable(user_id, self._writer, reply if isinstance(reply, Exception) else None)
                    continue
                accepted, duplicates, without, repeats, consumed_events = reply  # type: ignore[misc]
                if int(accepted) < 0:
                    refused[user_id] = args
                    try:
                        self._repair_remote(user_id, wall)
                    except UnreadableProfile:
                        self._drop_unreadable(user_id, self._writer)
                    except redis.ResponseError as exc:
                        if type(exc) is not redis.ResponseError:
                            raise
                        self._drop_unreadable(user_id, self._writer, exc)
                else:
                    total = total + RecordResult(int(accepted), int(duplicates), int(without))
                    with self._lock:
                        self._repeats += int(repeats)
                        self._consumed_events += int(consumed_events)
            by_user = refused
            if not by_user:
                return total
        raise redis.RedisError(f"could not repair the profiles of {len(by_user)} users")

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
        """Queue the reads `_check` reads: every key's type, and all a profile read reads."""
        for key in self.keys(user_id):
            pipe.type(key)  # type: ignore[attr-defined]
        self._queue_reads(pipe, user_id, True)

    def _check(self, user_id: str, replies: list[object]) -> None:
        """Raise UnreadableProfile unless every key of the user holds a value of its type that the
        store can read (`replies` of `_queue_check`)."""
        types, reads = replies[: len(_KEY_TYPES)], replies[len(_KEY_TYPES):]
        for kind, want in zip(types, _KEY_TYPES):
            kind = value_of(kind)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind not in ("none", want):
                raise UnreadableProfile(f"a key of the user holds a {kind}, not a {want}", "wrong_type")
        self._parse(user_id, reads, True)

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

    def _repair_remote(self, user_id: str, now: float) -> None:
        """Repair a user whose clock is more than `max_clock_ahead` after `now`, or who has no S yet
        (state written before the session vector was kept); a compare-and-set on `ref` makes a concurrent repair harmless."""
        c = self.config
        hkey, _, zkey, *_ = self.keys(user_id)
        pipe = self._writer.pipeline(transaction=True)
        pipe.hmget(hkey, "lt", "st", "ref")
        pipe.zrange(zkey, 0, -1)
        fields, members = (value_of(r) for r in pipe.execute(raise_on_error=False))
        lt, st, ref_raw = fields  # type: ignore[misc]
        if ref_raw is None:
            return
        ref = _number(ref_raw, "ref")
        long_term = self._vector(lt, "lt")
        history = self._parse_history(members)  # type: ignore[arg-type]
        session = self._vector(st, "st") if st is not None else usermodel.decayed_sum(history, ref, c.session_rate)
        rows: list[object] = []
        clock_ahead = ref > now + c.max_clock_ahead
        if clock_ahead:
            fixed = usermodel.repair_future_clock(long_term, session, ref, history, now, c.decay_rate, c.session_rate)
            long_term, session, new_ref = fixed.long_term, fixed.session, fixed.ref_time
            for member, timestamp in zip(members, fixed.history.timestamps.tolist()):  # type: ignore[call-overload]
                _, weight, length = _HIST_HEADER.unpack_from(member, _SEQ_CHARS)
                start = _SEQ_CHARS + _HIST_HEADER.size
                rows += [repr(timestamp), member[:_SEQ_CHARS] + _HIST_HEADER.pack(timestamp, weight, length) + member[start:]]
        else:
            new_ref = ref
        args = [ref_raw, np.asarray(long_term, "<f8").tobytes(), np.asarray(session, "<f8").tobytes(), repr(new_ref),
                "1" if clock_ahead else "0", *rows]
        done = self._eval(self._writer, REPAIR_SCRIPT, [hkey, zkey], args)
        if clock_ahead and int(done):  # type: ignore[call-overload]
            with self._lock:
                self.repairs += 1
            log_repair("Redis", user_id, ref - now, c.log_salt)

    def _vector(self, raw: bytes | None, field: str) -> np.ndarray:
        """L or S as stored (float64; zeros when absent); UnreadableProfile when not d finite numbers."""
        if raw is None:
            return np.zeros(self.dim)
        if len(raw) != 8 * self.dim:
            raise UnreadableProfile(f"profile field {field!r} holds {len(raw)} bytes, not {8 * self.dim}")
        vector = np.frombuffer(raw, dtype="<f8").astype(np.float64)
        if not np.isfinite(vector).all():
            raise UnreadableProfile(f"profile field {field!r} holds a number that is not finite", "non_finite")
        return vector

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

    def _queue_reads(self, pipe: object, user_id: str, with_recent: bool) -> None:
        """Queue the reads of one user's profile (`_parse` reads their replies)."""
        hkey, rkey, zkey, _, ckey, _ = self.keys(user_id)
        pipe.hmget(hkey, *_FIELDS)  # type: ignore[attr-defined]
        pipe.zrange(zkey, 0, -1)  # type: ignore[attr-defined]
        pipe.hgetall(ckey)  # type: ignore[attr-defined]
        if with_recent:
            pipe.lrange(rkey, 0, -1)  # type: ignore[attr-defined]

    def _get_remote(self, user_id: str, with_recent: bool = True, repaired: bool = False) -> UserState | None:
        pipe = self._client.pipeline(transaction=True)
        self._queue_reads(pipe, user_id, with_recent)
        parsed = self._parse(user_id, pipe.execute(raise_on_error=False), with_recent)
        if parsed is None:
            return None
        state, folded = parsed
        if not repaired and folded and (state.session is None
                                        or state.ref_time > self._now() + self.config.max_clock_ahead):
            self._repair_remote(user_id, self._now())
            return self._get_remote(user_id, with_recent, repaired=True)
        return state

    def _parse(self, user_id: str, replies: list[object], with_recent: bool) -> tuple[UserState, int] | None:
        """The state (and its count of folded events) from the replies of `_queue_reads`; None for a
        user without a profile. UnreadableProfile when any value is not one this store wrote."""
        fields = value_of(replies[0])
        lt, ref, count, updated, st, folded, repeats, cevents, seq = fields  # type: ignore[misc]
        if count is None:
            return None
        members, consumed_raw = value_of(replies[1]), value_of(replies[2])
        recent_raw = value_of(replies[3]) if with_recent else []
        ref_time = _number(ref, "ref")
        counters = [int(_number(raw, name)) for raw, name in ((count, "count"), (folded, "folded"),
                                                              (repeats, "repeats"), (cevents, "cevents"))]
        _number(seq, "seq")
        history = self._parse_history(members)  # type: ignore[arg-type]
        recent = tuple(_recent_from_json(user_id, raw) for raw in reversed(recent_raw))  # type: ignore[call-overload]
        consumed = self._parse_consumed(consumed_raw, ref_time, counters[2], counters[3])  # type: ignore[arg-type]
        state = UserState(user_id, self._vector(lt, "lt"), ref_time, counters[0], _number(updated, "updated"), recent,
                          history, None if st is None else self._vector(st, "st"), consumed)
        return state, counters[1]

    def _parse_consumed(self, raw: dict[bytes, bytes], ref_time: float, repeats: int, events: int) -> ConsumedItems:
        """The consumed-item memory from the `c` hash, masses brought into L's and S's frames at `ref_time`."""
        out = ConsumedItems.empty()
        if raw:
            if set(map(len, raw)) != {8} or set(map(len, raw.values())) != {40}:
                raise UnreadableProfile("the consumed-item memory holds entries of another size")
            keys = np.frombuffer(b"".join(raw.keys()), dtype="<u8").astype(np.uint64)
            values = np.frombuffer(b"".join(raw.values()), dtype="<f8").reshape(-1, 5)
            if not np.isfinite(values).all():
                raise UnreadableProfile("the consumed-item memory holds a number that is not finite", "non_finite")
            order = np.argsort(keys)
            count, last, mass, session_mass, frame = (values[order, j] for j in range(5))
            out = ConsumedItems(
                keys[order], count.astype(np.int64), last,
                mass * _frame_factor(self.config.decay_rate, ref_time, frame),
                session_mass * _frame_factor(self.config.session_rate, ref_time, frame),
            )
        out.repeats, out.events = repeats, events
        return out.freeze()

    def _parse_history(self, members: list[bytes]) -> usermodel.History:
        if not members:
            return usermodel.History.empty(self.dim)
        items, times, weights, vectors = [], [], [], []
        start = _SEQ_CHARS + _HIST_HEADER.size
        for member in members:
            if len(member) < start:
                raise UnreadableProfile(f"a history row of {len(member)} bytes")
            timestamp, weight, length = _HIST_HEADER.unpack_from(member, _SEQ_CHARS)
            if len(member) != start + length + 4 * self.dim:
                raise UnreadableProfile(f"a history row of {len(member)} bytes, its header says "
                                        f"{start + length + 4 * self.dim}")
            try:
                items.append(member[start : start + length].decode("utf-8", "surrogatepass"))
            except UnicodeDecodeError:
                raise UnreadableProfile("a history row's item id is not UTF-8", "bad_utf8") from None
            times.append(timestamp)
            weights.append(weight)
            vectors.append(np.frombuffer(member, dtype="<f4", count=self.dim, offset=start + length))
        history = usermodel.History(
            tuple(items), np.array(times), np.array(weights), np.stack(vectors).astype(np.float32)
        )
        if not (np.isfinite(history.timestamps).all() and np.isfinite(history.weights).all()
                and np.isfinite(history.vectors).all()):
            raise UnreadableProfile("a history row holds a number that is not finite", "non_finite")
        return history

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
