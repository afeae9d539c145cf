from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import FailingEncoder, SlowEncoder
from reranker.model.batching import MicroBatcher
from reranker.model.encoder import FakeEncoder
from reranker.errors import EncoderFailed, Overloaded


class RecordingEncoder(FakeEncoder):
    def __init__(self) -> None:
        super().__init__(16)
        self.batches: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        return super().encode(texts)


def test_results_match_direct_encoding_and_requests_share_batches() -> None:
    encoder = RecordingEncoder()
    batcher = MicroBatcher(encoder, max_batch=64, max_wait_s=0.05, max_pending=1000)
    try:
        texts = [[f"text {i} {j}" for j in range(3)] for i in range(5)]
        futures = [batcher.submit(t) for t in texts]
        for t, f in zip(texts, futures, strict=True):
            np.testing.assert_allclose(f.result(timeout=5), FakeEncoder(16).encode(t), rtol=1e-6)
        assert len(encoder.batches) < len(texts)  # micro-batched, not one call per request
    finally:
        batcher.close()


def test_batches_are_length_sorted_and_capped() -> None:
    encoder = RecordingEncoder()
    batcher = MicroBatcher(encoder, max_batch=4, max_wait_s=0.0, max_pending=100)
    try:
        texts = ["x" * n for n in (9, 1, 5, 3, 7, 2)]
        out = batcher.submit(texts).result(timeout=5)
        np.testing.assert_allclose(out, FakeEncoder(16).encode(texts), rtol=1e-6)
        assert all(len(b) <= 4 for b in encoder.batches)
        for batch in encoder.batches:
            assert [len(t) for t in batch] == sorted(len(t) for t in batch)
    finally:
        batcher.close()


def test_full_queue_raises_overloaded() -> None:
    batcher = MicroBatcher(SlowEncoder(FakeEncoder(8), 0.5), max_batch=2, max_wait_s=0.0, max_pending=4)
    try:
        batcher.submit(["a", "b"])
        batcher.submit(["c", "d"])
        with pytest.raises(Overloaded, match="queue full"):
            batcher.submit(["e", "f", "g"])
    finally:
        batcher.close()


def test_encoder_failure_reaches_the_caller_and_the_worker_survives() -> None:
    flaky = FailingEncoder(FakeEncoder(8), ok_batches=0)
    batcher = MicroBatcher(flaky, max_batch=8, max_wait_s=0.0, max_pending=100)
    try:
        with pytest.raises(EncoderFailed, match="injected encoder failure"):
            batcher.submit(["a"]).result(timeout=5)
        flaky.ok_batches = 1
        assert batcher.submit(["b"]).result(timeout=5).shape == (1, 8)
    finally:
        batcher.close()


def test_concurrent_submitters_all_get_their_own_rows() -> None:
    batcher = MicroBatcher(FakeEncoder(8), max_batch=16, max_wait_s=0.002, max_pending=10_000)
    errors: list[str] = []

    def worker(n: int) -> None:
        for k in range(20):
            texts = [f"w{n} k{k} t{j}" for j in range(n % 4 + 1)]
            got = batcher.submit(texts).result(timeout=10)
            if not np.allclose(got, FakeEncoder(8).encode(texts), rtol=1e-6):
                errors.append(f"worker {n} got wrong rows")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert errors == []
