"""Consumed items: the per-user memory, leave-one-out similarity, the policies through a real server,
and a head that learns the domain's repeat behaviour from the events (both directions)."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from reranker.users import usermodel
from reranker.itemkeys import item_key, item_keys
from reranker.users.consumed import ConsumedItems
from reranker.model.encoder import FakeEncoder
from reranker.evaluation import formats, train
from reranker.ranking.head import FEATURES
from reranker.users.compact import CompactProfileStore, table_lookup
from reranker.users.profiles import LEFT_OUT_KEPT, ProfileConfig, candidate_history, user_vector
from reranker.types import Event, EventType
from reranker.v1 import reranker_pb2 as pb

from conftest import ServerFactory, candidate, event, fake_settings

ids_strategy = st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=20)


@given(ids_strategy)
@hsettings(max_examples=100, deadline=None)
def test_item_keys_do_not_depend_on_the_other_ids(ids: list[str]) -> None:
    together = item_keys(ids)
    alone = np.array([item_key(i) for i in ids], dtype=np.uint64)
    assert (together == alone).all()
    distinct = set(ids)
    assert len(set(together.tolist())) == len(distinct)  # no collisions on small sets


def test_consumed_memory_counts_repeats_and_forgets_the_least_recent() -> None:
    memory = ConsumedItems.empty()
    for key, ts in [(5, 1.0), (3, 2.0), (5, 3.0), (9, 4.0)]:
        memory.add(key, ts, 1.0, capacity=3)
    counts, last, _, _ = memory.lookup(np.array([5, 3, 9, 7], dtype=np.uint64))
    assert counts.tolist() == [2, 1, 1, 0] and last[:3].tolist() == [3.0, 2.0, 4.0] and last[3] == -math.inf
    assert memory.repeats == 1 and memory.events == 4 and memory.repeat_rate == 0.25
    memory.add(11, 5.0, 1.0, capacity=3)  # full: item 3 (newest event at 2.0) is forgotten
    assert memory.lookup(np.array([3, 11], dtype=np.uint64))[0].tolist() == [0, 1]


def _lookup(dim: int = 16):  # type: ignore[no-untyped-def]
    """The items a-e as the item cache would give them (FakeEncoder vectors)."""
    return table_lookup({c: k for k, c in enumerate("abcde")}, FakeEncoder(dim).encode(list("abcde")))


def _store(dim: int = 16, half_life: float = 100.0, history: int = 20) -> CompactProfileStore:
    cfg = ProfileConfig(dim, usermodel.decay_rate(half_life), {"click": 1.0, "dislike": -1.0}, 50, history, 100, 100)
    return CompactProfileStore(cfg, _lookup(dim), max_users=10, ttl_seconds=1e9)


event_rows = st.lists(
    st.tuples(st.sampled_from("abcde"), st.floats(0, 500), st.sampled_from([EventType.CLICK, EventType.DISLIKE])),
    min_size=1, max_size=25,
)


@given(event_rows)
@hsettings(max_examples=60, deadline=None)
def test_long_term_mass_removes_exactly_the_items_own_events(rows: list[tuple[str, float, EventType]]) -> None:
    """L - mass_c v_c equals the L of the same events without item c (any order, any times)."""
    dim = 16
    vectors = {c: FakeEncoder(dim).encode([c])[0] for c in "abcde"}
    full = _store(dim)
    full.apply([(Event("u", i, t, ts), vectors[i]) for i, ts, t in rows], now=0.0)
    state = full.get("u")
    assert state is not None
    for c in "abcde":
        _, _, mass, session_mass = state.consumed.lookup(item_keys([c]))
        without = _store(dim)
        rest = [(Event("u", i, t, ts), vectors[i]) for i, ts, t in rows if i != c]
        without.apply(rest, now=0.0)
        expected = np.zeros(dim)
        other = without.get("u")
        if other is not None and rest:
            # Bring the other L into this L's frame (their newest times may differ).
            expected = other.long_term * math.exp(-usermodel.decay_rate(100.0) * (state.ref_time - other.ref_time))
        got = state.long_term - mass[0] * vectors[c].astype(np.float64)
        np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, float(np.linalg.norm(state.long_term))))  # L: float32


def test_candidate_history_gives_the_user_vector_without_the_candidate() -> None:
    settings = fake_settings(fake_dim=16, half_life_seconds=100.0)
    enc = FakeEncoder(16)
    items = ["a", "b", "c", "d"]
    vec = dict(zip(items, enc.encode(items)))
    store = CompactProfileStore(ProfileConfig.from_settings(settings.users, 16), _lookup(), max_users=10, ttl_seconds=1e9)
    history = [("a", 10.0), ("b", 20.0), ("a", 30.0), ("c", 40.0)]
    store.apply([(Event("with", i, EventType.CLICK, t), vec[i]) for i, t in history], now=0.0)
    store.apply([(Event("without", i, EventType.CLICK, t), vec[i]) for i, t in history if i != "a"], now=0.0)
    with_a, without_a = store.get("with"), store.get("without")
    assert with_a is not None and without_a is not None
    cands = ["a", "d"]
    vectors = np.stack([vec[c] for c in cands])
    seen = candidate_history(with_a, settings.users, cands, vectors, np.ones(2, bool), user_vector(with_a, settings.users))
    assert seen.counts.tolist() == [2, 0] and seen.excluded is not None and seen.excluded.tolist() == [0]
    reference = user_vector(without_a, settings.users)
    assert reference is not None and seen.user_vectors is not None
    np.testing.assert_allclose(seen.user_vectors[0], reference, atol=1e-5)
    assert seen.own_rows is not None and seen.own_rows[:, 0].tolist() == [True, False, True, False]
    assert seen.hours_since[0] == pytest.approx(10.0 / 3600.0) and seen.hours_since[1] == math.inf



def test_candidate_history_per_candidate_arrays_match_the_dense_recipe_when_the_memory_forgot_history_items() -> None:
    """candidate_history reads the few consumed candidates only; its (n,) arrays are those of the
    dense recipe (every candidate against the memory and every history row), also for a memory
    smaller than the history (a history row's item forgotten: its own row is still marked), for
    candidates without a vector (consumed, not left out) and for unknown keys (0)."""
    settings = fake_settings(fake_dim=16, half_life_seconds=100.0)
    ids = [f"i{k}" for k in range(8)]
    vec = dict(zip(ids + ["x"], FakeEncoder(16).encode(ids + ["x"])))
    store = CompactProfileStore(ProfileConfig.from_settings(settings.users, 16),
                                table_lookup({c: k for k, c in enumerate(ids)}, np.stack([vec[i] for i in ids])),
                                max_users=10, ttl_seconds=1e9)
    store.apply([(Event("u", i, EventType.CLICK, 10.0 + k), vec[i]) for k, i in enumerate(ids + ids[5:])], now=0.0)
    full = store.get("u", recent=False)
    assert full is not None
    m = full.consumed  # a memory that kept only the newest three items (as a smaller capacity would)
    keep = np.isin(m.keys, item_keys(ids[5:]))
    state = dataclasses.replace(full, consumed=ConsumedItems(m.keys[keep], m.counts[keep], m.last[keep], m.mass[keep],
                                                             m.session_mass[keep], m.repeats, m.events), derived={})
    history_keys = item_keys(state.history.item_ids)
    assert not np.isin(history_keys, state.consumed.keys).all()  # the memory forgot some history items
    cands = ["x", "i1", "i6", "i7", "i5", "i0"]  # not consumed, forgotten, remembered (i5 without a vector)
    vectors = np.stack([vec[c] for c in cands])
    has_vector = np.array([True, True, True, True, False, True])
    for keys in (item_keys(cands), np.where(np.arange(len(cands)) % 2 == 0, item_keys(cands), np.uint64(0))):
        seen = candidate_history(state, settings.users, cands, vectors, has_vector,
                                 user_vector(state, settings.users), keys=keys.astype(np.uint64))
        counts, last, _, _ = state.consumed.lookup(item_keys(cands))
        hours = np.where(counts > 0, np.maximum(state.consumed.last.max() - last, 0.0) / 3600.0, math.inf)
        assert seen.counts.tolist() == counts.tolist() and seen.hours_since.tolist() == hours.tolist()
        assert seen.consumed.tolist() == (counts > 0).tolist() and seen.consumed_count == int((counts > 0).sum()) == 3
        assert seen.excluded is not None and seen.excluded.tolist() == [2, 3]  # i5 has no vector
        own = history_keys[:, None] == item_keys(cands)[None, :]
        assert seen.own_rows is not None and (seen.own_rows == own).all() and own[:, 1].any()  # i1: forgotten, own row


def test_leave_one_out_vectors_are_the_same_bits_warm_or_cold_and_follow_a_new_item_vector() -> None:
    """The user's state is shared by its requests: the leave-one-out vector of a consumed candidate
    is computed once per item vector, with the bits of a fresh computation for any mix of candidates,
    and a re-encoded item (same id, another vector) is computed anew."""
    settings = fake_settings(fake_dim=16, half_life_seconds=100.0)
    vec = dict(zip("abcd", FakeEncoder(16).encode(list("abcd"))))
    events = [(Event("u", i, EventType.CLICK, t), vec[i]) for i, t in [("a", 10.0), ("b", 20.0), ("a", 30.0), ("c", 40.0)]]

    def fresh() -> object:
        store = _store()
        store.apply(events, now=0.0)
        return store.get("u")

    def leave_one_out(state: object, cands: list[str], vectors: np.ndarray) -> np.ndarray:
        seen = candidate_history(state, settings.users, cands, vectors, np.ones(len(cands), bool),  # type: ignore[arg-type]
                                 user_vector(state, settings.users))  # type: ignore[arg-type]
        assert seen.user_vectors is not None
        return seen.user_vectors

    shared = fresh()
    for cands in (["a", "b", "c", "d"], ["c", "a"], ["b"], ["d", "c", "b", "a"]):
        vectors = np.stack([vec[c] for c in cands])
        warm, cold = leave_one_out(shared, cands, vectors), leave_one_out(fresh(), cands, vectors)
        assert warm.tobytes() == cold.tobytes(), cands
    other = -vec["a"]  # "a" re-encoded
    warm, cold = leave_one_out(shared, ["a"], other[None, :]), leave_one_out(fresh(), ["a"], other[None, :])
    assert warm.tobytes() == cold.tobytes()
    assert warm.tobytes() != leave_one_out(fresh(), ["a"], vec["a"][None, :]).tobytes()

def test_the_leave_one_out_rows_kept_per_user_state_stay_bounded() -> None:
    """A user state is kept between requests (user_state_cache_size of them): however many consumed
    candidates its requests carry, it keeps at most LEFT_OUT_KEPT leave-one-out rows, and the rows it
    answers are the bits of a fresh computation."""
    settings = fake_settings(fake_dim=16, half_life_seconds=100.0)
    ids = [f"i{k}" for k in range(60)]
    vec = dict(zip(ids, FakeEncoder(16).encode(ids)))
    store = _store()
    store.apply([(Event("u", i, EventType.CLICK, 10.0 + k), vec[i]) for k, i in enumerate(ids)], now=0.0)
    state = store.get("u")
    for start in (0, 20, 40, 0):
        cands = ids[start:start + 20]
        vectors = np.stack([vec[c] for c in cands])
        seen = candidate_history(state, settings.users, cands, vectors, np.ones(len(cands), bool),  # type: ignore[arg-type]
                                 user_vector(state, settings.users))  # type: ignore[arg-type]
        assert seen.user_vectors is not None and len(seen.user_vectors) == 20
        assert len(state.derived.get("left_out", {})) <= LEFT_OUT_KEPT  # type: ignore[union-attr]
        fresh = _store()
        fresh.apply([(Event("u", i, EventType.CLICK, 10.0 + k), vec[i]) for k, i in enumerate(ids)], now=0.0)
        cold = candidate_history(fresh.get("u"), settings.users, cands, vectors, np.ones(len(cands), bool),  # type: ignore[arg-type]
                                 user_vector(fresh.get("u"), settings.users))  # type: ignore[arg-type]
        assert seen.user_vectors.tobytes() == cold.user_vectors.tobytes()  # type: ignore[union-attr]


# --- through a real server -----------------------------------------------------------------------------
TEXTS = {"g1": "gardening tools", "g2": "gardening gloves", "g3": "gardening seeds", "k1": "knitting yarn",
         "s1": "space opera"}


def _load(stub: object, user: str, history: list[str]) -> None:
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=i, text=t) for i, t in TEXTS.items()]))  # type: ignore[attr-defined]
    now = time.time()
    events = []
    for n, item in enumerate(history):
        e = event(user, item, event_id=f"{user}-{n}")
        e.timestamp.FromNanoseconds(int((now - 100 + n) * 1e9))
        events.append(e)
    stub.RecordEvents(pb.RecordEventsRequest(events=events))  # type: ignore[attr-defined]


def _rerank(stub: object, user: str, policy: int = pb.CONSUMED_POLICY_UNSPECIFIED, **opts: object) -> pb.RerankResponse:
    cands = [candidate("g1", 3.0), candidate("k1", 2.0), candidate("g2", 1.0), candidate("s1", 0.5)]
    options = pb.RerankOptions(consumed=policy, **opts)  # type: ignore[arg-type]
    return stub.Rerank(pb.RerankRequest(user_id=user, candidates=cands, options=options))  # type: ignore[attr-defined,no-any-return]


def test_policies_through_the_server(make_server: ServerFactory) -> None:
    # Upstream order (blend 0), so only the policy moves items; no population prior (see below).
    _, stub = make_server(fake_settings(blend_weight=0.0, consumed_prior_events=0.0))
    _load(stub, "u", ["g1", "g3", "g3"])
    keep = _rerank(stub, "u", pb.CONSUMED_POLICY_KEEP)
    assert [it.item_id for it in keep.items] == ["g1", "k1", "g2", "s1"] and keep.consumed_candidates == 1
    demote = _rerank(stub, "u", pb.CONSUMED_POLICY_DEMOTE)
    assert [it.item_id for it in demote.items] == ["k1", "g2", "s1", "g1"] and demote.consumed_dropped == 0
    drop = _rerank(stub, "u", pb.CONSUMED_POLICY_DROP)
    assert [it.item_id for it in drop.items] == ["k1", "g2", "s1"] and drop.consumed_dropped == 1
    top = stub.Rerank(pb.RerankRequest(user_id="u", top_k=2, candidates=[candidate("g1", 3.0), candidate("k1", 2.0),
                      candidate("g2", 1.0)], options=pb.RerankOptions(consumed=pb.CONSUMED_POLICY_DEMOTE)))
    assert [it.item_id for it in top.items] == ["k1", "g2"]  # the policy applies before top_k
    # learned without a head: g3 twice is a repeat (1 of 3 events), above consumed_repeat_rate: kept.
    assert [it.item_id for it in _rerank(stub, "u").items] == ["g1", "k1", "g2", "s1"]
    _load(stub, "v", ["g1", "g3"])  # no repeats: learned demotes
    assert [it.item_id for it in _rerank(stub, "v").items] == ["k1", "g2", "s1", "g1"]


@pytest.mark.parametrize(("population_repeats", "expected_last"), [(False, "g1"), (True, "s1")])
def test_a_new_user_starts_from_the_populations_repeat_rate(
    make_server: ServerFactory, population_repeats: bool, expected_last: str
) -> None:
    _, stub = make_server(fake_settings(blend_weight=0.0))  # consumed_prior_events: 10 pseudo-events
    for n in range(10):
        _load(stub, f"p{n}", ["g2", "g3", "g2", "g3"] if population_repeats else ["g2", "g3", "k1", "s1"])
    _load(stub, "new", ["g1", "g3"])  # two events, no repeat yet
    # A population that repeats half the time: the new user's estimate (0 + 10 * 0.5) / 12 keeps g1;
    # one that never repeats: (0 + 0) / 12, demoted.
    assert _rerank(stub, "new").items[-1].item_id == expected_last


def test_a_candidate_is_never_similar_through_its_own_events(make_server: ServerFactory) -> None:
    _, stub = make_server(fake_settings(blend_weight=1.0))  # semantic score alone (with attention pooling)
    _load(stub, "with", ["k1", "g3", "g1", "g1"])
    _load(stub, "without", ["k1", "g3"])
    a = {it.item_id: it.semantic_score for it in _rerank(stub, "with", pb.CONSUMED_POLICY_KEEP).items}
    b = {it.item_id: it.semantic_score for it in _rerank(stub, "without", pb.CONSUMED_POLICY_KEEP).items}
    # g1's own events are left out of its comparison: it scores as if the user had never seen it.
    assert a["g1"] == pytest.approx(b["g1"], abs=1e-5)
    assert a["g2"] != pytest.approx(b["g2"], abs=1e-5)  # other candidates do see the g1 events


def test_unknown_policy_value_is_refused_naming_the_field(make_server: ServerFactory) -> None:
    import grpc

    _, stub = make_server()
    with pytest.raises(grpc.RpcError) as err:
        _rerank(stub, "u", 99)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "options.consumed" in err.value.details()


# --- the head learns the domain's repeat behaviour --------------------------------------------------
def _repeat_log(repeat_share: float, users: int = 80, length: int = 14, seed: int = 0) -> list[formats.Interaction]:
    """A generated log over 60 items: each next event repeats one of the user's last 5 items with
    probability `repeat_share`, else goes to an item the user never had."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(users):
        seen: list[str] = []
        for t in range(length):
            if seen and rng.random() < repeat_share:
                item = seen[-1 - int(rng.integers(0, min(5, len(seen))))]
            else:
                item = f"i{int(rng.choice([j for j in range(60) if f'i{j}' not in seen]))}"
            seen.append(item)
            out.append(formats.Interaction(f"u{u}", item, 1000.0 * u + t, "click"))
    return out


def _trained_head(events: list[formats.Interaction]) -> object:
    items = {f"i{j}": f"item number {j} of topic {j % 6}" for j in range(60)}
    settings = fake_settings(fake_dim=32)
    cfg = train.TrainConfig(retrievers=("popularity", "itemknn"), adapter_epochs=1, num_candidates=30,
                            labels_per_user=3, mf_factors=8, blend_steps=200)
    head, _ = train.train(items, events, settings, cfg, encoder=FakeEncoder(32))
    return head


@pytest.mark.parametrize(("repeat_share", "sign"), [(0.5, 1.0), (0.0, -1.0)])
def test_the_head_learns_whether_repeats_rise_or_sink(repeat_share: float, sign: float) -> None:
    head = _trained_head(_repeat_log(repeat_share))
    weights = dict(zip(FEATURES, head.weights.tolist()))  # type: ignore[attr-defined]
    # Standardized weights: the consumed indicator and its interaction with the user's repeat rate.
    push = weights["consumed"] + weights["consumed_repeat"] + weights["consumed_count"] + weights["consumed_recency"]
    assert sign * push > 0.5, weights
