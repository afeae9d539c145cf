"""Micro-batcher: length-sorted batches, tokenization outside the model thread, overload policy."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from reranker.model.batching import MicroBatcher
from reranker.model.encoder import FakeEncoder
from reranker.errors import Overloaded
from reranker.v1 import reranker_pb2 as pb
from conftest import SlowEncoder, candidate, event, fake_settings


class RecordingTokenEncoder:
    """A FakeEncoder that tokenizes separately and records where each stage ran."""

    def __init__(self, dim: int = 16) -> None:
        self.inner = FakeEncoder(dim)
        self.dim, self.version = dim, "recording"
        self.tokenize_threads: list[str] = []
        self.forward_threads: list[str] = []
        self.batches: list[list[int]] = []

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        self.tokenize_threads.append(threading.current_thread().name)
        return [[ord(ch) for ch in text] for text in texts]

    def encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        self.forward_threads.append(threading.current_thread().name)
        self.batches.append([len(seq) for seq in ids])
        return self.inner.encode(["".join(map(chr, seq)) for seq in ids])

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.encode_ids(self.token_ids(texts))


def _until_taken(batcher: MicroBatcher) -> None:
    """Until the worker has taken what is queued as its batch (not "0.05 s later": a busy machine may
    not have run the worker yet, and the next submit would then join that batch or overflow the queue)."""
    deadline = time.monotonic() + 30
    while batcher.pending_texts:
        assert time.monotonic() < deadline, "the worker never took the batch"
        time.sleep(0.001)


def test_tokenization_runs_in_the_caller_and_batches_are_length_sorted() -> None:
    encoder = RecordingTokenEncoder()
    batcher = MicroBatcher(encoder, max_batch=4, max_wait_s=0.05, max_pending=100)
    try:
        texts = ["x" * n for n in (9, 1, 7, 3, 5, 2, 8, 4, 6, 10)]
        vectors = batcher.submit(texts).result(timeout=10)
    finally:
        batcher.close()
    np.testing.assert_allclose(vectors, FakeEncoder(16).encode(texts), atol=1e-6)  # back in request order
    assert encoder.tokenize_threads == [threading.current_thread().name]
    assert set(encoder.forward_threads) == {"encoder-batcher"}
    assert encoder.batches == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_jobs_from_concurrent_callers_share_a_batch() -> None:
    encoder = RecordingTokenEncoder()
    batcher = MicroBatcher(SlowEncoderWithIds(encoder, 0.2), max_batch=32, max_wait_s=0.01, max_pending=100)
    try:
        first = batcher.submit(["warm"])  # occupies the model thread for 0.2 s
        _until_taken(batcher)
        futures = [batcher.submit([f"text {k}"]) for k in range(5)]
        for f in [first, *futures]:
            f.result(timeout=10)
    finally:
        batcher.close()
    assert [len(b) for b in encoder.batches] == [1, 5]


class SlowEncoderWithIds(RecordingTokenEncoder):
    def __init__(self, inner: RecordingTokenEncoder, delay_s: float) -> None:
        self.__dict__.update(inner.__dict__)
        self._inner_rec, self.delay_s = inner, delay_s

    def encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        time.sleep(self.delay_s)
        return self._inner_rec.encode_ids(ids)


def test_full_queue_raises_overloaded_immediately() -> None:
    batcher = MicroBatcher(SlowEncoder(FakeEncoder(8), 0.5), max_batch=2, max_wait_s=0.0, max_pending=3)
    try:
        batcher.submit(["a", "b"])  # taken by the worker (sleeping)
        _until_taken(batcher)
        batcher.submit(["c", "d", "e"])  # waits in the queue: 3 pending
        started = time.monotonic()
        with pytest.raises(Overloaded, match="encoder queue full"):
            batcher.submit(["f"])
        assert time.monotonic() - started < 0.4  # refused without waiting for the encoder
    finally:
        batcher.close()


def _overloaded_server(make_server, policy: str):
    settings = fake_settings(encode_queue_size=2, encode_batch_size=2, encode_max_wait_ms=0.0, overload_policy=policy)
    running, stub = make_server(settings, SlowEncoder(FakeEncoder(settings.model.fake_dim), 0.5))
    # Occupy the model thread, then fill the queue, straight through the service's batcher.
    batcher = running.service._batcher
    busy = [batcher.submit(["x", "y"])]
    _until_taken(batcher)
    busy.append(batcher.submit(["z", "w"]))
    return stub, busy


def test_overload_fail_open_serves_the_upstream_order(make_server) -> None:
    stub, busy = _overloaded_server(make_server, "fail_open")
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "known")]))  # no text: no encoding
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1, "new text"), candidate("b", 2)]))
    assert reply.variant == pb.VARIANT_FALLBACK
    assert reply.fallback_reason == pb.FALLBACK_REASON_OVERLOADED
    assert [it.item_id for it in reply.items] == ["a", "b"]
    for f in busy:
        f.result(timeout=10)


def test_overload_reject_returns_resource_exhausted_for_rerank_and_writes(make_server) -> None:
    stub, busy = _overloaded_server(make_server, "reject")
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1, "new text")]))
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="a", text="new text")]))
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "encoder queue full" in err.value.details()
    # Cached candidates need no encoder: Rerank still personalizes under overload.
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("b", 1)]))
    assert reply.variant == pb.VARIANT_RERANKED
    for f in busy:
        f.result(timeout=10)


def test_writes_are_rejected_under_overload_even_with_fail_open(make_server) -> None:
    stub, busy = _overloaded_server(make_server, "fail_open")
    with pytest.raises(grpc.RpcError) as err:
        stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="a", text="new text")]))
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    for f in busy:
        f.result(timeout=10)


def test_overload_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="overload_policy"):
        fake_settings(overload_policy="queue_forever")
