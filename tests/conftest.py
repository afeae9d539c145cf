"""Fixture chain: settings -> service -> real gRPC server on 127.0.0.1:0 -> channel -> stub."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from reranker.config import Settings
from reranker.model.encoder import Encoder, FakeEncoder
from reranker.serving.server import RunningServer, build_server
from reranker.service import RerankService
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def fake_settings(**overrides: object) -> Settings:
    base = Settings(
        address="127.0.0.1:0", encoder="fake", fake_dim=64, max_workers=8, grace_seconds=2.0, metrics_address=""
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def settings() -> Settings:
    return fake_settings()


@pytest.fixture
def encoder(settings: Settings) -> Encoder:
    return FakeEncoder(settings.fake_dim)


@pytest.fixture
def service(settings: Settings, encoder: Encoder) -> RerankService:
    return RerankService(settings, encoder)


def wait_ready(running: RunningServer, timeout: float = 60.0) -> None:
    running.loader.join(timeout)
    assert running.service.ready, f"service did not become ready: {running.service.load_error}"


@pytest.fixture
def server(settings: Settings, service: RerankService) -> Iterator[RunningServer]:
    running = build_server(settings, service)
    wait_ready(running)
    yield running
    running.stop(0)


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.RerankerServiceStub:
    return pb_grpc.RerankerServiceStub(channel)


ServerFactory = Callable[..., tuple[RunningServer, pb_grpc.RerankerServiceStub]]


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """Start extra servers with custom settings / encoders; all are stopped at teardown."""
    started: list[tuple[RunningServer, grpc.Channel]] = []

    def factory(
        settings: Settings | None = None, encoder: Encoder | None = None, *, wait: bool = True
    ) -> tuple[RunningServer, pb_grpc.RerankerServiceStub]:
        settings = settings or fake_settings()
        encoder = encoder if encoder is not None else FakeEncoder(settings.fake_dim)
        running = build_server(settings, RerankService(settings, encoder))
        if wait:
            wait_ready(running)
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, channel))
        return running, pb_grpc.RerankerServiceStub(channel)

    yield factory
    for running, channel in started:
        channel.close()
        running.stop(0)


class SlowEncoder:
    """Wraps an encoder and sleeps before every batch (a slow or hung model)."""

    def __init__(self, inner: Encoder, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.dim, self.version = inner.dim, "slow-" + inner.version

    def encode(self, texts: list[str]) -> np.ndarray:
        time.sleep(self.delay_s)
        return self.inner.encode(texts)


class FailingEncoder:
    """Raises on every batch after the first `ok_batches` (the warm-up)."""

    def __init__(self, inner: Encoder, ok_batches: int = 1) -> None:
        self.inner, self.ok_batches = inner, ok_batches
        self.dim, self.version = inner.dim, "failing-" + inner.version

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.ok_batches <= 0:
            raise RuntimeError("injected encoder failure")
        self.ok_batches -= 1
        return self.inner.encode(texts)


def candidate(item_id: str, score: float, text: str | None = None) -> pb.Candidate:
    c = pb.Candidate(item_id=item_id, score=score)
    if text is not None:
        c.text = text
    return c


def event(user_id: str, item_id: str, text: str | None = None, **kw: object) -> pb.Event:
    e = pb.Event(user_id=user_id, item_id=item_id, type=kw.pop("type", pb.EVENT_TYPE_CLICK), **kw)  # type: ignore[arg-type]
    if text is not None:
        e.text = text
    return e


def ml100k_items() -> dict[str, tuple[str, str, str]]:
    """item_id -> (title, year, genres) from ../shared/data/ml-100k (read-only, never copied)."""
    path = SHARED_DATA / "ml-100k" / "ml-100k.item"
    if not path.is_file():
        pytest.skip(f"shared data set missing: {path}")
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        item_id, title, year, genres = line.split("\t")
        out[item_id] = (title, year, genres)
    return out


def ml100k_title_sample(size: int = 200) -> list[str]:
    """About `size` real titles, "Title (year)", spread over the ml-100k catalog."""
    items = ml100k_items()
    every = max(1, len(items) // size)
    return [f"{title} ({year})" for title, year, _ in list(items.values())[::every]]


class GatedEncoder:
    """Blocks every call (the warm-up first) until `gate` is set: a server stuck loading its model."""

    def __init__(self, dim: int = 64) -> None:
        self.inner = FakeEncoder(dim)
        self.dim, self.version = dim, "gated"
        self.gate = threading.Event()

    def encode(self, texts: list[str]) -> np.ndarray:
        self.gate.wait(30)
        return self.inner.encode(texts)
