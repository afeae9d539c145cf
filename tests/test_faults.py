"""Issue 6: injected faults and what the caller observes.

Encoder raising / returning garbage / hanging past the deadline, a full encoder queue, too many
concurrent RPCs, a client cancelling mid-request, and a missing or corrupt model at start-up
(both `on_load_failure` policies, as real `reranker serve` processes).
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker.model.encoder import Encoder, FakeEncoder, packaged_model_dir
from reranker.tools.harness import ServerProcess
from reranker.serving.server import EXIT_LOAD_FAILED
from reranker.v1 import reranker_pb2 as pb
from tests.conftest import REPO, FailingEncoder, ServerFactory, candidate, event, fake_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HangingEncoder:
    """Encodes normally during warm-up, then blocks every batch until `release()` (a hung model).

    Records every text it was asked to encode, so tests can prove abandoned work never ran.
    """

    def __init__(self, inner: Encoder, ok_batches: int = 1) -> None:
        self.inner, self.ok_batches = inner, ok_batches
        self.dim, self.version = inner.dim, "hanging-" + inner.version
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.seen: list[str] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.seen.extend(texts)
        if self.ok_batches > 0:
            self.ok_batches -= 1
        else:
            self.entered.set()
            self.gate.wait(30)
        return self.inner.encode(texts)

    def release(self) -> None:
        self.gate.set()


class NaNEncoder:
    dim, version = 64, "nan"

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.full((len(texts), self.dim), np.nan, dtype=np.float32)


@pytest.fixture
def hanging() -> Iterator[HangingEncoder]:
    encoder = HangingEncoder(FakeEncoder(64))
    yield encoder
    encoder.release()


def _request(user: str = "u", texts: bool = True, prefix: str = "t") -> pb.RerankRequest:
    cands = [candidate(f"{prefix}{i}", 10.0 - i, f"{prefix} text {i}" if texts else None) for i in range(5)]
    return pb.RerankRequest(user_id=user, candidates=cands)


def _upstream_ids(req: pb.RerankRequest) -> list[str]:
    return [c.item_id for c in req.candidates]


def _health(stub_channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(stub_channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


# --- encoder faults ------------------------------------------------------------------------------------
def test_encoder_raising_fails_open_and_writes_report_unavailable(make_server: ServerFactory) -> None:
    running, stub = make_server(encoder=FailingEncoder(FakeEncoder(64)))
    req = _request()
    resp = stub.Rerank(req, timeout=5)
    assert resp.variant == pb.VARIANT_FALLBACK
    assert resp.fallback_reason == pb.FALLBACK_REASON_ENCODER_ERROR
    assert "injected encoder failure" in resp.fallback_detail
    assert [it.item_id for it in resp.items] == _upstream_ids(req)
    with pytest.raises(grpc.RpcError) as info:
        stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "x", "some text")]), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "injected encoder failure" in info.value.details()
    # The batcher survived: requests that need no encoding are still personalized.
    assert stub.Rerank(_request(texts=False), timeout=5).variant == pb.VARIANT_RERANKED


def test_encoder_returning_nan_vectors_fails_open(make_server: ServerFactory) -> None:
    _, stub = make_server(fake_settings(warmup=False), encoder=NaNEncoder())
    resp = stub.Rerank(_request(), timeout=5)
    assert (resp.variant, resp.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_ENCODER_ERROR)
    assert "unusable output" in resp.fallback_detail


class LongVectorEncoder:
    """Finite rows, but not unit length: an encoder that forgot to normalize."""

    dim, version = 64, "long"

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.full((len(texts), self.dim), 5.0, dtype=np.float32)


def test_encoder_returning_rows_longer_than_unit_length_fails_open_and_caches_nothing(make_server: ServerFactory) -> None:
    running, stub = make_server(fake_settings(warmup=False), encoder=LongVectorEncoder())
    resp = stub.Rerank(_request(), timeout=5)
    assert (resp.variant, resp.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_ENCODER_ERROR)
    assert "unusable output" in resp.fallback_detail and len(running.service.items) == 0  # type: ignore[arg-type]


def test_encoder_hanging_past_the_deadline_fails_open_before_the_callers_deadline(
    make_server: ServerFactory, hanging: HangingEncoder
) -> None:
    # The reply leaves at (deadline - min_budget_ms); 100 ms of slack keeps it ahead of the caller's
    # deadline on a loaded CI machine, where the default 5 ms can be eaten by scheduling alone.
    # encode_late_fill off: abandoned work is dropped at once (tests/test_late_encodes.py: the default).
    settings = fake_settings(encode_timeout_ms=5000.0, min_budget_ms=100.0, encode_late_fill=False)
    running, stub = make_server(settings, encoder=hanging)
    req = _request()
    started = time.monotonic()
    resp = stub.Rerank(req, timeout=0.5)
    elapsed = time.monotonic() - started
    assert resp.variant == pb.VARIANT_FALLBACK and resp.fallback_reason == pb.FALLBACK_REASON_DEADLINE
    assert [it.item_id for it in resp.items] == _upstream_ids(req)
    assert elapsed < 0.5
    # Later requests time out too (the model is still stuck) but never pile up queued work.
    for i in range(5):
        later = stub.Rerank(_request(prefix=f"later{i}-"), timeout=0.3)
        assert later.fallback_reason == pb.FALLBACK_REASON_DEADLINE
    assert running.service._batcher is not None
    assert running.service._batcher.pending_texts == 0
    assert not any(t.startswith("later") for t in hanging.seen)


def test_encode_timeout_setting_bounds_the_wait_without_a_client_deadline(
    make_server: ServerFactory, hanging: HangingEncoder
) -> None:
    _, stub = make_server(fake_settings(encode_timeout_ms=200.0), encoder=hanging)
    started = time.monotonic()
    resp = stub.Rerank(_request(), timeout=10)
    assert resp.fallback_reason == pb.FALLBACK_REASON_DEADLINE
    assert "longer than 200 ms" in resp.fallback_detail
    assert time.monotonic() - started < 2.0


def test_full_encoder_queue_fails_open_as_overloaded(make_server: ServerFactory, hanging: HangingEncoder) -> None:
    running, stub = make_server(fake_settings(encode_queue_size=6, encode_timeout_ms=5000.0), encoder=hanging)
    first = stub.Rerank.future(_request(prefix="a"), timeout=10)  # the encoder hangs on this batch
    assert hanging.entered.wait(30)
    second = stub.Rerank.future(_request(prefix="b"), timeout=10)  # 5 texts wait in the queue
    batcher = running.service._batcher
    assert batcher is not None and _wait_for(lambda: batcher.pending_texts == 5)
    resp = stub.Rerank(_request(prefix="c"), timeout=10)  # 5 more would exceed 6
    assert (resp.variant, resp.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_OVERLOADED)
    assert "queue full" in resp.fallback_detail
    assert batcher.pending_texts == 5  # the refused request left nothing behind
    hanging.release()
    assert first.result().variant == pb.VARIANT_RERANKED
    assert second.result().variant == pb.VARIANT_RERANKED


def test_too_many_concurrent_rpcs_are_refused_not_queued(make_server: ServerFactory, hanging: HangingEncoder) -> None:
    running, stub = make_server(fake_settings(max_concurrent_rpcs=2, encode_timeout_ms=5000.0), encoder=hanging)
    held = [stub.Rerank.future(_request(prefix=f"h{i}-"), timeout=10) for i in range(2)]
    assert hanging.entered.wait(30)
    batcher = running.service._batcher
    assert batcher is not None
    # Both held RPCs are in the server (their texts at the encoder or queued for it), not "0.1 s later".
    assert _wait_for(lambda: sum(t.startswith(("h0-", "h1-")) for t in hanging.seen) + batcher.pending_texts == 10, 30)
    with pytest.raises(grpc.RpcError) as info:
        stub.Rerank(_request(texts=False), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    hanging.release()
    assert all(f.result().variant == pb.VARIANT_RERANKED for f in held)
    assert stub.Rerank(_request(texts=False), timeout=5).variant == pb.VARIANT_RERANKED


# --- client cancellation ----------------------------------------------------------------------------------
def test_cancelled_requests_free_their_workers_and_their_queued_work_never_runs(
    make_server: ServerFactory, hanging: HangingEncoder
) -> None:
    # encode_late_fill off: cancelled work is dropped at once (by default it stays queued as late work,
    # bounded and dropped first: tests/test_late_encodes.py).
    settings = fake_settings(max_workers=3, encode_timeout_ms=30_000.0, encode_late_fill=False)
    running, stub = make_server(settings, encoder=hanging)
    threads_before = threading.active_count()
    running_call = stub.Rerank.future(_request(prefix="alpha"))  # the encoder hangs on this one
    assert hanging.entered.wait(30)
    queued = [stub.Rerank.future(_request(prefix=f"queued{i}-")) for i in range(2)]  # all 3 workers busy now
    batcher = running.service._batcher
    assert batcher is not None
    assert _wait_for(lambda: batcher.pending_texts == 10)
    for f in queued:
        f.cancel()
    # Their jobs leave the queue at once ...
    assert _wait_for(lambda: batcher.pending_texts == 0), batcher.pending_texts
    # ... and their workers are free: a request that needs no encoding gets one immediately.
    assert stub.Rerank(_request(texts=False), timeout=2).variant == pb.VARIANT_RERANKED
    # Cancelling the request whose batch is running also frees its worker (the result is discarded).
    running_call.cancel()
    assert stub.Rerank(_request(texts=False), timeout=2).variant == pb.VARIANT_RERANKED
    assert stub.Rerank(_request(texts=False), timeout=2).variant == pb.VARIANT_RERANKED
    hanging.release()
    time.sleep(0.2)
    assert not any(t.startswith("queued") for t in hanging.seen), "cancelled work reached the encoder"
    fresh = stub.Rerank(_request(prefix="fresh"), timeout=5)
    assert fresh.variant == pb.VARIANT_RERANKED and fresh.encoded == 5
    # No thread per cancelled request: at most the pool's own workers (started lazily) appear.
    assert threading.active_count() <= threads_before + settings.server.max_workers
    assert _health(grpc.insecure_channel(f"127.0.0.1:{running.port}")) == SERVING


def test_cancelled_upsert_drops_its_encoder_work(make_server: ServerFactory, hanging: HangingEncoder) -> None:
    running, stub = make_server(fake_settings(encode_timeout_ms=30_000.0, encode_late_fill=False), encoder=hanging)
    blocker = stub.UpsertItems.future(pb.UpsertItemsRequest(items=[pb.Item(item_id="b", text="blocker")]))
    assert hanging.entered.wait(30)
    items = [pb.Item(item_id=f"big{i}", text=f"catalog text {i}") for i in range(500)]
    big = stub.UpsertItems.future(pb.UpsertItemsRequest(items=items))
    batcher = running.service._batcher
    assert batcher is not None
    assert _wait_for(lambda: batcher.pending_texts == 500)
    big.cancel()
    assert _wait_for(lambda: batcher.pending_texts == 0)
    hanging.release()
    assert blocker.result(timeout=5).encoded == 1
    assert not any(t.startswith("catalog text") for t in hanging.seen)


# --- model missing or corrupt at start ----------------------------------------------------------------------
@pytest.fixture
def corrupt_model_dir(tmp_path: Path) -> Path:
    """The packaged model's config and tokenizer with garbage weights."""
    source = packaged_model_dir()
    target = tmp_path / "corrupt-model"
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    (target / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file" * 100)
    return target


def _serve(*args: str) -> ServerProcess:
    return ServerProcess(
        ["--encoder", "transformer", "--torch-threads", "1", "--metrics-address=", *args], env={"PYTHONPATH": str(REPO)}
    )


@pytest.mark.model
@pytest.mark.parametrize("which", ["missing", "corrupt"])
def test_unloadable_model_with_on_load_failure_exit_exits_non_zero(
    which: str, tmp_path: Path, corrupt_model_dir: Path
) -> None:
    model_dir = tmp_path / "no-such-model" if which == "missing" else corrupt_model_dir
    with _serve("--model-dir", str(model_dir), "--on-load-failure", "exit") as server:
        code = server.wait(120)
        assert code == EXIT_LOAD_FAILED, server.log
        expected = "has no config.json" if which == "missing" else "cannot load model"
        assert expected in server.log
        assert "exiting (on_load_failure=exit)" in server.log


@pytest.mark.model
def test_unloadable_model_with_fail_open_stays_up_not_serving_and_fails_open(corrupt_model_dir: Path) -> None:
    with _serve("--model-dir", str(corrupt_model_dir), "--on-load-failure", "fail_open") as server:
        server.wait_port(60)
        assert _wait_for(lambda: "model failed to load" in server.log, timeout=120), server.log
        assert server.proc.poll() is None
        assert server.health() == NOT_SERVING
        with grpc.insecure_channel(server.target) as channel:
            from reranker.v1 import reranker_pb2_grpc as pb_grpc

            stub = pb_grpc.RerankerServiceStub(channel)
            req = _request()
            resp = stub.Rerank(req, timeout=5)
            assert (resp.variant, resp.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_NOT_READY)
            assert "cannot load model" in resp.fallback_detail
            assert [it.item_id for it in resp.items] == _upstream_ids(req)
            with pytest.raises(grpc.RpcError) as info:
                stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "i")]), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "cannot load model" in info.value.details()
        server.terminate()
        assert server.wait(30) == 0


def test_unknown_on_load_failure_value_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="on_load_failure"):
        dataclasses.replace(fake_settings(), on_load_failure="retry")
