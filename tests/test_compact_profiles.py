"""Compact profiles (the one layout): the user model of usermodel.py, recomputed from scratch here
(`reference_state`, float64 over every event: what the full layout kept exactly), in a few KB per
user, item vectors looked up instead of copied; in process, in Redis, in snapshots, through gRPC.
How the full layout ranked is frozen in test_profile_reference (ml-100k) and its snapshots and
Redis keys in test_snapshot / test_redis_profiles (converted)."""

from __future__ import annotations

import dataclasses
import runpy
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from reranker.config import Settings
from reranker.model.encoder import FakeEncoder
from reranker.types import Event, EventType
from reranker.itemkeys import item_keys
from reranker.users.compact import CompactProfileStore, ProfileFormatError, decode, encode
from reranker.users.compact_redis import CompactRedisProfileStore
from reranker.users import usermodel
from reranker.users.consumed import ConsumedItems
from reranker.users.profiles import ProfileConfig, UserState, candidate_history, user_vector
from reranker.users.snapshot import load_snapshot, save_snapshot
from reranker.users.stores import make_profile_store
from reranker.v1 import reranker_pb2 as pb
from conftest import ServerFactory, candidate, event, fake_settings
from redis_server import RedisServer
from test_user_events import PIANO, TOPIC_CANDIDATES, at, profile, ranked_ids, record

DIM = 16
DATA = Path(__file__).resolve().parent / "data"  # full-layout fixtures (tests/data/README.md)


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


def reference_state(events: Sequence[tuple[Event, np.ndarray | None]], user: str, cfg: ProfileConfig, *,
                    now: float | None = None, rows_only: bool = False) -> UserState:
    """The user model of `user` after `events`, from scratch (usermodel.py's formulas over the whole
    list, float64): idempotency over the last `max_event_ids` ids, L and S relative to the newest
    folded time, the newest `max_history` rows, the consumed memory. `now`: event times clamped to it
    (a repaired future clock); `rows_only`: L, S and masses from the history rows alone (a repair
    that rebuilt them)."""
    seen: list[str] = []
    accepted = []
    for event, vector in events:
        if event.user_id != user:
            continue
        if event.event_id:
            if event.event_id in seen:
                continue
            seen = (seen + [event.event_id])[-cfg.max_event_ids:]
        t = event.timestamp if now is None else min(event.timestamp, now)
        accepted.append((event, t, vector, cfg.weight_of(event)))
    folded = [(k, e, t, v, w) for k, (e, t, v, w) in enumerate(accepted) if v is not None]
    rows = sorted(folded, key=lambda r: (r[1].timestamp, r[0]))[-cfg.max_history:]  # by the times as sent
    ref = max(t for _, _, t, _, _ in folded)
    terms = rows if rows_only else folded

    def decayed(rate: float, part: list) -> np.ndarray:
        return sum((w * np.exp(-rate * (ref - t)) * v.astype(np.float64) for _, _, t, v, w in part), np.zeros(DIM))

    keys = item_keys([e.item_id for e, _, _, _ in accepted])
    in_terms = {k for k, *_ in terms}
    table: dict[int, list[float]] = {}
    repeats = 0
    for k, ((e, t, v, w), key) in enumerate(zip(accepted, keys.tolist())):
        repeats += key in table
        row = table.setdefault(key, [0, -np.inf, 0.0, 0.0])
        row[0] += 1
        row[1] = max(row[1], t)
        if v is not None and k in in_terms:
            row[2] += w * np.exp(-cfg.decay_rate * (ref - t))
            row[3] += w * np.exp(-cfg.session_rate * (ref - t))
    newest = sorted(table, key=lambda key: table[key][1])[-cfg.max_consumed:]
    order = np.sort(np.array(newest, dtype=np.uint64))
    values = np.array([table[int(key)] for key in order], dtype=np.float64).reshape(-1, 4)
    consumed = ConsumedItems(order, values[:, 0].astype(np.int64), values[:, 1], values[:, 2], values[:, 3], repeats,
                             len(accepted))
    history = usermodel.History(tuple(e.item_id for _, e, _, _, _ in rows), np.array([t for _, _, t, _, _ in rows]),
                                np.array([w for *_, w in rows], dtype=np.float64),
                                np.stack([v for _, _, _, v, _ in rows]).astype(np.float32))
    return UserState(user, decayed(cfg.decay_rate, terms), ref, len(accepted), 0.0, (), history,
                     decayed(cfg.session_rate, terms), consumed)


