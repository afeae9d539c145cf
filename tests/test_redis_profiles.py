"""The Redis profile store against a real redis-server: shared state across replicas and processes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from reranker.model.encoder import FakeEncoder
from reranker.service import RerankService
from reranker.types import Candidate, Item, RerankQuery
from reranker.users.compact import CompactProfileStore, table_lookup
from reranker.users.compact_redis import CompactRedisProfileStore
from reranker.users.profiles import ProfileConfig
from reranker.users.stores import make_profile_store
from reranker.users.redis_store import RedisProfileStore
from reranker.types import Event, EventType
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc
from conftest import REPO, ServerFactory, candidate, event, fake_settings
from redis_server import RedisServer
from test_user_events import PIANO, TOPIC_CANDIDATES, profile, ranked_ids, record
from reranker.tools.harness import wait_serving


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.client().flushall()
    return redis_server.url


ITEM_VECTORS = np.random.default_rng(11).standard_normal((20, 8)).astype(np.float32)
ITEM_VECTORS /= np.linalg.norm(ITEM_VECTORS, axis=1, keepdims=True)
LOOKUP = table_lookup({f"item-{k}": k for k in range(20)} | {f"i{k}": k % 20 for k in range(100)}, ITEM_VECTORS)


def stores(url: str, **overrides: object) -> tuple[CompactProfileStore, CompactRedisProfileStore]:
    settings = fake_settings(redis_url=url, **overrides)
    local = make_profile_store(settings.users, dataclass_replace(settings.redis, redis_url=""), 8, lookup=LOOKUP)
    shared = make_profile_store(settings.users, settings.redis, 8, lookup=LOOKUP)
    assert isinstance(local, CompactProfileStore) and isinstance(shared, CompactRedisProfileStore)
    return local, shared


def dataclass_replace(settings, **changes):  # type: ignore[no-untyped-def]
    import dataclasses

    return dataclasses.replace(settings, **changes)


def random_events(rng: np.random.Generator, n: int, users: int = 3) -> list[tuple[Event, np.ndarray | None]]:
    out = []
    for i in range(n):
        vector = rng.standard_normal(8).astype(np.float32)
        vector /= np.linalg.norm(vector)
        out.append((
            Event(
                f"user-{rng.integers(users)}", f"item-{rng.integers(20)}", EventType(int(rng.integers(1, 8))),
                float(1_700_000_000 + rng.integers(0, 10_000)),  # out of order on purpose
                f"id-{rng.integers(0, n)}" if rng.random() < 0.7 else "",
                None, float(rng.normal()) if rng.random() < 0.2 else None,
            ),
            None if rng.random() < 0.1 else vector,
        ))
    return out


def test_redis_store_keeps_exactly_the_state_the_in_process_store_keeps(redis_url: str) -> None:
    local, shared = stores(redis_url, recent_events_per_user=7, vector_history_size=5, session_half_life_seconds=600.0,
                           max_event_ids_per_user=9, half_life_seconds=3600.0, consumed_items_per_user=6)
    events = random_events(np.random.default_rng(7), 300)
    for start in range(0, len(events), 13):  # batches of mixed users
        batch = events[start : start + 13]
        assert local.apply(batch, now=1_700_020_000.0) == shared.apply(batch, now=1_700_020_000.0)
    for user in ("user-0", "user-1", "user-2"):
        a, b = local.get(user), shared.get(user)
        assert a is not None and b is not None
        np.testing.assert_allclose(b.long_term, a.long_term, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.session, a.session, rtol=1e-12, atol=1e-12)
        assert (b.ref_time, b.event_count, b.updated_at) == (a.ref_time, a.event_count, a.updated_at)
        assert b.recent == a.recent
        assert b.history.item_ids == a.history.item_ids
        np.testing.assert_array_equal(b.history.timestamps, a.history.timestamps)
        np.testing.assert_array_equal(b.history.weights, a.history.weights)
        np.testing.assert_array_equal(b.history.vectors, a.history.vectors)
        # The consumed-item memory (counts, newest times, masses in L's frame, repeat counts).
        np.testing.assert_array_equal(b.consumed.keys, a.consumed.keys)
        np.testing.assert_array_equal(b.consumed.counts, a.consumed.counts)
        np.testing.assert_array_equal(b.consumed.last, a.consumed.last)
        np.testing.assert_allclose(b.consumed.mass, a.consumed.mass, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b.consumed.session_mass, a.consumed.session_mass, rtol=1e-9, atol=1e-12)
        assert (b.consumed.repeats, b.consumed.events) == (a.consumed.repeats, a.consumed.events)
        assert a.consumed.repeats > 0 and 0 < len(a.consumed) <= 6  # 20 items: repeats happen; capacity binds
    assert shared.get("nobody") is None
    shared.close()


def test_concurrent_replicas_updating_one_user_lose_no_event(redis_url: str) -> None:
    replicas = [stores(redis_url)[1] for _ in range(4)]
    vector = (np.ones(8) / np.sqrt(8)).astype(np.float32)

    def work(k: int) -> None:
        for i in range(40):
            replicas[k].apply([(Event("hot", f"i{i}", EventType.CLICK, 1000.0 + i, f"{k}-{i}"), vector)], now=1.0)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = replicas[0].get("hot")
    assert state is not None and state.event_count == 160
    rate = np.log(2) / fake_settings().users.half_life_seconds
    expected = 4 * sum(np.exp(-rate * (39 - i)) for i in range(40)) * vector.astype(np.float64)
    np.testing.assert_allclose(state.long_term, expected, rtol=1e-6)  # L is stored float32
    for r in replicas:
        r.close()


def test_profile_keys_expire_with_the_user_ttl(redis_url: str, redis_server: RedisServer) -> None:
    _, shared = stores(redis_url, user_ttl_seconds=60.0)
    shared.apply([(Event("u", "i", timestamp=1.0, event_id="x"), np.ones(8, dtype=np.float32))], now=1.0)
    client = redis_server.client()
    for key in shared.keys("u"):
        assert 0 < client.pttl(key) <= 60_000
    client.close()
    shared.close()


def test_an_event_through_one_replica_is_seen_by_another(redis_url: str, make_server: ServerFactory) -> None:
    _, a = make_server(fake_settings(redis_url=redis_url))
    _, b = make_server(fake_settings(redis_url=redis_url))
    assert ranked_ids(b, "u", TOPIC_CANDIDATES) == ["c-football", "c-piano"]
    assert record(a, event("u", "p1", PIANO, event_id="e1")).accepted == 1
    assert ranked_ids(b, "u", TOPIC_CANDIDATES) == ["c-piano", "c-football"]  # read-your-writes on B
    assert record(b, event("u", "p1", PIANO, event_id="e1")).duplicates == 1  # idempotent across replicas
    assert profile(a, "u").event_count == profile(b, "u").event_count == 1
    np.testing.assert_allclose(profile(a, "u").vector, profile(b, "u").vector)


def test_redis_outage_fails_over_to_in_process_and_replays_after(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer().start()
    try:
        settings = fake_settings(redis_url=server.url, redis_retry_seconds=0.0, redis_timeout_ms=200.0)
        running, a = make_server(settings)
        _, b = make_server(settings)
        record(a, event("u", "f1", "football league match", event_id="before"))
        server.stop()
        with caplog.at_level(logging.WARNING, logger="reranker.users.redis_store"):
            during = record(a, event("u", "p1", PIANO, event_id="during"), event("u", "p2", PIANO + " live", event_id="during2"))
        assert during.accepted == 2
        assert "Redis profile store unavailable" in caplog.text
        assert running.service.profiles.degraded  # type: ignore[union-attr]
        assert ranked_ids(a, "u", TOPIC_CANDIDATES) == ["c-piano", "c-football"]  # A still personalizes
        response = b.Rerank(pb.RerankRequest(user_id="u", candidates=TOPIC_CANDIDATES), timeout=10)
        assert response.variant == pb.VARIANT_RERANKED and response.cold_user  # B knows nothing: upstream order
        server.start()  # same port, empty (nothing was persisted): only the replay brings data back
        assert record(a, event("u", "p3", PIANO, event_id="after")).accepted == 1
        assert not running.service.profiles.degraded  # type: ignore[union-attr]
        deadline = time.monotonic() + 10  # the replay runs in the background
        while profile(b, "u").event_count < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert profile(b, "u").event_count == 3  # the two events recorded during the outage + "after"
        assert ranked_ids(b, "u", TOPIC_CANDIDATES) == ["c-piano", "c-football"]
    finally:
        server.cleanup()


# --- two real server processes ---------------------------------------------------------------------
class ServerProcess:
    def __init__(self, redis_url: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reranker", "serve", "--encoder", "fake", "--fake-dim", "64",
             "--address", "127.0.0.1:0", "--redis-url", redis_url, "--grace-seconds", "1",
             "--metrics-address", ""],
            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
        )
        self.port = self._read_port()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.RerankerServiceStub(self.channel)
        wait_serving(f"127.0.0.1:{self.port}", 60.0, self.process, poll_s=0.05)

    def _read_port(self) -> int:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            match = re.search(r"listening on \S+ \(port (\d+)[,)]", line)
            if match:
                self._drain = threading.Thread(target=self.process.stderr.read, daemon=True)  # keep draining
                self._drain.start()
                return int(match.group(1))
        self.process.stderr.close()
        raise AssertionError(f"server exited with {self.process.wait()} before listening")

    def stop(self) -> None:
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        self._drain.join(10)
        assert self.process.stderr is not None
        self.process.stderr.close()
        assert code == 0


def test_two_server_processes_sharing_one_redis_see_each_others_events(redis_url: str) -> None:
    first, second = ServerProcess(redis_url), ServerProcess(redis_url)
    try:
        record(first.stub, event("u", "p1", PIANO, event_id="one"))
        assert ranked_ids(second.stub, "u", TOPIC_CANDIDATES) == ["c-piano", "c-football"]
        record(second.stub, *(event("u", f"f{i}", f"football league match goal striker {i}", event_id=f"f{i}")
                              for i in range(5)))
        # A profile holds item ids; each replica reads their vectors from its item cache or the shared
        # catalog, so the first replica gets the items as a catalog warm-up would give them.
        first.stub.UpsertItems(pb.UpsertItemsRequest(items=[
            pb.Item(item_id=f"f{i}", text=f"football league match goal striker {i}") for i in range(5)]), timeout=10)
        assert ranked_ids(first.stub, "u", TOPIC_CANDIDATES) == ["c-football", "c-piano"]
        assert profile(first.stub, "u").event_count == profile(second.stub, "u").event_count == 6
        stream = first.stub.StreamEvents(iter([event("u", "p1", PIANO, event_id="one")]), timeout=10)
        assert stream.duplicates == 1
    finally:
        first.stop()
        second.stop()


def test_snapshot_with_redis_keeps_item_vectors_only(redis_url: str, tmp_path, make_server: ServerFactory) -> None:  # type: ignore[no-untyped-def]
    settings = fake_settings(redis_url=redis_url, snapshot_path=str(tmp_path / "s.npz"), snapshot_interval_seconds=0)
    running, stub = make_server(settings)
    record(stub, event("u", "p1", PIANO))
    running.service.save_snapshot()
    import json

    with np.load(tmp_path / "s.npz") as archive:
        header = json.loads(archive["header"].tobytes())
    assert (header["items"], header["users"]) == (1, 0)  # profiles live in Redis
    _, other = make_server(settings)
    response = other.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("p1", 1.0), candidate("x", 2.0)]),
                            timeout=10)
    assert (response.cache_hits, response.without_vector) == (1, 1)  # p1's vector came from the snapshot


def test_profile_config_weight_rules() -> None:
    config = ProfileConfig.from_settings(fake_settings().users, FakeEncoder(8).dim)
    assert config.weight_of(Event("u", "i", EventType.DISLIKE)) == -1.5
    assert config.weight_of(Event("u", "i", EventType.DISLIKE, weight=0.25)) == 0.25
    assert config.weight_of(Event("u", "i", EventType.UNSPECIFIED)) == 1.0


def test_a_server_starts_and_serves_with_redis_unreachable(make_server: ServerFactory) -> None:
    from redis_server import free_port

    running, stub = make_server(fake_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    assert record(stub, event("u", "p1", PIANO, event_id="e1")).accepted == 1
    assert record(stub, event("u", "p1", PIANO, event_id="e1")).duplicates == 1  # dedup holds in the fallback
    assert ranked_ids(stub, "u", TOPIC_CANDIDATES) == ["c-piano", "c-football"]
    store = running.service.profiles
    assert isinstance(store, RedisProfileStore) and store.degraded and "Connection" in store.last_error


DATA = Path(__file__).resolve().parent / "data"  # full-layout keys and answers (tests/data/README.md)
LEGACY_ITEMS = {f"i{k}": f"movie {k} about {['space', 'love', 'crime', 'war', 'music'][k % 5]} and {k % 7} dogs"
                for k in range(40)}  # the catalog of tests/data/make_full_layout_fixtures.py


def restore_full_layout_keys(client: object) -> list[str]:
    """The keys a full-layout build wrote for three users (prefix `legacy`), as it wrote them."""
    dump = json.loads((DATA / "full_layout_redis.json").read_text())
    for key, entry in dump.items():
        kind, value = entry["type"], entry["value"]
        if kind == "hash":
            client.hset(key, mapping={bytes.fromhex(f): bytes.fromhex(v) for f, v in value.items()})  # type: ignore[attr-defined]
        elif kind == "list":
            client.rpush(key, *[bytes.fromhex(v) for v in value])  # type: ignore[attr-defined]
        else:
            client.zadd(key, {bytes.fromhex(m): score for m, score in value})  # type: ignore[attr-defined]
        client.pexpire(key, 3_600_000)  # type: ignore[attr-defined]
    return list(dump)


def legacy_service(url: str) -> RerankService:
    service = RerankService(fake_settings(fake_dim=16, redis_url=url, redis_prefix="legacy", user_ttl_seconds=1e9))
    service.load()
    service.upsert_items([Item(i, t) for i, t in LEGACY_ITEMS.items()])
    return service


def test_full_layout_keys_are_converted_on_first_read_and_answer_as_the_full_layout_did(
        redis_url: str, redis_server: RedisServer) -> None:
    client = redis_server.client()
    old_keys = restore_full_layout_keys(client)
    expected = json.loads((DATA / "full_layout_expected.json").read_text())["redis"]
    service = legacy_service(redis_url)
    store = service.profiles
    assert isinstance(store, CompactRedisProfileStore)
    for user, want in expected.items():
        result = service.rerank(RerankQuery(user, tuple(Candidate(i, 0.0, None) for i in sorted(
            want["ranking"], key=lambda i: int(i[1:])))))
        view = service.user_profile(user, include_vector=True)
        assert list(result.items.item_ids) == want["ranking"] and view.event_count == want["event_count"], user
        np.testing.assert_allclose(result.items.scores, want["scores"], atol=1e-5)
        np.testing.assert_allclose(view.vector, want["vector"], atol=1e-5)
    assert store.converted == 3 and not store.degraded and store.unreadable == 0
    assert client.exists(*old_keys) == 0  # the old keys are gone; each user has one compact key, with the old TTL
    assert all(0 < client.pttl(f"legacy:{{{user}}}:u") <= 3_600_000 for user in expected)
    assert service.record_events([Event("alice", "i0", event_id="a-3")]).duplicates == 1  # its event ids came along
    client.close()
    service.close()


def test_full_layout_keys_are_converted_on_first_write(redis_url: str, redis_server: RedisServer) -> None:
    client = redis_server.client()
    restore_full_layout_keys(client)
    service = legacy_service(redis_url)
    result = service.record_events([Event("carol", "i7", event_id="c-new", timestamp=1_700_010_000.0),
                                    Event("carol", "i5", event_id="c-1")])  # c-1: recorded before the upgrade
    assert (result.accepted, result.duplicates) == (1, 1)
    assert service.user_profile("carol").event_count == 7
    assert client.exists("legacy:{carol}:p") == 0 and client.exists("legacy:{alice}:p") == 1  # alice: not yet
    client.close()
    service.close()


def test_full_layout_keys_written_before_the_session_sum_was_kept_get_it_from_the_history(
        redis_url: str, redis_server: RedisServer) -> None:
    """Keys of an older build have no `st`: S is rebuilt from the history rows (exact while the user
    has no more events than the vector history keeps)."""
    client = redis_server.client()
    restore_full_layout_keys(client)
    service = legacy_service(redis_url)
    with_st = service.profiles.get("bob")  # type: ignore[union-attr]
    client.delete("legacy:{bob}:u")
    restore_full_layout_keys(client)
    client.hdel("legacy:{bob}:p", "st")
    without = service.profiles.get("bob")  # type: ignore[union-attr]
    assert with_st is not None and without is not None
    np.testing.assert_allclose(without.session, with_st.session, rtol=1e-9, atol=1e-12)
    assert service.profiles.repairs == 0  # type: ignore[union-attr]  # a conversion, not a clock repair
    client.close()
    service.close()


def test_unreadable_full_layout_keys_are_dropped_and_the_user_starts_over(redis_url: str, redis_server: RedisServer
                                                                          ) -> None:
    client = redis_server.client()
    restore_full_layout_keys(client)
    client.hset("legacy:{alice}:p", "count", "not a number")
    client.delete("legacy:{bob}:h")
    client.set("legacy:{bob}:h", b"a string, not a sorted set")
    service = legacy_service(redis_url)
    store = service.profiles
    assert isinstance(store, CompactRedisProfileStore)
    assert store.get("alice") is None and store.get("bob") is None and store.get("carol") is not None
    assert store.unreadable_reasons == {"layout": 1, "wrong_type": 1} and not store.degraded
    assert client.exists("legacy:{alice}:p", "legacy:{bob}:p", "legacy:{bob}:h") == 0
    assert service.record_events([Event("alice", "i1", event_id="a-3")]).accepted == 1  # a new profile
    client.close()
    service.close()
