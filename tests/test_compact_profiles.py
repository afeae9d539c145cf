"""Compact profiles (profile_layout=compact): the same user model as the full layout in a few KB per
user, item vectors looked up instead of copied; in process, in Redis, in snapshots, through gRPC."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from reranker.config import Settings
from reranker.types import Event, EventType
from reranker.itemkeys import item_keys
from reranker.users.compact import CompactProfileStore, ProfileFormatError, decode, encode
from reranker.users.compact_redis import CompactRedisProfileStore
from reranker.users.profiles import InProcessProfileStore, ProfileConfig, UserState, candidate_history, user_vector
from reranker.users.snapshot import load_snapshot, save_snapshot
from reranker.users.stores import make_profile_store
from reranker.v1 import reranker_pb2 as pb
from conftest import ServerFactory, candidate, event, fake_settings
from redis_server import RedisServer
from test_user_events import PIANO, TOPIC_CANDIDATES, at, profile, ranked_ids, record

DIM = 16


class Catalog:
    """Item vectors by id, as the item cache / shared catalog would give them; ids can be removed."""

    def __init__(self, items: int = 40, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        vectors = rng.normal(size=(items, DIM))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        self.vectors = {f"i{k}": vectors[k].astype(np.float32) for k in range(items)}

    def __call__(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        out, found = np.zeros((len(item_ids), DIM), np.float32), np.zeros(len(item_ids), bool)
        for j, item_id in enumerate(item_ids):
            if item_id in self.vectors:
                out[j], found[j] = self.vectors[item_id], True
        return out, found


def random_events(catalog: Catalog, rng: np.random.Generator, n: int, users: int = 3,
                  items: int = 25) -> list[tuple[Event, np.ndarray | None]]:
    """Bursts and pauses, out-of-order times, repeats, replayed ids, explicit and negative weights,
    events without a vector: everything the fold has a branch for."""
    out, t = [], 1_700_000_000.0
    for k in range(n):
        t += float(rng.choice([2.0, 30.0, 4000.0]))
        item = f"i{rng.integers(items)}"
        out.append((
            Event(f"u{rng.integers(users)}", item, EventType(int(rng.integers(1, 8))), t - 500.0 * (rng.random() < 0.2),
                  f"e{rng.integers(0, n)}" if rng.random() < 0.7 else "", None,
                  float(rng.normal()) if rng.random() < 0.2 else None),
            None if rng.random() < 0.1 else catalog.vectors[item],
        ))
    return out


def config(**overrides: object) -> tuple[Settings, ProfileConfig]:
    base = dict(vector_history_size=5, session_half_life_seconds=300.0, half_life_seconds=3600.0,
                max_event_ids_per_user=30, consumed_items_per_user=100, recent_events_per_user=50)
    settings = dataclasses.replace(Settings(), **{**base, **overrides})  # type: ignore[arg-type]
    return settings, ProfileConfig.from_settings(settings.users, DIM)


def assert_same_user_model(full: UserState, compact: UserState, settings: Settings, catalog: Catalog) -> None:
    scale = max(1.0, float(np.linalg.norm(full.long_term)))
    np.testing.assert_allclose(compact.long_term, full.long_term, atol=1e-6 * scale)
    np.testing.assert_allclose(compact.session, full.session, atol=1e-6 * max(1.0, float(np.linalg.norm(full.session))))
    assert compact.ref_time == full.ref_time and compact.event_count == full.event_count
    assert compact.history.item_ids == full.history.item_ids
    np.testing.assert_array_equal(compact.history.timestamps, full.history.timestamps)
    np.testing.assert_allclose(compact.history.weights, full.history.weights, rtol=1e-6)
    np.testing.assert_array_equal(compact.history.vectors, full.history.vectors)
    keys = np.union1d(full.consumed.keys, compact.consumed.keys)
    for got, want in zip(compact.consumed.lookup(keys), full.consumed.lookup(keys)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert (compact.consumed.repeats, compact.consumed.events) == (full.consumed.repeats, full.consumed.events)
    u_full, u_compact = user_vector(full, settings.users), user_vector(compact, settings.users)
    np.testing.assert_allclose(u_compact, u_full, atol=1e-5)
    ids = list(catalog.vectors)
    vectors, found = catalog(ids)
    want = candidate_history(full, settings.users, ids, vectors, found, u_full).cosine(vectors, u_full)
    got = candidate_history(compact, settings.users, ids, vectors, found, u_compact).cosine(vectors, u_compact)
    np.testing.assert_allclose(got, want, atol=1e-5)  # leave-one-out similarities too


@pytest.mark.parametrize("seed", range(4))
def test_compact_store_keeps_the_user_model_the_full_store_keeps(seed: int) -> None:
    catalog = Catalog(seed=seed)
    settings, cfg = config()
    full = InProcessProfileStore(cfg, max_users=10, ttl_seconds=1e12)
    compact = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    rng = np.random.default_rng(seed)
    events = random_events(catalog, rng, 400)
    for start in range(0, len(events), 7):  # batches of mixed users
        batch, now = events[start : start + 7], events[min(start + 6, len(events) - 1)][0].timestamp
        assert compact.apply(batch, now) == full.apply(batch, now)
    for user in ("u0", "u1", "u2"):
        assert_same_user_model(full.get(user), compact.get(user), settings, catalog)  # type: ignore[arg-type]
        blob = compact._profiles[user]
        assert len(blob) < 2048 and encode(decode(blob, DIM)) == blob
    assert (compact.repeats, compact.consumed_events) == (full.repeats, full.consumed_events)


def test_the_consumed_memory_beyond_the_history_rows_is_capped() -> None:
    catalog = Catalog(items=40)
    _, cfg = config(consumed_items_per_user=11)
    store = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    full = InProcessProfileStore(cfg, max_users=10, ttl_seconds=1e12)
    for k in range(40):  # 40 distinct items: 5 stay in the history rows, 6 more are remembered beyond them
        pair = (Event("u", f"i{k}", EventType.CLICK, 1.7e9 + k), catalog.vectors[f"i{k}"])
        store.apply([pair], 1.7e9 + k)
        full.apply([pair], 1.7e9 + k)
    p = decode(store._profiles["u"], DIM)
    assert len(p.row_ids) == 5 and len(p.tail) == 6
    assert set(p.row_ids) == {f"i{k}" for k in range(35, 40)}  # the newest; the tail holds the next newest
    state, want = store.get("u"), full.get("u")
    assert state is not None and want is not None and len(state.consumed) == len(want.consumed) == 11
    np.testing.assert_array_equal(state.consumed.keys, want.consumed.keys)  # the same 11 most recent items


def test_a_history_item_whose_vector_is_gone_simply_stops_counting() -> None:
    catalog = Catalog()
    settings, cfg = config(vector_history_size=20)
    store = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    t0 = 1_700_000_000.0
    for k, item in enumerate(["i1", "i2", "i3", "i4"]):
        store.apply([(Event("u", item, EventType.CLICK, t0 + 60 * k), catalog.vectors[item])], t0 + 60 * k)
    before = store.get("u")
    del catalog.vectors["i2"]  # evicted from the item cache and not in the catalog
    after = store.get("u")
    assert after is not None and before is not None
    assert after.history.item_ids == ("i1", "i3", "i4")
    rate = cfg.session_rate
    without = sum(np.exp(-rate * (after.ref_time - (t0 + 60 * k))) * Catalog().vectors[i].astype(np.float64)
                  for k, i in enumerate(["i1", "i2", "i3", "i4"]) if i != "i2")
    np.testing.assert_allclose(after.session, without, atol=1e-9)  # the session is as if i2 never happened
    np.testing.assert_array_equal(after.long_term, before.long_term)  # L keeps what was folded
    u = user_vector(after, settings.users)
    assert u is not None and np.isfinite(u).all()
    # Still consumed (the id is kept), with no share of the session it no longer counts in.
    counts, _, _, session_mass = after.consumed.lookup(item_keys(["i2"]))
    assert counts[0] == 1 and session_mass[0] == 0.0
    # New events still fold; the row leaving the history without its vector leaves S_tail alone.
    for k in range(30):
        item = f"i{5 + k % 10}"
        store.apply([(Event("u", item, EventType.CLICK, t0 + 300 + k), catalog.vectors[item])], t0 + 400)
    state = store.get("u")
    assert state is not None and "i2" not in state.history.item_ids and state.event_count == 34


def test_bytes_that_are_not_a_profile_are_refused_with_a_clear_error() -> None:
    catalog = Catalog()
    _, cfg = config()
    store = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    store.apply([(Event("u", "i1", EventType.CLICK, 1.0e9, "x"), catalog.vectors["i1"])], 1.0e9)
    blob = store._profiles["u"]
    for bad in (blob[:40], blob[:-3], blob[:80] + blob[88:]):
        with pytest.raises(ProfileFormatError):
            decode(bad, DIM)
    with pytest.raises(ProfileFormatError):
        decode(blob, DIM + 1)


def test_profile_bytes_at_20_events_stay_under_4_kb_at_the_default_dimension() -> None:
    """The issue's budget (~2.2 KB at d=384 and 20 events on distinct items): the byte string, in
    process and in Redis alike. Measured with allocator overhead in `reranker bench profile-bytes`."""
    rng = np.random.default_rng(1)
    vectors = {f"item-{k}": (v / np.linalg.norm(v)).astype(np.float32) for k, v in enumerate(rng.normal(size=(50, 384)))}

    def lookup(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([vectors[i] for i in ids]), np.ones(len(ids), bool)

    settings = Settings()
    store = CompactProfileStore(ProfileConfig.from_settings(settings.users, 384), lookup, max_users=10, ttl_seconds=1e12)
    for k in range(20):
        store.apply([(Event("user-1", f"item-{k}", EventType.CLICK, 1.7e9 + 30 * k, f"event-{k}"),
                      vectors[f"item-{k}"])], 1.7e9 + 30 * k)
    assert store.held_bytes("user-1") < 4096
    full = InProcessProfileStore(ProfileConfig.from_settings(settings.users, 384), max_users=10, ttl_seconds=1e12)
    for k in range(20):
        full.apply([(Event("user-1", f"item-{k}", EventType.CLICK, 1.7e9 + 30 * k, f"event-{k}"),
                     vectors[f"item-{k}"])], 1.7e9 + 30 * k)
    assert store.held_bytes("user-1") * 10 < full.held_bytes("user-1")


# --- through a real server -----------------------------------------------------------------------
def test_a_compact_server_ranks_like_a_full_one(make_server: ServerFactory) -> None:
    _, full = make_server(fake_settings())
    _, compact = make_server(fake_settings(profile_layout="compact"))
    events = [event("u1", f"m{k}", f"{PIANO} piece {k}" if k % 3 else f"football match {k}", event_id=f"e{k}",
                    **at(1_700_000_000.0 + 20 * k)) for k in range(30)]
    for stub in (full, compact):
        assert record(stub, *events).accepted == 30
        assert record(stub, *events).duplicates == 30
    candidates = [*TOPIC_CANDIDATES, *(candidate(f"m{k}", 1.0 - 0.01 * k, None) for k in range(0, 30, 4))]
    for options in ({}, {"consumed": pb.CONSUMED_POLICY_KEEP}):
        assert ranked_ids(compact, "u1", candidates, **options) == ranked_ids(full, "u1", candidates, **options)
    a, b = profile(full, "u1"), profile(compact, "u1")
    assert a.event_count == b.event_count == 30
    np.testing.assert_allclose(np.array(b.vector), np.array(a.vector), atol=1e-5)
    assert [e.item_id for e in b.recent_events] == [e.item_id for e in a.recent_events][-len(b.recent_events):]


def test_a_compact_server_keeps_serving_when_history_vectors_leave_the_item_cache(make_server: ServerFactory) -> None:
    _, stub = make_server(fake_settings(profile_layout="compact", item_cache_size=8))
    record(stub, *(event("u1", f"p{k}", f"{PIANO} {k}", **at(1_700_000_000.0 + k)) for k in range(12)))
    # 12 history items and 2 candidates through an 8-item cache: some history rows have no vector now.
    assert ranked_ids(stub, "u1", TOPIC_CANDIDATES) == ["c-piano", "c-football"]
    assert profile(stub, "u1").event_count == 12


def test_compact_snapshots_round_trip_and_a_layout_mismatch_is_ignored(tmp_path: Path) -> None:
    catalog = Catalog()
    _, cfg = config()
    store = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    events = random_events(catalog, np.random.default_rng(3), 200)
    store.apply(events, events[-1][0].timestamp)
    path = tmp_path / "snap.npz"
    save_snapshot(path, items=None, profiles=store, model_version="m", dim=DIM, users_per_part=2)
    again = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    info = load_snapshot(path, items=None, profiles=again, model_version="m", dim=DIM, now=events[-1][0].timestamp,
                         ttl_seconds=1e12)
    assert info is not None and info.users == 3
    assert dict(again.export_chunks(10).__next__()) == dict(store.export_chunks(10).__next__())
    full = InProcessProfileStore(cfg, max_users=10, ttl_seconds=1e12)
    info = load_snapshot(path, items=None, profiles=full, model_version="m", dim=DIM, now=0.0, ttl_seconds=1e12)
    assert info is not None and info.users == 0 and len(full) == 0  # a compact profile holds no vectors


def test_a_full_snapshot_loads_into_a_compact_store_as_the_same_user_model(tmp_path: Path) -> None:
    catalog = Catalog()
    settings, cfg = config()
    full = InProcessProfileStore(cfg, max_users=10, ttl_seconds=1e12)
    events = random_events(catalog, np.random.default_rng(9), 300)
    now = events[-1][0].timestamp
    full.apply(events, now)
    save_snapshot(tmp_path / "full.npz", items=None, profiles=full, model_version="m", dim=DIM)
    compact = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    info = load_snapshot(tmp_path / "full.npz", items=None, profiles=compact, model_version="m", dim=DIM, now=now,
                         ttl_seconds=1e12)
    assert info is not None and info.users == 3
    for user in ("u0", "u1", "u2"):
        assert_same_user_model(full.get(user), compact.get(user), settings, catalog)  # type: ignore[arg-type]
    # and it goes on as a profile folded in the compact layout from the start would
    more = random_events(catalog, np.random.default_rng(10), 100)
    more = [(dataclasses.replace(e, timestamp=e.timestamp + 2e6), v) for e, v in more]
    compact.apply(more, now + 3e6)
    full.apply(more, now + 3e6)
    for user in ("u0", "u1", "u2"):
        assert_same_user_model(full.get(user), compact.get(user), settings, catalog)  # type: ignore[arg-type]


# --- Redis ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


def redis_store(url: str, catalog: Catalog, settings: Settings) -> CompactRedisProfileStore:
    settings = dataclasses.replace(settings, redis_url=url, profile_layout="compact")
    store = make_profile_store(settings.users, settings.redis, DIM, lookup=catalog)
    assert isinstance(store, CompactRedisProfileStore)
    return store


def test_redis_holds_exactly_the_bytes_the_in_process_store_holds(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    catalog = Catalog()
    settings, cfg = config()
    local = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    shared = redis_store(redis_server.url, catalog, settings)
    events = random_events(catalog, np.random.default_rng(5), 300)
    for start in range(0, len(events), 11):
        batch, now = events[start : start + 11], events[start][0].timestamp
        assert shared.apply(batch, now) == local.apply(batch, now)
    client = redis_server.client()
    for user in ("u0", "u1", "u2"):
        stored = client.get(shared.keys(user)[0])
        assert stored is not None and stored[8:] == local._profiles[user][8:]  # all but the sequence number
        assert client.pttl(shared.keys(user)[0]) > 0
        assert_same_user_model(local.get(user), shared.get(user), settings, catalog)  # type: ignore[arg-type]
    assert shared.hits == 3 and not shared.degraded


def test_concurrent_replicas_never_lose_an_event_on_one_user(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    catalog = Catalog()
    settings, _ = config(max_event_ids_per_user=1000, redis_timeout_ms=5000.0, redis_write_timeout_ms=5000.0)
    replicas = [redis_store(redis_server.url, catalog, settings) for _ in range(4)]

    def write(store: CompactRedisProfileStore, r: int) -> None:
        for k in range(50):
            item = f"i{(r * 7 + k) % 40}"
            store.apply([(Event("hot", item, EventType.CLICK, 1.7e9 + k, f"r{r}-{k}"), catalog.vectors[item])], 1.7e9)

    threads = [threading.Thread(target=write, args=(store, r)) for r, store in enumerate(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not any(s.degraded for s in replicas), [s.last_error for s in replicas]
    state = replicas[0].get("hot")
    assert state is not None and state.event_count == 200
    # Replaying everything adds nothing (idempotency by event id across replicas).
    write(replicas[1], 0)
    assert replicas[2].get("hot").event_count == 200  # type: ignore[union-attr]


def test_a_redis_outage_falls_back_and_replays_into_the_compact_key() -> None:
    server = RedisServer().start()
    try:
        catalog = Catalog()
        settings, _ = config()
        store = redis_store(server.url, catalog, dataclasses.replace(settings, redis_retry_seconds=0.0))
        store.apply([(Event("u", "i1", EventType.CLICK, 1.7e9, "a"), catalog.vectors["i1"])], 1.7e9)
        port = server.port
        server.stop()
        store.apply([(Event("u", "i2", EventType.CLICK, 1.7e9 + 5, "b"), catalog.vectors["i2"])], 1.7e9 + 5)
        assert store.degraded and store.get("u") is not None  # served from the in-process fallback
        server = RedisServer(port).start()
        store.apply([(Event("u", "i3", EventType.CLICK, 1.7e9 + 9, "c"), catalog.vectors["i3"])], 1.7e9 + 9)
        store.close()  # waits for the replay
        fresh = redis_store(server.url, catalog, settings)
        state = fresh.get("u")
        # "a" was lost with the unpersisted Redis; "b" came back from the replay buffer, "c" directly.
        assert state is not None and set(state.history.item_ids) == {"i2", "i3"}
    finally:
        server.cleanup()


def test_replicas_sharing_a_catalog_rank_a_compact_redis_profile_alike(
    redis_server: RedisServer, tmp_path: Path, make_server: ServerFactory
) -> None:
    """Replica A records events (encoding their texts); replica B never saw those items, but maps the
    shared catalog, so it reads the history vectors from there and ranks as A does."""
    from reranker.model.catalog import write_catalog
    from reranker.model.encoder import FakeEncoder

    redis_server.client().flushall()
    texts = {f"p{k}": f"{PIANO} {k}" for k in range(4)} | {f"f{k}": f"football league match goal {k}" for k in range(6)}
    encoder = FakeEncoder(64)
    write_catalog(tmp_path / "c.bin", list(texts), list(texts.values()), encoder.encode(list(texts.values())),
                  model_version=encoder.version, dtype="float32")
    base = dict(profile_layout="compact", redis_url=redis_server.url, redis_timeout_ms=2000.0)
    _, a = make_server(fake_settings(**base))
    _, b = make_server(fake_settings(**base, catalog_path=str(tmp_path / "c.bin"), item_cache_size=2))
    _, blind = make_server(fake_settings(**base, item_cache_size=2))  # no catalog: the rows it cannot see stop counting
    record(a, *(event("u", item, text, event_id=item, **at(1_700_000_000.0 + 10 * k))
                for k, (item, text) in enumerate(texts.items())))
    want = ranked_ids(a, "u", TOPIC_CANDIDATES)
    assert want == ["c-football", "c-piano"]  # the session is the six football events
    assert ranked_ids(b, "u", TOPIC_CANDIDATES) == want
    scores_a = {it.item_id: it.semantic_score for it in a.Rerank(pb.RerankRequest(
        user_id="u", candidates=TOPIC_CANDIDATES), timeout=10).items}
    scores_b = {it.item_id: it.semantic_score for it in b.Rerank(pb.RerankRequest(
        user_id="u", candidates=TOPIC_CANDIDATES), timeout=10).items}
    assert scores_b == pytest.approx(scores_a, abs=1e-6)
    assert ranked_ids(blind, "u", TOPIC_CANDIDATES)  # still personalized from L, never an error


def test_a_value_that_is_not_a_profile_reads_as_a_new_user_and_is_replaced(redis_server: RedisServer,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    redis_server.client().flushall()
    catalog = Catalog()
    settings, _ = config()
    store = redis_store(redis_server.url, catalog, settings)
    client = redis_server.client()
    for junk in (b"x", b"not a profile at all" * 10):
        client.set(store.keys("u")[0], junk)
        assert store.get("u") is None  # cold, never an exception on the Rerank path
        result = store.apply([(Event("u", "i1", EventType.CLICK, 1.7e9, f"e{len(junk)}"), catalog.vectors["i1"])], 1.7e9)
        assert result.accepted == 1 and not store.degraded
        state = store.get("u")
        assert state is not None and state.event_count == 1 and state.history.item_ids == ("i1",)
    # Dropped when first read (counted once each), so the write found a new user.
    assert store.unreadable_reasons == {"layout": 2} and "is unreadable" in caplog.text


@pytest.mark.parametrize("ahead", [900.0, 5e6])  # rescaled exactly / rebuilt from the rows (rate x ahead > 20)
def test_a_future_clock_is_repaired_as_the_full_layout_repairs_it(ahead: float) -> None:
    catalog = Catalog()
    settings, cfg = config(max_event_skew_seconds=60.0)
    full = InProcessProfileStore(cfg, max_users=10, ttl_seconds=1e12)
    compact = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    events = random_events(catalog, np.random.default_rng(21), 120, users=1)
    future = events[-1][0].timestamp
    full.apply(events, future)  # folded by a build that let future events in
    compact.apply(events, future)
    now = future - ahead
    [(user, profile)] = next(full.export_chunks(10))
    assert full.restore(user, profile, now)
    [(_, blob)] = next(compact.export_chunks(10))
    assert compact.restore(user, blob, now) and compact.repairs == 1
    a, b = full.get(user), compact.get(user)
    assert a is not None and b is not None and b.ref_time == now
    assert_same_user_model(a, b, settings, catalog)
