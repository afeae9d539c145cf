"""Fixture chain: settings -> service -> real gRPC server on 127.0.0.1:0 -> channel -> stub."""

from __future__ import annotations

import dataclasses
import logging
import io
import inspect
import re
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
    return FakeEncoder(settings.model.fake_dim)


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
        encoder = encoder if encoder is not None else FakeEncoder(settings.model.fake_dim)
        running = build_server(settings, RerankService(settings, encoder))
        if wait:
            wait_ready(running)
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, channel))
        return running, pb_grpc.RerankerServiceStub(channel)

    yield factory
    for running, channel in started:
        channel.close()
        # A model still loading (a gate opened at the end of the test) would start its threads after the
        # service's close, and they would outlive the test: let it finish first.
        running.loader.join(60)
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


class CountWatcher:
    """Stands in for a Prometheus counter (or its labelled child): each `inc()` records what a reader
    would see at that moment (`snapshot(label)`), to test that state is published before its count."""

    def __init__(self, snapshot: Callable[[str], object], seen: list[object], label: str = "") -> None:
        self.snapshot, self.seen, self.label = snapshot, seen, label

    def labels(self, **labels: str) -> CountWatcher:
        return CountWatcher(self.snapshot, self.seen, ",".join(labels.values()))

    def inc(self) -> None:
        self.seen.append(self.snapshot(self.label))


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


@pytest.fixture(autouse=True)
def _root_logging_kept() -> Iterator[None]:
    """A test that runs a CLI command in this process (its configure_logging replaces the root
    handlers and level) leaves the root logger as it found it for the tests after it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers and not type(handler).__module__.startswith("_pytest"):  # pytest's stay
            root.removeHandler(handler)
    root.setLevel(level)


# --- the two lanes ----------------------------------------------------------------------------------
# `unit`: in this process and this repository only (the service, the servicer through
# grpc_testing, pure functions, the fake encoder).
# `integration`: a real socket, redis-server, subprocess, signal, the deployment manifests, or a
# real artifact from outside the repository (the packaged model: `model`; ../shared/data).
# Every test gets one of the two, automatically: integration when it, a fixture it uses, or a
# helper of the test suite it calls (followed a few levels) reaches any of those; unit otherwise.
# A test that reaches them through package code alone says so with @pytest.mark.integration.
# `make test` runs both; `make test-unit` (pytest -m unit) the fast lane.
_OUTSIDE = re.compile(
    r"\b(build_server|subprocess|RedisServer|RedisClusterServer|ServerProcess|ReRankerProcess|"
    r"insecure_channel|secure_channel|MiniEmbeddingServer|InfinityServer|free_port|socket|urlopen|"
    r"os\.kill|signal\.|kubectl|k8s_validate|redis_server|make_server|run_load|run_soak|soak|"
    r"SHARED_DATA|ml100k_items|ml100k_title_sample|packaged_model_dir|TransformerEncoder)\b"
)
_TESTS_DIR = Path(__file__).resolve().parent
_verdicts: dict[int, bool] = {}


def _defined_in_tests(obj: object) -> bool:
    try:
        return Path(inspect.getfile(obj)).resolve().parent == _TESTS_DIR  # type: ignore[arg-type]
    except (TypeError, OSError):
        return False


def _reaches_outside(obj: object, namespace: dict[str, object], depth: int = 3) -> bool:
    """Whether the source of `obj` (a test, fixture or helper of the suite), or of a helper of the
    suite it names, starts something outside this process."""
    key = id(obj)
    if key in _verdicts:
        return _verdicts[key]
    _verdicts[key] = False  # a helper that names itself
    try:
        source = inspect.getsource(obj)  # type: ignore[arg-type]
    except (TypeError, OSError):
        return False
    found = bool(_OUTSIDE.search(source))
    if not found and depth:
        for name in set(re.findall(r"\b[A-Za-z_]\w*\b", source)):
            helper = namespace.get(name)
            if isinstance(helper, Path) and helper.resolve().is_relative_to(SHARED_DATA.resolve()):
                found = True  # a module constant naming a file of ../shared/data
                break
            if (inspect.isfunction(helper) or inspect.isclass(helper)) and _defined_in_tests(helper):
                helper_namespace = vars(inspect.getmodule(helper) or pytest)
                if _reaches_outside(helper, helper_namespace, depth - 1):
                    found = True
                    break
    _verdicts[key] = found
    return found


def _lane(item: pytest.Item) -> str:
    if item.get_closest_marker("integration") or item.get_closest_marker("unit"):
        return ""
    if item.get_closest_marker("model"):
        return "integration"
    namespace = vars(item.module) if getattr(item, "module", None) is not None else {}
    if _reaches_outside(getattr(item, "function", None), namespace):
        return "integration"
    for name in getattr(item, "fixturenames", ()):
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):  # type: ignore[attr-defined]
            func = fixturedef.func
            if _defined_in_tests(func) and _reaches_outside(func, vars(inspect.getmodule(func) or pytest)):
                return "integration"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        lane = _lane(item)
        if lane:
            item.add_marker(getattr(pytest.mark, lane))


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """Capture the access logger through the JSON formatter (without touching pytest's root handlers)."""
    from reranker.serving.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("reranker.access")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)
