"""IntRowIndex against a dict: lookups of whole key arrays through sets, overwrites, deletes
(tombstones) and rebuilds, with keys that share home slots (long probe runs) and keys that do not."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings as hsettings, strategies as st

from reranker.model.intindex import INT64_MAX, INT64_MIN, IntRowIndex

# A few keys far apart (random int64s, the extremes) and a run of small consecutive ones: with a
# 16-slot table many of them share a home slot, so lookups walk probe runs past tombstones.
_POOL = sorted({INT64_MIN, INT64_MAX, -1, 0, *range(1, 40), *np.random.default_rng(7).integers(INT64_MIN, INT64_MAX, 40, dtype=np.int64).tolist()})
_key = st.sampled_from(_POOL)
_op = st.one_of(
    st.tuples(st.just("set"), _key, st.integers(0, 1000)),
    st.tuples(st.just("delete"), _key, st.just(0)),
    st.tuples(st.just("get"), st.lists(_key, max_size=40).map(tuple), st.just(0)),
)


@hsettings(max_examples=150, deadline=None)
@given(st.lists(_op, max_size=80), st.integers(1, 40))
def test_get_equals_a_dict_through_sets_deletes_and_rebuilds(ops, capacity) -> None:  # type: ignore[no-untyped-def]
    index, model = IntRowIndex(capacity), {}
    for kind, key, row in ops:
        if kind == "set":
            index.set(key, row)
            model[key] = row
        elif kind == "delete":
            index.delete(key)
            model.pop(key, None)
        else:
            keys = np.array(key, dtype=np.int64)
            rows, every = index.find(keys)
            assert rows.tolist() == [model.get(k, -1) for k in key]
            assert every == all(k in model for k in key)
        assert len(index) == len(model)
    everything = np.array(_POOL, dtype=np.int64)
    assert index.get(everything).tolist() == [model.get(k, -1) for k in _POOL]


def test_keys_that_all_sit_in_their_home_slot_and_keys_that_do_not() -> None:
    index = IntRowIndex(64)
    for k in range(50):  # consecutive keys: Fibonacci hashing gives each its own home slot
        index.set(k, 100 + k)
    assert index.get(np.arange(50)).tolist() == list(range(100, 150))
    assert index.get(np.array([3, 50, 4])).tolist() == [103, -1, 104]
    # A key placed after another with the same home is found one probe on, also in a mixed request.
    slots = index._homes(np.arange(1000, 200_000, dtype=np.int64))
    home = int(index._homes(np.array([7], dtype=np.int64))[0])
    displaced = 1000 + int(np.flatnonzero(slots == home)[0])
    index.set(displaced, 999)
    assert index.get(np.array([displaced, 7, 8], dtype=np.int64)).tolist() == [999, 107, 108]
    index.delete(7)  # a tombstone in the home slot: the displaced key is still found, 7 is not
    assert index.get(np.array([7, displaced], dtype=np.int64)).tolist() == [-1, 999]
    assert index.get(np.array([], dtype=np.int64)).tolist() == []
