"""Redis values: an unreadable value at one user's key (a key of the wrong type, junk, bad UTF-8, a
wrong layout, non-finite numbers) is that user's problem alone. Through a
real redis-server and a real gRPC server: the user reads as new, the value is dropped when a read or
a write finds it and the user starts over; the rest of the batch is applied; the store never goes
degraded (other users stay served from Redis); the drop is counted by reason in the metrics and
logged under a hash of the user id, never the id itself."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis

from reranker.userhash import user_hash
from reranker.types import Event, EventType
from reranker.users.compact import CompactProfile, ProfileFormatError, decode, encode, table_lookup
from reranker.users.compact_redis import CompactRedisProfileStore
from reranker.users.profiles import UNREADABLE_REASONS, UserState, log_name, user_vector
from reranker.users.redis_store import RedisProfileStore
from reranker.users.stores import make_profile_store
from reranker.v1 import reranker_pb2 as pb
from conftest import ServerFactory, event, fake_settings
from redis_server import RedisServer
from test_compact_profiles import DIM, Catalog, config, random_events
from test_user_events import PIANO, TOPIC_CANDIDATES, at, profile, ranked_ids, record

FOOTBALL = "football league match goal"
VICTIM = "victim-3b9e"  # must never appear in a log line
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server.client()
    c.flushall()
    yield c
    c.close()


def key(user: str, suffix: str) -> str:
    return f"reranker:{{{user}}}:{suffix}"


def unreadable_count(running: object, reason: str) -> float:
    text = running.service.metrics.exposition().decode()  # type: ignore[attr-defined]
    match = re.search(rf'^reranker_profile_unreadable_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


# --- poisons: what a careless operator or another program leaves at one user's key ---------------
def wrong_type(suffix: str) -> Callable[[redis.Redis], None]:
    def poison(c: redis.Redis) -> None:  # the profile is a string: a hash is the wrong type
        c.delete(key(VICTIM, suffix))
        c.hset(key(VICTIM, suffix), "f", "v")
    return poison


def compact_blob(mutate: Callable[[bytes], bytes]) -> Callable[[redis.Redis], None]:
    def poison(c: redis.Redis) -> None:
        blob = c.get(key(VICTIM, "u"))
        assert blob is not None
        c.set(key(VICTIM, "u"), mutate(blob))
    return poison


def compact_nan_long_term(blob: bytes) -> bytes:
    p = decode(blob, 64)
    p.long_term[3] = math.nan
    return encode(p)


POISONS = {  # one string key per user (full-layout keys: test_redis_profiles, the conversion tests)
    "compact-wrong-type": (wrong_type("u"), "wrong_type"),
    "compact-bad-utf8": (compact_blob(lambda b: b[:-1] + b"\xff"), "bad_utf8"),
    "compact-junk": (compact_blob(lambda b: b"not a profile"), "layout"),
    "compact-truncated": (compact_blob(lambda b: b[: len(b) // 2]), "layout"),
    "compact-nan-long-term": (compact_blob(compact_nan_long_term), "non_finite"),
}


@pytest.mark.parametrize("case,first", [(case, first) for case in POISONS for first in ("read", "write")])
def test_an_unreadable_value_at_one_users_key_is_that_users_problem_alone(
    case: str, first: str, client: redis.Redis, redis_server: RedisServer, make_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    poison, reason = POISONS[case]
    caplog.set_level(logging.INFO)
    running, stub = make_server(fake_settings(redis_url=redis_server.url, redis_timeout_ms=2000.0,
                                              redis_write_timeout_ms=5000.0))
    record(stub, *(event(u, f"p{k}", f"{PIANO} {k}", event_id=f"{u}-{k}", **at(T0 + k))
                   for k in range(3) for u in (VICTIM, "other")))
    assert ranked_ids(stub, "other", TOPIC_CANDIDATES) == ["c-piano", "c-football"]
    poison(client)

    if first == "read":  # the victim gets an answer (cold or personalized, finite scores), others are read from Redis
        answer = stub.Rerank(pb.RerankRequest(user_id=VICTIM, candidates=TOPIC_CANDIDATES), timeout=10)
        assert answer.variant == pb.VARIANT_RERANKED
        assert all(math.isfinite(it.score) and math.isfinite(it.semantic_score) for it in answer.items)
        assert profile(stub, VICTIM).user_id == VICTIM  # OK, never INTERNAL
        assert ranked_ids(stub, "other", TOPIC_CANDIDATES) == ["c-piano", "c-football"]  # the fallback knows no one

    # Writes: the bystander's events in the victim's batch are applied (in Redis); the victim starts over.
    written = record(stub, event(VICTIM, "f1", FOOTBALL, event_id="v-new", **at(T0 + 10)),
                     event("newcomer", "f1", FOOTBALL, event_id="n-1", **at(T0 + 10)))
    assert written.accepted == 2
    store = running.service.profiles
    assert isinstance(store, RedisProfileStore) and not store.degraded, store.last_error
    assert client.exists(store.keys("newcomer")[0])
    victim = profile(stub, VICTIM)
    assert victim.found and victim.event_count == 1 and all(math.isfinite(x) for x in victim.vector)
    assert ranked_ids(stub, VICTIM, TOPIC_CANDIDATES) == ["c-football", "c-piano"]  # the new event, not the old ones
    assert ranked_ids(stub, "other", TOPIC_CANDIDATES) == ["c-piano", "c-football"]

    # Counted by reason, logged under a hash of the id (never the id).
    assert unreadable_count(running, reason) >= 1
    assert VICTIM not in caplog.text
    assert log_name(VICTIM) in caplog.text


def test_a_future_clock_repair_is_logged_without_the_user_id(client: redis.Redis, redis_server: RedisServer,
                                                            make_server: ServerFactory,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    running, stub = make_server(fake_settings(redis_url=redis_server.url, redis_timeout_ms=2000.0))
    record(stub, event(VICTIM, "p1", PIANO, event_id="a", **at(T0)))
    store = running.service.profiles
    p = decode(client.get(key(VICTIM, "u")), 64)  # type: ignore[arg-type]
    p.ref_time = T0 + 1e9
    client.set(key(VICTIM, "u"), encode(p))
    assert ranked_ids(stub, VICTIM, TOPIC_CANDIDATES) == ["c-piano", "c-football"]
    assert store.repairs >= 1  # type: ignore[union-attr]
    assert "repaired" in caplog.text and log_name(VICTIM) in caplog.text
    assert VICTIM not in caplog.text


def test_the_log_name_is_the_access_logs_user_hash() -> None:
    """One name for a user in every log line: the access log's `user_hash` (keyed when
    log_user_salt is set), so an operator can follow one user from the RPC to the store."""
    assert log_name("u-1") == user_hash("", "u-1") and log_name("u-1") != log_name("u-2")
    assert log_name("u-1", "salt") == user_hash("salt", "u-1") != log_name("u-1")


def test_a_redis_error_that_is_not_a_users_value_still_fails_over(client: redis.Redis,
                                                                    redis_server: RedisServer) -> None:
    """Redis out of memory replies with an error per script, like a bad value would: the store reads the
    user's keys, finds them fine, and fails over to its fallback for everyone (then replays), as for
    an outage; nothing is dropped."""
    lookup = table_lookup({"i1": 0, "i2": 0, "i3": 0}, np.ones((1, 8), np.float32) / np.sqrt(8))
    s = fake_settings(redis_url=redis_server.url, redis_timeout_ms=2000.0, redis_retry_seconds=0.0)
    store = make_profile_store(s.users, s.redis, 8, lookup=lookup)
    assert isinstance(store, RedisProfileStore)
    vector = np.ones(8, np.float32) / np.sqrt(8)
    store.apply([(Event(u, "i1", EventType.CLICK, T0, f"{u}-1"), vector) for u in (VICTIM, "other")], T0)
    client.config_set("maxmemory", "1")
    try:
        store.apply([(Event(u, "i2", EventType.CLICK, T0 + 1, f"{u}-2"), vector) for u in (VICTIM, "other")], T0)
        assert store.degraded and "OutOfMemory" in store.last_error and store.unreadable == 0
    finally:
        client.config_set("maxmemory", "0")
    store.apply([(Event("other", "i3", EventType.CLICK, T0 + 2, "other-3"), vector)], T0)
    store.close()  # waits for the replay
    assert not store.degraded and client.exists(store.keys(VICTIM)[0])
    fresh = make_profile_store(s.users, s.redis, 8, lookup=lookup)
    assert fresh.get(VICTIM).event_count == 2  # type: ignore[union-attr]


# --- fuzz: every truncation and byte flip of a compact profile ------------------------------------
def _finite_state(state: UserState) -> bool:
    arrays = [state.long_term, state.session, state.history.timestamps, state.history.weights, state.history.vectors,
              state.consumed.mass, state.consumed.session_mass, state.consumed.last]
    return all(bool(np.isfinite(a).all()) for a in arrays if a is not None)


def mutations(blob: bytes) -> Iterator[tuple[str, bytes]]:
    """Truncations, single-byte flips (all bits / the top bit), junk, and each float of the profile
    made NaN or infinite."""
    for n in range(len(blob)):
        yield f"truncated to {n}", blob[:n]
    yield "one byte more", blob + b"\x00"
    for i in range(len(blob)):
        for mask in (0xFF, 0x80):
            yield f"byte {i} ^ {mask:#x}", blob[:i] + bytes([blob[i] ^ mask]) + blob[i + 1 :]
    rng = np.random.default_rng(0)
    for n in (8, 80, 200, len(blob), 4000):
        yield f"{n} random bytes", rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    p = decode(blob, DIM)
    for field, value in (("ref_time", math.nan), ("ref_time", math.inf), ("updated_at", math.nan),
                         ("session_tail_mass", math.inf)):
        q = decode(blob, DIM)
        setattr(q, field, value)
        yield f"{field} = {value}", encode(q)
    for column in ("row_times", "row_weights"):
        for value in (math.nan, -math.inf):
            q = decode(blob, DIM)
            getattr(q, column)[1] = value
            yield f"{column}[1] = {value}", encode(q)
    for array in ("long_term", "session_tail"):
        q = decode(blob, DIM)
        getattr(q, array)[2] = math.inf
        yield f"{array}[2] = inf", encode(q)
    for array in ("mass", "session_mass", "last"):
        q = decode(blob, DIM)
        getattr(q.tail, array)[0] = math.nan
        yield f"tail.{array}[0] = nan", encode(q)
    q = decode(blob, DIM)
    q.row_types[0] = 99
    yield "an event type this build does not know", encode(q)
    q = decode(blob, DIM)
    q.ids_next = q.ids.size + 5
    yield "the id ring's next slot beyond the ring", encode(q)
    assert p.session_tail is not None and len(p.tail) and len(p.row_ids) >= 3  # every section is exercised


def test_every_truncation_and_byte_flip_of_a_compact_profile_is_that_users_problem_alone(
    client: redis.Redis, redis_server: RedisServer
) -> None:
    catalog = Catalog()
    settings, _ = config(vector_history_size=3, max_event_ids_per_user=6, redis_timeout_ms=5000.0,
                         redis_write_timeout_ms=5000.0)
    settings = dataclasses.replace(settings, redis_url=redis_server.url)
    store = make_profile_store(settings.users, settings.redis, DIM, lookup=catalog)
    assert isinstance(store, CompactRedisProfileStore)
    # A profile with every section: rows with ids of several UTF-8 lengths, a session tail, a consumed tail.
    wide = {f"i{k}": f"i{k}" + ("", "-\u00e9", "-\u65e5\u672c", "-\U0001f3b9")[k % 4] for k in range(8)}
    catalog.vectors.update({wide[item]: catalog.vectors[item] for item in wide})
    events = [(dataclasses.replace(e, user_id=VICTIM, item_id=wide[e.item_id]), v)
              for e, v in random_events(catalog, np.random.default_rng(3), 40, users=1, items=8)]
    store.apply(events, T0)
    blob = client.get(store.keys(VICTIM)[0])
    assert blob is not None
    t, bystander_events = T0 + 1e6, 0
    for name, bad in mutations(blob):
        client.set(store.keys(VICTIM)[0], bad)
        before = store.unreadable
        state = store.get(VICTIM)  # never raises: a state with finite numbers, or a new user
        assert state is None or _finite_state(state), name
        t += 10.0
        bystander_events += 1
        result = store.apply([(Event(VICTIM, "i1", EventType.CLICK, t, f"v{t}"), catalog.vectors["i1"]),
                              (Event("bystander", "i2", EventType.CLICK, t, f"b{t}"), catalog.vectors["i2"])], t)
        assert result.accepted == 2 and not store.degraded, (name, store.last_error)
        state = store.get(VICTIM)
        assert state is not None and _finite_state(state), name
        assert user_vector(state, settings.users) is not None and np.isfinite(user_vector(state, settings.users)).all(), name
        if state.event_count == 1:  # it started over: it was counted
            assert store.unreadable > before, name
    assert store.get("bystander").event_count == bystander_events  # type: ignore[union-attr]
    assert sum(store.unreadable_reasons.values()) == store.unreadable > 100
    assert set(store.unreadable_reasons) <= set(UNREADABLE_REASONS)


def test_compact_profile_with_a_bad_utf8_id_is_refused_by_decode_with_a_reason() -> None:
    blob = encode(CompactProfile(np.zeros(DIM), ref_time=T0, row_times=[T0], row_weights=[1.0], row_types=[2],
                                 row_ids=["ab"], row_keys=[1]))
    with pytest.raises(ProfileFormatError) as refused:
        decode(blob[:-1] + b"\xff", DIM)
    assert refused.value.reason == "bad_utf8"
