"""The Prometheus endpoint of a real running server, scraped over HTTP after real RPCs."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reranker.config import Settings
from reranker.model.encoder import FakeEncoder
from reranker.serving.server import build_server
from reranker.service import RerankService
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc
from tests.conftest import FailingEncoder, ServerFactory, candidate, event, fake_settings, wait_ready

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_default_settings_expose_metrics_on_loopback_and_tests_turn_them_off() -> None:
    assert Settings().observability.metrics_address == "127.0.0.1:9464"
    assert fake_settings().observability.metrics_address == ""


def test_scrape_after_real_traffic_reports_the_documented_series(make_server: ServerFactory) -> None:
    # Warm-up and the RecordEvents batch succeed; every later encoder batch fails.
    settings = fake_settings(metrics_address="127.0.0.1:0", min_budget_ms=2000.0)
    running, stub = make_server(settings, FailingEncoder(FakeEncoder(settings.model.fake_dim), ok_batches=2))
    assert running.metrics_port > 0

    stub.RecordEvents(pb.RecordEventsRequest(events=[
        event("u", "h1", "space opera with starships"), event("u", "h2", "galactic empire at war"),
    ]))  # items: 2 misses; encoder batch of 2
    ok = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("h1", 1), candidate("h2", 2), candidate("x", 3)]))
    assert ok.variant == pb.VARIANT_RERANKED  # items: 2 hits 1 miss; users: 1 hit
    failed = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("h1", 1), candidate("n1", 2, "new text")]))
    assert (failed.variant, failed.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_ENCODER_ERROR)
    # ^ items: 1 hit 1 miss; the encoder batch of 1 fails
    bypassed = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("h1", 1)], options=pb.RerankOptions(bypass=True)))
    assert bypassed.variant == pb.VARIANT_BYPASSED
    late = stub.Rerank(pb.RerankRequest(user_id="v", candidates=[candidate("h1", 1)]), timeout=1.0)
    assert (late.variant, late.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_DEADLINE)
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(pb.RerankRequest(user_id="", candidates=[candidate("h1", 1)]))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    cold = stub.Rerank(pb.RerankRequest(user_id="w", candidates=[candidate("h1", 1), candidate("h2", 2)]))
    assert cold.variant == pb.VARIANT_RERANKED and cold.cold_user  # items: 2 hits; users: 1 miss

    m = scrape(running.metrics_port)
    count = "reranker_rpc_duration_seconds_count"
    assert value(m, count, method="Rerank", variant="reranked") == 2
    assert value(m, count, method="Rerank", variant="fallback") == 2
    assert value(m, count, method="Rerank", variant="bypassed") == 1
    assert value(m, count, method="Rerank", variant="") == 1  # the rejected request
    assert value(m, count, method="RecordEvents", variant="") == 1
    assert value(m, "reranker_rpc_duration_seconds_bucket", method="Rerank", variant="reranked", le="+Inf") == 2
    assert value(m, "reranker_rpc_duration_seconds_sum", method="Rerank", variant="reranked") > 0
    assert value(m, "reranker_rpcs_total", method="Rerank", code="OK") == 5
    assert value(m, "reranker_rpcs_total", method="Rerank", code="INVALID_ARGUMENT") == 1
    assert value(m, "reranker_rpcs_total", method="RecordEvents", code="OK") == 1
    assert value(m, "reranker_fallbacks_total", reason="encoder_error") == 1
    assert value(m, "reranker_fallbacks_total", reason="deadline") == 1
    assert value(m, "reranker_rerank_candidates_count") == 5
    assert value(m, "reranker_rerank_candidates_sum") == 3 + 2 + 1 + 1 + 2

    assert value(m, "reranker_cache_lookups_total", cache="items", result="hit") == 5
    assert value(m, "reranker_cache_lookups_total", cache="items", result="miss") == 4
    assert value(m, "reranker_cache_hit_ratio", cache="items") == pytest.approx(5 / 9)
    assert value(m, "reranker_cache_lookups_total", cache="users", result="hit") == 1
    assert value(m, "reranker_cache_lookups_total", cache="users", result="miss") == 1
    assert value(m, "reranker_cache_hit_ratio", cache="users") == pytest.approx(0.5)
    assert value(m, "reranker_cache_entries", cache="items") == 2
    assert value(m, "reranker_cache_entries", cache="users") == 1

    assert value(m, "reranker_encoder_batch_size_count") == 2
    assert value(m, "reranker_encoder_batch_size_sum") == 3
    assert value(m, "reranker_encoder_batch_size_bucket", le="2.0") == 2
    assert value(m, "reranker_encoder_batch_size_bucket", le="1.0") == 1
    assert value(m, "reranker_encoder_queue_wait_seconds_count") == 2
    assert value(m, "reranker_encoder_batch_duration_seconds_count") == 2
    assert value(m, "reranker_encoder_failed_batches_total") == 1

    assert value(m, "reranker_model_load_seconds") > 0
    assert value(m, "reranker_model_info", model_version="failing-fake-hash-v1") == 1
    assert value(m, "reranker_ready") == 1


def test_health_checks_are_not_counted_as_rpcs(make_server: ServerFactory) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    running, _ = make_server(fake_settings(metrics_address="127.0.0.1:0"))
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
    names = {name for name, _ in scrape(running.metrics_port)}
    assert "reranker_rpcs_total" not in names


def test_each_server_has_its_own_registry(make_server: ServerFactory) -> None:
    first, stub_a = make_server(fake_settings(metrics_address="127.0.0.1:0"))
    second, _ = make_server(fake_settings(metrics_address="127.0.0.1:0"))
    stub_a.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1)], options=pb.RerankOptions(bypass=True)))
    assert value(scrape(first.metrics_port), "reranker_rpcs_total", method="Rerank", code="OK") == 1
    assert ("reranker_rpcs_total", (("code", "OK"), ("method", "Rerank"))) not in scrape(second.metrics_port)


def test_not_ready_until_the_model_has_loaded() -> None:
    service = RerankService(fake_settings(), FakeEncoder(64))
    assert b"reranker_ready 0.0" in service.metrics.exposition()
    service.load()
    assert b"reranker_ready 1.0" in service.metrics.exposition()
    service.close()
    assert b"reranker_ready 0.0" in service.metrics.exposition()


def test_metrics_port_in_use_is_a_clear_startup_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = fake_settings(metrics_address=f"127.0.0.1:{port}")
        with pytest.raises(RuntimeError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            build_server(settings, RerankService(settings, FakeEncoder(64)))


def test_malformed_metrics_address_is_rejected_with_the_setting_name() -> None:
    with pytest.raises(ValueError, match="metrics_address"):
        fake_settings(metrics_address="localhost")


def test_streamed_events_are_counted_once_per_stream(make_server: ServerFactory) -> None:
    running, stub = make_server(fake_settings(metrics_address="127.0.0.1:0"))
    reply = stub.StreamEvents(iter([event("u", f"i{n}", f"text {n}") for n in range(3)]))
    assert reply.accepted == 3
    m = scrape(running.metrics_port)
    assert value(m, "reranker_rpcs_total", method="StreamEvents", code="OK") == 1
    assert value(m, "reranker_rpc_duration_seconds_count", method="StreamEvents", variant="") == 1
    assert value(m, "reranker_cache_entries", cache="items") == 3


@pytest.mark.model
def test_real_model_server_reports_load_time_and_encoder_batches() -> None:
    settings = fake_settings(encoder="transformer", metrics_address="127.0.0.1:0", torch_threads=1)
    running = build_server(settings, RerankService(settings))  # the service loads the packaged model itself
    try:
        wait_ready(running)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            _check_real_model_metrics(running.metrics_port, pb_grpc.RerankerServiceStub(channel))
    finally:
        running.stop(0)


def _check_real_model_metrics(metrics_port: int, stub: pb_grpc.RerankerServiceStub) -> None:
    texts = ["A space opera about a galactic war", "A quiet romance in Paris", "Deep sea documentary"]
    reply = stub.Rerank(pb.RerankRequest(
        user_id="u", candidates=[candidate(f"i{n}", 1.0 - n / 10, t) for n, t in enumerate(texts)],
        context_events=[event("u", "h1", "Starships and aliens")],
    ))
    assert reply.variant == pb.VARIANT_RERANKED
    m = scrape(metrics_port)
    (version,) = [dict(labels)["model_version"] for name, labels in m if name == "reranker_model_info"]
    assert version.startswith("all-MiniLM-L6-v2@") and version == reply.model_version
    assert value(m, "reranker_model_load_seconds") > 0.05  # reading weights from disk, not just a warm-up
    assert value(m, "reranker_encoder_batch_size_sum") == 4  # three candidates and the event text
    assert value(m, "reranker_rpc_duration_seconds_count", method="Rerank", variant="reranked") == 1


def test_operations_page_documents_exactly_the_exposed_series(make_server: ServerFactory, tmp_path: Path) -> None:
    from tests.conftest import REPO
    from tests.test_head import make_head

    page = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    section = page.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(reranker_[a-z_]+)` \|", section, re.M))
    from reranker.model.catalog import write_catalog
    from reranker.model.encoder import FakeEncoder

    make_head().save(tmp_path / "head.npz")  # every optional series on: a head file, the training log, online metrics,
    write_catalog(tmp_path / "items.cat", ["a"], ["text"], FakeEncoder(64).encode(["text"]),  # a shared catalog,
                  model_version=FakeEncoder.version)
    (tmp_path / "runtime.json").write_text("{}")  # a runtime settings file
    running, stub = make_server(fake_settings(
        metrics_address="127.0.0.1:0", head_path=str(tmp_path / "head.npz"), training_log_dir=str(tmp_path / "log"),
        online_metrics_window_seconds=60.0, catalog_path=str(tmp_path / "items.cat"),
        runtime_settings_file=str(tmp_path / "runtime.json"),
    ))
    stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1, "text")]))
    body = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()
    exposed = {f.name for f in text_string_to_metric_families(body) if not f.name.endswith("_created")}
    # Counters are documented with their `_total` sample name; the parser reports the family name.
    exposed_names = {n + "_total" if f"{n}_total" in body else n for n in exposed}
    assert documented == exposed_names


def test_per_rpc_histograms_expose_what_prometheus_client_would() -> None:
    """The series observed per RPC (plain ints on the event loop) scrape exactly like a
    prometheus_client Histogram and Counter fed the same values: inclusive bucket bounds,
    cumulative buckets, +Inf, _sum and _count."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from reranker.metrics import LATENCY_BUCKETS, Metrics

    calls = [("Rerank", "OK", "reranked", s) for s in (0.0001, 0.0005, 0.0012, 0.002, 0.5, 11.0)]
    calls += [("Rerank", "INVALID_ARGUMENT", "", 0.0003), ("RecordEvents", "OK", "", 0.01)]
    ours = Metrics()
    registry = CollectorRegistry()
    latency = Histogram("reranker_rpc_duration_seconds", "d", ["method", "variant"], buckets=LATENCY_BUCKETS, registry=registry)
    rpcs = Counter("reranker_rpcs", "d", ["method", "code"], registry=registry)
    candidates = Histogram("reranker_rerank_candidates", "d", buckets=(1, 10, 50, 100, 200, 500, 1000, 2000), registry=registry)
    for method, code, variant, seconds in calls:
        ours.observe_rpc(method, code, seconds, variant)
        latency.labels(method=method, variant=variant).observe(seconds)
        rpcs.labels(method=method, code=code).inc()
    for n in (1, 10, 11, 500, 5000):
        ours.rerank_candidates.observe(n)
        candidates.observe(n)

    def samples(body: bytes) -> Samples:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples
            if f.name in ("reranker_rpc_duration_seconds", "reranker_rpcs", "reranker_rerank_candidates")
            and not s.name.endswith("_created")
        }

    expected = samples(generate_latest(registry))
    assert len(expected) == 3 * (15 + 2) + 3 + (9 + 2)  # 3 latency series, 3 counters, the candidates
    assert samples(ours.exposition()) == expected


def test_observing_an_rpc_builds_nothing_per_call() -> None:
    """observe_rpc and the candidates histogram, once their series exist, allocate nothing that
    outlives the call and nothing per bucket or per lock (tracemalloc's peak over 1,000 calls stays
    within a few small ints of an empty call's)."""
    import tracemalloc

    from reranker.metrics import Metrics

    metrics = Metrics()

    def peak(call) -> int:  # type: ignore[no-untyped-def]
        for _ in range(300):
            call()
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(1000):
                call()
            return tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()

    empty = peak(lambda: None)
    assert peak(lambda: metrics.observe_rpc("Rerank", "OK", 0.0012, "reranked")) - empty <= 96
    assert peak(lambda: metrics.rerank_candidates.observe(500)) - empty <= 64
