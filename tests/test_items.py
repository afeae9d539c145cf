from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from conftest import REPO

from reranker.model.items import ItemVectorCache, text_hash


def vec(x: float, dim: int = 4) -> np.ndarray:
    return np.full(dim, x, dtype=np.float32)


def test_lookup_hits_and_misses_by_id_and_text_hash() -> None:
    cache = ItemVectorCache(capacity=10, dim=4)
    cache.put(["a"], [text_hash("alpha")], np.stack([vec(1)]))
    vectors, hit = cache.lookup(["a", "a", "a", "b"], [None, text_hash("alpha"), text_hash("changed"), None])
    assert hit.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(vectors[0], vec(1))
    assert not vectors[2].any() and not vectors[3].any()


def test_least_recently_used_is_evicted_and_its_row_reused() -> None:
    cache = ItemVectorCache(capacity=2, dim=4, initial_rows=1)
    cache.put(["a", "b"], [1, 2], np.stack([vec(1), vec(2)]))
    cache.lookup(["a"], [None])  # touch a: b is now least recently used
    cache.put(["c"], [3], np.stack([vec(3)]))
    _, hit = cache.lookup(["a", "b", "c"], [None, None, None])
    assert hit.tolist() == [True, False, True]
    assert len(cache) == 2
    vectors, _ = cache.lookup(["a", "c"], [None, None])
    np.testing.assert_array_equal(vectors, np.stack([vec(1), vec(3)]))


def test_replacing_text_overwrites_the_vector_in_place() -> None:
    cache = ItemVectorCache(capacity=4, dim=4)
    cache.put(["a"], [1], np.stack([vec(1)]))
    cache.put(["a"], [2], np.stack([vec(5)]))
    vectors, hit = cache.lookup(["a"], [2])
    assert hit.all() and len(cache) == 1
    np.testing.assert_array_equal(vectors[0], vec(5))


def test_matrix_grows_up_to_capacity() -> None:
    cache = ItemVectorCache(capacity=100, dim=4, initial_rows=2)
    ids = [f"i{i}" for i in range(100)]
    cache.put(ids, list(range(100)), np.stack([vec(i) for i in range(100)]))
    vectors, hit = cache.lookup(ids, [None] * 100)
    assert hit.all()
    assert vectors[:, 0].tolist() == [float(i) for i in range(100)]


def test_text_hash_is_stable_across_processes() -> None:
    # Snapshots and replicas rely on it: unlike hash(), it must not depend on PYTHONHASHSEED.
    code = "from reranker.model.items import text_hash; print(text_hash('Toy Story'))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {str(text_hash("Toy Story"))}
    assert text_hash("Toy Story") != text_hash("Toy Story 2")
