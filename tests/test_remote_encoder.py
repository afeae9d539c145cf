"""encoder=remote: an OpenAI-compatible /v1/embeddings server as the encoder.

Most tests run against `MiniEmbeddingServer` (tests/embedding_server.py): the smallest server
that implements the API, answering from FakeEncoder, NOT a real embedding server; it covers the
client in every CI run and misbehaves on purpose. The tests at the end run against a real server,
infinity_emb serving the packaged MiniLM, and skip with the reason when it is not installed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import fake_settings
from embedding_server import InfinityServer, MiniEmbeddingServer, infinity_binary
from reranker.config import Settings
from reranker.errors import EncoderFailed, EncoderUnavailable, Overloaded
from reranker.model.batching import MicroBatcher
from reranker.model.encoder import FakeEncoder
from reranker.model.remote_encoder import RemoteEncoder, embeddings_url
from reranker.vectors import l2_normalize
from reranker.serving.server import RunningServer, build_server
from reranker.service import RerankService
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

DIM = 64
SERVING = health_pb2.HealthCheckResponse.SERVING


def remote_settings(url: str, **overrides: object) -> Settings:
    base = fake_settings(
        encoder="remote", encoder_url=url, encoder_model="fake-model", encoder_wait_seconds=10.0,
        encoder_request_timeout_ms=500.0, encoder_retry_seconds=0.2,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def mini() -> Iterator[MiniEmbeddingServer]:
    server = MiniEmbeddingServer(DIM).start()
    yield server
    server.stop()


@pytest.fixture
def sidecars() -> Iterator[list[tuple[RunningServer, grpc.Channel]]]:
    started: list[tuple[RunningServer, grpc.Channel]] = []
    yield started
    for running, channel in started:
        channel.close()
        running.stop(0)


def start_sidecar(
    sidecars: list[tuple[RunningServer, grpc.Channel]], settings: Settings, *, wait: bool = True
) -> tuple[RunningServer, pb_grpc.RerankerServiceStub, grpc.Channel]:
    """A real gRPC sidecar whose encoder comes from the settings (load_encoder), not from the test."""
    running = build_server(settings, RerankService(settings))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    sidecars.append((running, channel))
    if wait:
        running.loader.join(60)
        assert running.service.ready, running.service.load_error
    return running, pb_grpc.RerankerServiceStub(channel), channel


def health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def rerank_request(tag: str, n: int = 5) -> pb.RerankRequest:
    """n candidates with texts never seen before (each Rerank has to encode)."""
    return pb.RerankRequest(
        user_id="u1",
        candidates=[pb.Candidate(item_id=f"{tag}-{i}", score=float(n - i), text=f"{tag} film number {i}") for i in range(n)],
    )


# --- the client against the mini server -------------------------------------------------------------
def test_vectors_are_the_servers_l2_normalized_and_the_version_names_model_and_size(
    mini: MiniEmbeddingServer, tmp_path: Path
) -> None:
    mini.api_key = "s3cret"
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    encoder = RemoteEncoder(remote_settings(mini.url, encoder_api_key_file=str(key_file)).model)
    try:
        assert (encoder.dim, encoder.version) == (DIM, "remote:fake-model/64d")
        texts = ["the godfather", "toy story", "a much longer title about space and time", "alien"]
        vectors = encoder.encode(texts)
        expected = l2_normalize(FakeEncoder(DIM).encode(texts))
        assert vectors.dtype == np.float32 and vectors.shape == (4, DIM)
        np.testing.assert_allclose(vectors, expected, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
        last = mini.requests[-1]
        assert (last["model"], last["encoding_format"], last["auth"]) == ("fake-model", "float", "Bearer s3cret")
        assert len({r["client_port"] for r in mini.requests}) == 1, "one keep-alive connection for every request"
    finally:
        encoder.close()


def test_answers_out_of_order_are_put_back_in_input_order(mini: MiniEmbeddingServer) -> None:
    encoder = RemoteEncoder(remote_settings(mini.url).model)
    mini.mode = "reversed"
    texts = ["one", "two", "three"]
    np.testing.assert_allclose(encoder.encode(texts), l2_normalize(FakeEncoder(DIM).encode(texts)), atol=1e-6)
    encoder.close()


def test_item_instruction_is_sent_and_changes_the_version(mini: MiniEmbeddingServer) -> None:
    encoder = RemoteEncoder(remote_settings(mini.url, item_instruction="passage: ").model)
    encoder.encode(["alien"])
    assert mini.requests[-1]["input"] == ["passage: alien"]
    assert encoder.version.startswith("remote:fake-model/64d/instruction-")
    encoder.close()


@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        ("nan", EncoderFailed, "non-finite"),
        ("short", EncoderFailed, "returned 2 vectors for 3 texts"),
        ("bigger", EncoderFailed, "size 65, expected 64"),
        ("not_json", EncoderFailed, "other than JSON"),
        ("500", EncoderUnavailable, "HTTP 500"),
        ("429", Overloaded, "HTTP 429"),
    ],
)
def test_unusable_answers_raise_the_error_that_names_them(
    mini: MiniEmbeddingServer, mode: str, error: type[Exception], message: str
) -> None:
    encoder = RemoteEncoder(remote_settings(mini.url).model)
    mini.mode = mode
    with pytest.raises(error, match=message):
        encoder.encode(["one", "two", "three"])
    encoder.close()


def test_after_an_unreachable_server_batches_fail_at_once_until_the_retry_interval(mini: MiniEmbeddingServer) -> None:
    now = [100.0]
    encoder = RemoteEncoder(remote_settings(mini.url, encoder_retry_seconds=5.0).model, clock=lambda: now[0])
    mini.mode = "500"
    with pytest.raises(EncoderUnavailable, match="HTTP 500"):
        encoder.encode(["a"])
    asked = len(mini.requests)
    with pytest.raises(EncoderUnavailable, match="next try in 5.0 s"):
        encoder.encode(["b"])
    assert len(mini.requests) == asked, "within the retry interval the server is not asked"
    mini.mode = "ok"
    now[0] += 5.01
    assert encoder.encode(["c"]).shape == (1, DIM)
    assert encoder.encode(["d"]).shape == (1, DIM)  # recovered: no longer counted as down
    encoder.close()


def test_a_refused_request_at_start_fails_the_load_at_once(mini: MiniEmbeddingServer) -> None:
    started = time.monotonic()
    with pytest.raises(EncoderFailed, match=r"refused the request, HTTP 404.*not found"):
        RemoteEncoder(remote_settings(mini.url, encoder_model="no-such-model", encoder_wait_seconds=0.0).model)
    assert time.monotonic() - started < 2.0, "a wrong model name is not waited out"
    mini.api_key = "right"
    with pytest.raises(EncoderFailed, match="HTTP 401"):
        RemoteEncoder(remote_settings(mini.url).model)


def test_the_load_waits_for_the_server_up_to_encoder_wait_seconds() -> None:
    port = MiniEmbeddingServer().port  # nothing listens there
    started = time.monotonic()
    with pytest.raises(EncoderFailed, match=r"did not answer within 1 s \(\d+ tries\)"):
        RemoteEncoder(remote_settings(f"http://127.0.0.1:{port}", encoder_wait_seconds=1.0).model)
    assert 1.0 <= time.monotonic() - started < 3.0


def test_missing_api_key_file_fails_the_load(mini: MiniEmbeddingServer, tmp_path: Path) -> None:
    with pytest.raises(EncoderFailed, match="cannot read encoder_api_key_file"):
        RemoteEncoder(remote_settings(mini.url, encoder_api_key_file=str(tmp_path / "absent")).model)


def test_url_forms() -> None:
    assert embeddings_url("http://tei:8080") == "http://tei:8080/v1/embeddings"
    assert embeddings_url("http://tei:8080/") == "http://tei:8080/v1/embeddings"
    assert embeddings_url("http://ollama:11434/v1") == "http://ollama:11434/v1/embeddings"
    assert embeddings_url("http://infinity:7997/embeddings") == "http://infinity:7997/embeddings"


def test_remote_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="encoder=remote needs encoder_url"):
        fake_settings(encoder="remote", encoder_model="m")
    with pytest.raises(ValueError, match="encoder=remote needs encoder_model"):
        fake_settings(encoder="remote", encoder_url="http://localhost:8080")
    with pytest.raises(ValueError, match="encoder_request_timeout_ms must be positive"):
        fake_settings(encoder_request_timeout_ms=0)
    parsed = Settings.from_sources(
        ["--encoder", "remote", "--encoder-url", "http://tei:80", "--encoder-model", "bge"],
        env={"RERANKER_ENCODER_API_KEY_FILE": "/secrets/key"},
    )
    m = parsed.model
    assert (m.encoder, m.encoder_url, m.encoder_model, m.encoder_api_key_file) == (
        "remote", "http://tei:80", "bge", "/secrets/key"
    )


# --- the micro-batcher in front of a server that says what went wrong ---------------------------------
class _Refusing:
    dim, version = 8, "refusing"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def encode(self, texts: list[str]) -> np.ndarray:
        raise self.error


def test_batcher_passes_overloaded_through_and_logs_reported_failures_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    batcher = MicroBatcher(_Refusing(Overloaded("server busy")), max_batch=4, max_wait_s=0.0, max_pending=100)
    try:
        with pytest.raises(Overloaded, match="server busy"):
            batcher.submit(["a"]).result(5)
    finally:
        batcher.close()
    caplog.clear()
    batcher = MicroBatcher(_Refusing(EncoderUnavailable("server down")), max_batch=4, max_wait_s=0.0, max_pending=100)
    with caplog.at_level(logging.WARNING, logger="reranker.model.batching"):
        try:
            for _ in range(20):
                with pytest.raises(EncoderUnavailable):
                    batcher.submit(["a"]).result(5)
        finally:
            batcher.close()
    lines = [r for r in caplog.records if "encoder failed on a batch" in r.getMessage()]
    assert len(lines) == 1 and "server down" in lines[0].getMessage() and lines[0].exc_info is None


# --- through the sidecar ---------------------------------------------------------------------------
def test_sidecar_reranks_through_the_server_in_batches(
    mini: MiniEmbeddingServer, sidecars: list[tuple[RunningServer, grpc.Channel]]
) -> None:
    _, stub, _ = start_sidecar(sidecars, remote_settings(mini.url, encode_batch_size=16))
    before = len(mini.requests)
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=f"i{i}", text=f"item {i}") for i in range(100)]), timeout=10)
    batches = mini.requests[before:]
    assert sum(len(r["input"]) for r in batches) == 100
    assert max(len(r["input"]) for r in batches) <= 16 and len(batches) >= 7
    resp = stub.Rerank(rerank_request("fresh"), timeout=5)
    assert resp.variant == pb.VARIANT_RERANKED
    assert resp.model_version == "remote:fake-model/64d"
    assert len({r["client_port"] for r in mini.requests}) == 1, "the sidecar reuses one connection"


def test_sidecar_stays_not_serving_until_the_server_answers_and_fails_open_meanwhile(
    sidecars: list[tuple[RunningServer, grpc.Channel]],
) -> None:
    late = MiniEmbeddingServer(DIM)  # its port is chosen, nothing listens yet
    running, stub, channel = start_sidecar(sidecars, remote_settings(late.url, encoder_wait_seconds=0.0), wait=False)
    try:
        time.sleep(0.5)
        assert health(channel) != SERVING
        resp = stub.Rerank(rerank_request("early"), timeout=5)
        assert (resp.variant, resp.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_NOT_READY)
        late.start()
        deadline = time.monotonic() + 15
        while health(channel) != SERVING:
            assert time.monotonic() < deadline, "never SERVING after the embedding server came up"
            time.sleep(0.05)
        assert stub.Rerank(rerank_request("late"), timeout=5).variant == pb.VARIANT_RERANKED
    finally:
        late.stop()


def _rerank_loop(
    stub: pb_grpc.RerankerServiceStub, tag: str, count: int, results: list[object], pause_s: float = 0.0
) -> None:
    for i in range(count):
        try:
            results.append(stub.Rerank(rerank_request(f"{tag}-{i}"), timeout=3))
        except grpc.RpcError as exc:
            results.append(exc)
        time.sleep(pause_s)


def _variants(results: list[object]) -> tuple[int, int, list[object]]:
    reranked = sum(1 for r in results if isinstance(r, pb.RerankResponse) and r.variant == pb.VARIANT_RERANKED)
    fallback = sum(1 for r in results if isinstance(r, pb.RerankResponse) and r.variant == pb.VARIANT_FALLBACK)
    errors = [r for r in results if not isinstance(r, pb.RerankResponse) or r.variant not in (
        pb.VARIANT_RERANKED, pb.VARIANT_FALLBACK)]
    return reranked, fallback, errors


def test_server_stopped_during_a_run_every_rerank_is_reranked_or_a_fallback(
    mini: MiniEmbeddingServer, sidecars: list[tuple[RunningServer, grpc.Channel]]
) -> None:
    """Labelled: the mini server (not a real embedding server) stopped mid-run; see the Infinity test."""
    _, stub, _ = start_sidecar(sidecars, remote_settings(mini.url))
    results: list[object] = []
    threads = [threading.Thread(target=_rerank_loop, args=(stub, f"c{c}", 60, results, 0.01)) for c in range(4)]
    def seen(variant: int) -> bool:
        return any(isinstance(r, pb.RerankResponse) and r.variant == variant for r in list(results))

    def until(condition: Callable[[], bool], what: str) -> None:  # not a sleep: a busy machine is slower
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    for t in threads:
        t.start()
    until(lambda: seen(pb.VARIANT_RERANKED), "no Rerank was reranked before the stop")
    mini.stop()
    until(lambda: seen(pb.VARIANT_FALLBACK), "no Rerank failed open while the server was stopped")
    mini.start()  # back on the same port: the sidecar recovers after encoder_retry_seconds
    for t in threads:
        t.join(60)
    reranked, fallback, errors = _variants(results)
    assert not errors, errors[:3]
    assert reranked + fallback == 240
    assert fallback > 0 and reranked > 0
    reasons = {r.fallback_reason for r in results if isinstance(r, pb.RerankResponse) and r.variant == pb.VARIANT_FALLBACK}
    assert reasons <= {pb.FALLBACK_REASON_ENCODER_ERROR, pb.FALLBACK_REASON_DEADLINE}
    assert stub.Rerank(rerank_request("after"), timeout=5).variant == pb.VARIANT_RERANKED


def test_hung_server_fails_open_within_the_encode_budget(
    mini: MiniEmbeddingServer, sidecars: list[tuple[RunningServer, grpc.Channel]]
) -> None:
    running, stub, _ = start_sidecar(sidecars, remote_settings(mini.url, encode_timeout_ms=300.0, encoder_retry_seconds=5.0))
    mini.mode = "hang"
    started = time.monotonic()
    resp = stub.Rerank(rerank_request("hung"), timeout=5)
    assert time.monotonic() - started < 1.5
    assert (resp.variant, resp.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_DEADLINE)
    # The hung batch times out at encoder_request_timeout_ms; the next one fails at once, as encoder_error.
    # Until that batch has failed (counted once the encoder is marked down), not a sleep: late on a busy machine.
    registry = running.service.metrics.registry
    deadline = time.monotonic() + 30
    while not registry.get_sample_value("reranker_encoder_failed_batches_total"):
        assert time.monotonic() < deadline, "the hung batch never timed out"
        time.sleep(0.02)
    started = time.monotonic()
    resp = stub.Rerank(rerank_request("hung-again"), timeout=5)
    assert (resp.variant, resp.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_ENCODER_ERROR)
    assert "timed out" in resp.fallback_detail and "next try in" in resp.fallback_detail  # not asked again
    assert time.monotonic() - started < 1.0
    mini.release.set()


def test_server_saying_429_fails_open_as_overloaded(
    mini: MiniEmbeddingServer, sidecars: list[tuple[RunningServer, grpc.Channel]]
) -> None:
    _, stub, _ = start_sidecar(sidecars, remote_settings(mini.url))
    mini.mode = "429"
    resp = stub.Rerank(rerank_request("busy"), timeout=5)
    assert (resp.variant, resp.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_OVERLOADED)
    with pytest.raises(grpc.RpcError) as info:
        stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="x", text="x text")]), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- a real embedding server: infinity_emb serving the packaged MiniLM ----------------------------------
@pytest.fixture(scope="module")
def infinity() -> Iterator[InfinityServer]:
    from reranker.model.encoder import PACKAGED_MODEL_NAME, packaged_model_dir

    server = InfinityServer(packaged_model_dir(), PACKAGED_MODEL_NAME, infinity_binary()).start()
    yield server
    server.stop()


def _infinity_settings(server: InfinityServer, **overrides: object) -> Settings:
    values: dict[str, object] = {"encoder_model": server.model, "encoder_wait_seconds": 300.0,
                                 "encoder_request_timeout_ms": 10_000.0, "encode_timeout_ms": 10_000.0}
    return remote_settings(server.url, **{**values, **overrides})


@pytest.mark.model
def test_real_server_vectors_match_the_local_encoder(infinity: InfinityServer) -> None:
    from reranker.model.encoder import TransformerEncoder

    texts = [f"{title} ({year})" for title, year in [
        ("Toy Story", 1995), ("GoldenEye", 1995), ("Four Rooms", 1995), ("Get Shorty", 1995), ("Copycat", 1995),
        ("Shanghai Triad", 1995), ("Twelve Monkeys", 1995), ("Babe", 1995), ("Dead Man Walking", 1995),
        ("Richard III", 1995), ("Seven", 1995), ("The Usual Suspects", 1995), ("Mighty Aphrodite", 1995),
    ]] + ["a", "space opera with robots and a desert planet " * 3]
    remote = RemoteEncoder(_infinity_settings(infinity).model)
    try:
        assert (remote.dim, remote.version) == (384, "remote:all-MiniLM-L6-v2/384d")
        local = TransformerEncoder(dataclasses.replace(fake_settings(), encoder="transformer", torch_threads=1).model)
        cosines = np.sum(remote.encode(texts) * local.encode(texts), axis=1)
        assert cosines.min() > 0.999, cosines
    finally:
        remote.close()


@pytest.mark.model
def test_real_server_behind_the_sidecar_reranks_and_fails_open_when_killed(
    infinity: InfinityServer, sidecars: list[tuple[RunningServer, grpc.Channel]]
) -> None:
    _, stub, _ = start_sidecar(sidecars, _infinity_settings(infinity, encode_timeout_ms=2_000.0,
                                                               encoder_request_timeout_ms=2_000.0))
    resp = stub.Rerank(rerank_request("real"), timeout=20)
    assert resp.variant == pb.VARIANT_RERANKED and resp.model_version == "remote:all-MiniLM-L6-v2/384d"
    results: list[object] = []
    threads = [threading.Thread(target=_rerank_loop, args=(stub, f"k{c}", 15, results, 0.05)) for c in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    infinity.stop()  # SIGTERM to the real server mid-run
    for t in threads:
        t.join(120)
    reranked, fallback, errors = _variants(results)
    assert not errors, errors[:3]
    assert reranked + fallback == 30 and fallback > 0
