"""OpenTelemetry tracing: off by default, a clear error when enabled without the packages, spans when on."""

from __future__ import annotations

import sys

import pytest

from reranker.config import Settings
from reranker.model.encoder import FakeEncoder
from reranker.serving.server import build_server
from reranker.service import RerankService
from reranker.v1 import reranker_pb2 as pb
from tests.conftest import ServerFactory, candidate, fake_settings, wait_ready

OTEL_MODULES = ("opentelemetry", "opentelemetry.instrumentation.grpc", "opentelemetry.sdk.trace")


def _hide_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            monkeypatch.delitem(sys.modules, name)
    for name in OTEL_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError


def test_tracing_is_off_by_default_and_needs_no_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().otel_enabled is False
    _hide_opentelemetry(monkeypatch)
    settings = fake_settings()
    running = build_server(settings, RerankService(settings, FakeEncoder(settings.fake_dim)))
    try:
        wait_ready(running)
        assert running.tracer_provider is None
    finally:
        running.stop(0)


def test_enabled_without_the_packages_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_opentelemetry(monkeypatch)
    settings = fake_settings(otel_enabled=True)
    with pytest.raises(RuntimeError, match=r"pip install 'reranker\[otel\]'"):
        build_server(settings, RerankService(settings, FakeEncoder(settings.fake_dim)))


def test_enabled_tracing_records_a_span_per_rpc(make_server: ServerFactory) -> None:
    pytest.importorskip("opentelemetry.instrumentation.grpc")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from reranker.serving.tracing import build_tracer_provider

    settings = fake_settings(otel_enabled=True, otel_service_name="reranker-test")
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(settings, exporter=exporter)
    running = build_server(settings, RerankService(settings, FakeEncoder(settings.fake_dim)), tracer_provider=provider)
    try:
        wait_ready(running)
        import grpc

        from reranker.v1 import reranker_pb2_grpc as pb_grpc

        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.RerankerServiceStub(ch)
            stub.Rerank(pb.RerankRequest(user_id="secret-user", candidates=[candidate("a", 1.0, "text")]))
            bad = pb.RerankRequest(  # rejected; the error message quotes the other user id
                user_id="secret-user", candidates=[candidate("a", 1.0)],
                context_events=[pb.Event(user_id="secret-other", item_id="a")],
            )
            with pytest.raises(grpc.RpcError):
                stub.Rerank(bad)
    finally:
        running.stop(0)
    spans = [s for s in exporter.get_finished_spans() if s.name.endswith("RerankerService/Rerank")]
    assert len(spans) == 2
    assert spans[0].resource.attributes["service.name"] == "reranker-test"
    assert spans[0].attributes["rpc.method"] == "Rerank"
    assert [s.attributes["rpc.grpc.status_code"] for s in spans] == [0, 3]  # OK, INVALID_ARGUMENT
    recorded = " ".join(str(dict(s.attributes)) + str([dict(e.attributes) for e in s.events]) for s in spans)
    assert "secret-user" not in recorded and "secret-other" not in recorded


def test_otlp_exporter_is_built_from_settings_when_enabled() -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    from reranker.serving.tracing import build_tracer_provider, shutdown

    settings = fake_settings(otel_enabled=True, otel_endpoint="http://127.0.0.1:4317")
    provider = build_tracer_provider(settings)
    processors = provider._active_span_processor._span_processors  # noqa: SLF001 - no public accessor
    assert type(processors[0]).__name__ == "BatchSpanProcessor"
    assert type(processors[0].span_exporter).__name__ == "OTLPSpanExporter"
    shutdown(provider)
