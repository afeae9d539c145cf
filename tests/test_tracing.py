"""OpenTelemetry tracing: off by default, a clear error when enabled without the packages, spans when on."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from reranker.config import Settings
from reranker.model.encoder import FakeEncoder
from reranker.serving.server import build_server
from reranker.service import RerankService
from reranker.v1 import reranker_pb2 as pb
from tests.conftest import ServerFactory, candidate, fake_settings, wait_ready
from reranker.tools.harness import free_port

OTEL_MODULES = ("opentelemetry", "opentelemetry.instrumentation.grpc", "opentelemetry.sdk.trace")


def _hide_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            monkeypatch.delitem(sys.modules, name)
    for name in OTEL_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError


def test_tracing_is_off_by_default_and_needs_no_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().observability.otel_enabled is False
    _hide_opentelemetry(monkeypatch)
    settings = fake_settings()
    running = build_server(settings, RerankService(settings, FakeEncoder(settings.model.fake_dim)))
    try:
        wait_ready(running)
        assert running.tracer_provider is None
    finally:
        running.stop(0)


def test_enabled_without_the_packages_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_opentelemetry(monkeypatch)
    settings = fake_settings(otel_enabled=True)
    with pytest.raises(RuntimeError, match=r"pip install 'reranker\[otel\]'"):
        build_server(settings, RerankService(settings, FakeEncoder(settings.model.fake_dim)))


def test_enabled_tracing_records_a_span_per_rpc(make_server: ServerFactory) -> None:
    pytest.importorskip("opentelemetry.instrumentation.grpc")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from reranker.serving.tracing import build_tracer_provider

    settings = fake_settings(otel_enabled=True, otel_service_name="reranker-test")
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(settings.observability, exporter=exporter)
    running = build_server(settings, RerankService(settings, FakeEncoder(settings.model.fake_dim)), tracer_provider=provider)
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
    provider = build_tracer_provider(settings.observability)
    processors = provider._active_span_processor._span_processors  # noqa: SLF001 - no public accessor
    assert type(processors[0]).__name__ == "BatchSpanProcessor"
    assert type(processors[0].span_exporter).__name__ == "OTLPSpanExporter"
    shutdown(provider)


# --- the standard OTEL_* variables, against a real OTLP/gRPC receiver ----------------------------------
class OtlpReceiver:
    """A real OTLP/gRPC trace receiver (the collector's TraceService) on 127.0.0.1:0 that keeps what it gets."""

    def __init__(self) -> None:
        import grpc
        from concurrent import futures
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        received = self.requests = []  # type: list[Any]

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                received.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[tuple[dict[str, str], str]]:
        """(resource attributes, span name) of every span received."""
        out = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                out += [(attrs, span.name) for scope in resource_spans.scope_spans for span in scope.spans]
        return out


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc")
    found = OtlpReceiver()
    yield found
    found.server.stop(0)


OTEL_VARIABLES = ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED")


def traced_reranks(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], calls: int = 3, **settings: Any) -> Any:
    """A real server with tracing on and exactly `env` as the OTEL_* environment; `calls` Reranks;
    then a stop, which flushes the exporter. Returns the server."""
    pytest.importorskip("opentelemetry.instrumentation.grpc")
    import grpc

    from reranker.v1 import reranker_pb2_grpc as pb_grpc

    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = fake_settings(otel_enabled=True, **settings)
    running = build_server(s, RerankService(s, FakeEncoder(s.model.fake_dim)))
    try:
        wait_ready(running)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.RerankerServiceStub(ch)
            for _ in range(calls):
                stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1.0, "text")]), timeout=10)
    finally:
        running.stop(0)
    return running


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_the_standard_otel_variables_name_the_service_and_the_collector(
    monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver
) -> None:
    traced_reranks(monkeypatch, {
        "OTEL_SERVICE_NAME": "shop-reranker",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=staging,service.name=ignored",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,  # the traces endpoint wins over the generic one
        "OTEL_EXPORTER_OTLP_ENDPOINT": dead_endpoint(),
    })
    spans = [(attrs, name) for attrs, name in receiver.spans() if name.endswith("RerankerService/Rerank")]
    assert len(spans) == 3
    attrs = spans[0][0]
    assert attrs["service.name"] == "shop-reranker" and attrs["deployment.environment"] == "staging"


def test_the_generic_endpoint_and_resource_attributes_apply_too(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver) -> None:
    traced_reranks(monkeypatch, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                 "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attributes"}, calls=1)
    assert {attrs["service.name"] for attrs, _ in receiver.spans()} == {"from-attributes"}


def test_without_a_name_anywhere_the_service_is_reranker(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver) -> None:
    traced_reranks(monkeypatch, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}, calls=1)
    assert {attrs["service.name"] for attrs, _ in receiver.spans()} == {"reranker"}


def test_our_settings_override_the_standard_variables(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver) -> None:
    traced_reranks(monkeypatch, {"OTEL_SERVICE_NAME": "from-env", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": dead_endpoint()},
                   calls=1, otel_service_name="from-flag", otel_endpoint=receiver.endpoint)
    assert receiver.spans() and {attrs["service.name"] for attrs, _ in receiver.spans()} == {"from-flag"}


def test_the_sampler_variables_decide_what_is_traced(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver) -> None:
    traced_reranks(monkeypatch, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                 "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, calls=5)
    assert receiver.spans() == []
    traced_reranks(monkeypatch, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                 "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"}, calls=5)
    assert len(receiver.spans()) == 5


def test_otel_sdk_disabled_keeps_tracing_off(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver) -> None:
    running = traced_reranks(monkeypatch, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SDK_DISABLED": "true"})
    assert running.tracer_provider is None and receiver.spans() == []
