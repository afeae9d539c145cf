"""ItemVectorCache: contiguous matrix, text fingerprints, least-recently-used eviction."""

from __future__ import annotations

import threading

import numpy as np

from reranker.model.items import ItemVectorCache


def _vec(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_hits_require_the_same_text_unless_no_text_is_given() -> None:
    cache = ItemVectorCache(capacity=10, dim=8)
    cache.put(["a", "b"], ["text a", "text b"], np.stack([_vec(1), _vec(2)]))
    vectors, hit = cache.lookup(["a", "b", "c", "a"], ["text a", "changed", None, None])
    assert hit.tolist() == [True, False, False, True]
    np.testing.assert_array_equal(vectors[0], _vec(1))
    np.testing.assert_array_equal(vectors[3], _vec(1))
    assert not vectors[1].any() and not vectors[2].any()
    assert (cache.hits, cache.misses) == (2, 2)


def test_replacing_a_text_updates_the_row_in_place() -> None:
    cache = ItemVectorCache(capacity=10, dim=8)
    cache.put(["a"], ["old"], _vec(1)[None])
    cache.put(["a"], ["new"], _vec(2)[None])
    assert len(cache) == 1
    vectors, hit = cache.lookup(["a", "a"], ["new", "old"])
    assert hit.tolist() == [True, False]
    np.testing.assert_array_equal(vectors[0], _vec(2))


def test_least_recently_used_entries_are_evicted_first() -> None:
    cache = ItemVectorCache(capacity=3, dim=8, initial_rows=1)
    cache.put(["a", "b", "c"], ["a", "b", "c"], np.stack([_vec(i) for i in range(3)]))
    cache.lookup(["a"], [None])  # a is now more recent than b and c
    cache.put(["d", "e"], ["d", "e"], np.stack([_vec(3), _vec(4)]))
    assert len(cache) == 3
    assert [cache.known(i) for i in "abcde"] == [True, False, False, True, True]
    vectors, hit = cache.lookup(["a", "d", "e"], ["a", "d", "e"])
    assert hit.all()
    np.testing.assert_array_equal(vectors, np.stack([_vec(0), _vec(3), _vec(4)]))


def test_a_put_larger_than_capacity_keeps_the_last_items_and_repeated_ids_keep_the_last_vector() -> None:
    cache = ItemVectorCache(capacity=2, dim=8)
    cache.put(["a", "b", "a", "c"], ["1", "2", "3", "4"], np.stack([_vec(i) for i in range(4)]))
    assert [cache.known(i) for i in "abc"] == [True, False, True]
    vectors, hit = cache.lookup(["a", "c"], ["3", "4"])
    assert hit.all()
    np.testing.assert_array_equal(vectors, np.stack([_vec(2), _vec(3)]))


def test_matrix_grows_contiguously_up_to_capacity() -> None:
    cache = ItemVectorCache(capacity=1000, dim=8, initial_rows=4)
    ids = [f"i{k}" for k in range(1000)]
    vectors = np.stack([_vec(k) for k in range(1000)])
    cache.put(ids, ids, vectors)
    assert len(cache) == 1000 and cache.nbytes >= 1000 * 8 * 4
    got, hit = cache.lookup(ids[::-1], ids[::-1])
    assert hit.all()
    np.testing.assert_array_equal(got, vectors[::-1])


def test_concurrent_lookups_and_puts_stay_consistent() -> None:
    cache = ItemVectorCache(capacity=64, dim=8, initial_rows=2)
    errors: list[str] = []

    def writer(offset: int) -> None:
        for k in range(200):
            item = f"i{(offset + k) % 100}"
            cache.put([item], [item], _vec((offset + k) % 100)[None])

    def reader() -> None:
        for k in range(400):
            item = f"i{k % 100}"
            vectors, hit = cache.lookup([item], [item])
            if hit[0] and not np.array_equal(vectors[0], _vec(k % 100)):
                errors.append(item)

    threads = [threading.Thread(target=writer, args=(o,)) for o in (0, 37)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) <= 64


def test_export_restore_round_trip_keeps_text_checks_and_lru_order() -> None:
    cache = ItemVectorCache(capacity=3, dim=8)
    cache.put(["a", "b", "c"], ["ta", "tb", "tc"], np.stack([_vec(i) for i in range(3)]))
    cache.lookup(["a"], [None])  # LRU order now b, c, a
    ids, hashes, vectors = cache.export()
    assert ids == ["b", "c", "a"] and hashes.dtype == np.uint64
    restored = ItemVectorCache(capacity=3, dim=8)
    restored.restore(ids, hashes, vectors)
    got, hit = restored.lookup(["a", "b", "c"], ["ta", "changed", "tc"])  # verified by the stable hash
    assert hit.tolist() == [True, False, True]
    np.testing.assert_array_equal(got[0], _vec(0))
    restored.put(["d"], ["td"], _vec(3)[None])  # evicts the least recently used: b
    assert [restored.known(i) for i in "abcd"] == [True, False, True, True]


def test_lookup_hands_out_each_cached_ids_item_key() -> None:
    from reranker.itemkeys import item_keys
    from reranker.types import DecimalIds

    cache = ItemVectorCache(capacity=2, dim=4)
    cache.put(["a", "42"], ["ta", "t42"], np.eye(2, 4, dtype=np.float32))
    keys = np.zeros(3, dtype=np.uint64)
    cache.lookup(["42", "missing", "a"], [None, None, None], keys)
    assert keys.tolist() == [int(item_keys(["42"])[0]), 0, int(item_keys(["a"])[0])]
    cache.lookup(DecimalIds([42]), [None], keys[:1])  # an integer id is the same item as "42"
    assert int(keys[0]) == int(item_keys(["42"])[0])
    cache.put(["b"], ["tb"], np.ones((1, 4), dtype=np.float32))  # evicts the least recently used ("a")
    cache.lookup(["b", "a"], [None, None], keys[:2])
    assert keys[:2].tolist() == [int(item_keys(["b"])[0]), 0]


def test_all_ids_cached_hits_exactly_the_rows_with_the_text_given() -> None:
    """Every id cached: texts compare as strings, and any difference (a changed text, a text where a
    restored row knows only its hash, an evicted and re-put row) is decided one id at a time."""
    cache = ItemVectorCache(capacity=3, dim=8, initial_rows=1)
    cache.put(["a", "b", "c"], ["ta", "tb", "tc"], np.stack([_vec(i) for i in range(3)]))
    _, hit = cache.lookup(["a", "b", "c"], ["ta", "tb", "tc"])
    assert hit.tolist() == [True, True, True]
    _, hit = cache.lookup(["a", "b", "c"], ["ta", "tb!", None])  # a changed text; None takes any
    assert hit.tolist() == [True, False, True]
    _, hit = cache.lookup(("a", "b"), ("ta", "tb"))  # any sequence, not only lists
    assert hit.tolist() == [True, True]
    ids, hashes, vectors = cache.export()
    restored = ItemVectorCache(capacity=3, dim=8)
    restored.restore(ids, hashes, vectors)  # rows know their text only by its stable hash
    for _ in range(2):  # verified by the stable hash, then remembered
        got, hit = restored.lookup(["a", "b", "c"], ["ta", "tb", "tc"])
        assert hit.tolist() == [True, True, True]
        np.testing.assert_array_equal(got, np.stack([_vec(i) for i in range(3)]))
    _, hit = restored.lookup(["a", "b", "c"], ["ta", "tb", "changed"])
    assert hit.tolist() == [True, True, False]
    restored.put(["d"], ["tc"], _vec(5)[None])  # evicts the least recently used row: the text goes with it
    restored.put(["c"], [int(hashes[ids.index("c")])], _vec(6)[None])  # put by hash: no text str
    got, hit = restored.lookup(["c"], ["tc"])
    assert hit.tolist() == [True]
    np.testing.assert_array_equal(got[0], _vec(6))