def assert_same_user_model(want: UserState, compact: UserState, settings: Settings, catalog: Catalog) -> None:
    scale = max(1.0, float(np.linalg.norm(want.long_term)))
    np.testing.assert_allclose(compact.long_term, want.long_term, atol=1e-6 * scale)
    np.testing.assert_allclose(compact.session, want.session, atol=1e-6 * max(1.0, float(np.linalg.norm(want.session))))
    assert compact.ref_time == want.ref_time and compact.event_count == want.event_count
    assert compact.history.item_ids == want.history.item_ids
    np.testing.assert_array_equal(compact.history.timestamps, want.history.timestamps)
    np.testing.assert_allclose(compact.history.weights, want.history.weights, rtol=1e-6)
    np.testing.assert_array_equal(compact.history.vectors, want.history.vectors)
    keys = np.union1d(want.consumed.keys, compact.consumed.keys)
    for got_column, want_column in zip(compact.consumed.lookup(keys), want.consumed.lookup(keys)):
        np.testing.assert_allclose(got_column, want_column, rtol=1e-6, atol=1e-6)  # S_tail: dropped once negligible
    assert (compact.consumed.repeats, compact.consumed.events) == (want.consumed.repeats, want.consumed.events)
    u_want, u_compact = user_vector(want, settings.users), user_vector(compact, settings.users)
    np.testing.assert_allclose(u_compact, u_want, atol=1e-5)
    ids = list(catalog.vectors)
    vectors, found = catalog(ids)
    want = candidate_history(want, settings.users, ids, vectors, found, u_want).cosine(vectors, u_want)
    got = candidate_history(compact, settings.users, ids, vectors, found, u_compact).cosine(vectors, u_compact)
    np.testing.assert_allclose(got, want, atol=1e-5)  # leave-one-out similarities too


@pytest.mark.parametrize("seed", range(4))
def test_compact_store_keeps_the_user_model_of_its_events(seed: int) -> None:
    catalog = Catalog(seed=seed)
    settings, cfg = config()
    compact = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    rng = np.random.default_rng(seed)
    events = random_events(catalog, rng, 400)
    for start in range(0, len(events), 7):  # batches of mixed users
        batch, now = events[start : start + 7], events[min(start + 6, len(events) - 1)][0].timestamp
        compact.apply(batch, now)
    want = {user: reference_state(events, user, cfg) for user in ("u0", "u1", "u2")}
    for user in ("u0", "u1", "u2"):
        assert_same_user_model(want[user], compact.get(user), settings, catalog)  # type: ignore[arg-type]
        blob = compact._profiles[user]
        assert len(blob) < 2048 and encode(decode(blob, DIM)) == blob
    assert (compact.repeats, compact.consumed_events) == (sum(w.consumed.repeats for w in want.values()),
                                                          sum(w.consumed.events for w in want.values()))


def test_the_consumed_memory_beyond_the_history_rows_is_capped() -> None:
    catalog = Catalog(items=40)
    _, cfg = config(consumed_items_per_user=11)
    store = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    pairs = [(Event("u", f"i{k}", EventType.CLICK, 1.7e9 + k), catalog.vectors[f"i{k}"]) for k in range(40)]
    for pair in pairs:  # 40 distinct items: 5 stay in the history rows, 6 more are remembered beyond them
        store.apply([pair], pair[0].timestamp)
    p = decode(store._profiles["u"], DIM)
    assert len(p.row_ids) == 5 and len(p.tail) == 6
    assert set(p.row_ids) == {f"i{k}" for k in range(35, 40)}  # the newest; the tail holds the next newest
    state, want = store.get("u"), reference_state(pairs, "u", cfg)
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
    assert store.held_bytes("user-1") * 10 < 20 * 384 * 4 + 2 * 384 * 8  # what copying the vectors in would take


# --- through a real server -----------------------------------------------------------------------
def test_a_compact_server_keeps_serving_when_history_vectors_leave_the_item_cache(make_server: ServerFactory) -> None:
    _, stub = make_server(fake_settings(profile_layout="compact", item_cache_size=8))
    record(stub, *(event("u1", f"p{k}", f"{PIANO} {k}", **at(1_700_000_000.0 + k)) for k in range(12)))
    # 12 history items and 2 candidates through an 8-item cache: some history rows have no vector now.
    assert ranked_ids(stub, "u1", TOPIC_CANDIDATES) == ["c-piano", "c-football"]
    assert profile(stub, "u1").event_count == 12


def test_compact_snapshots_round_trip(tmp_path: Path) -> None:
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


def test_a_converted_full_profile_goes_on_as_the_user_model_of_all_its_events() -> None:
    """The frozen full-layout snapshot (tests/data) converted, then more events: the user model of
    the fixture's events and the new ones together."""
    fixture = runpy.run_path(str(DATA / "make_full_layout_fixtures.py"))
    texts = fixture["ITEMS"]
    vector_of = dict(zip(texts, FakeEncoder(16).encode(list(texts.values()))))
    catalog = Catalog(items=0)
    catalog.vectors = dict(vector_of)
    settings = dataclasses.replace(Settings(), fake_dim=16)
    cfg = ProfileConfig.from_settings(settings.users, 16)
    store = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    info = load_snapshot(DATA / "full_layout_snapshot.npz", items=None, profiles=store, model_version="fake-hash-v1",
                         dim=16, now=time.time(), ttl_seconds=1e12)
    assert info is not None and info.users == 3
    events = [(e, vector_of.get(e.item_id)) for e in fixture["events"]()]
    t0 = fixture["T0"]
    more = [(Event(user, f"i{(3 * k + n) % 40}", EventType(1 + k % 5), t0 + 9000.0 + 45.0 * k - 700.0 * (k % 4 == 1),
                   f"{user}-more-{k}"), vector_of[f"i{(3 * k + n) % 40}"])
            for n, user in enumerate(("alice", "bob", "carol")) for k in range(25)]
    store.apply(more, t0 + 20_000.0)
    for user in ("alice", "bob", "carol"):
        assert_same_user_model(reference_state(events + more, user, cfg), store.get(user), settings, catalog)  # type: ignore[arg-type]


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
def test_a_future_clock_is_repaired_as_if_the_future_events_had_come_in_at_now(ahead: float) -> None:
    catalog = Catalog()
    settings, cfg = config(max_event_skew_seconds=60.0, vector_history_size=20)
    compact = CompactProfileStore(cfg, catalog, max_users=10, ttl_seconds=1e12)
    events = random_events(catalog, np.random.default_rng(21), 120, users=1)
    future = events[-1][0].timestamp
    compact.apply(events, future)  # folded by a build that let future events in
    now = future - ahead
    [(user, blob)] = next(compact.export_chunks(10))
    assert compact.restore(user, blob, now) and compact.repairs == 1
    b = compact.get(user)
    assert b is not None and b.ref_time == now
    exact = cfg.decay_rate * ahead <= 20 and cfg.session_rate * ahead <= 20
    assert exact == (ahead == 900.0)
    want = reference_state(events, user, cfg, now=now, rows_only=not exact)
    assert_same_user_model(want, b, settings, catalog)
