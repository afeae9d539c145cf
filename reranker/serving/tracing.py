"""Optional OpenTelemetry tracing of every RPC (settings `otel_*`; off by default).

Needs the `otel` extra: pip install 'reranker[otel]'. Spans go to an OTLP/gRPC collector through a
batching span processor, so export problems never slow an RPC down. A span carries the method and
status code (opentelemetry-instrumentation-grpc); user ids and texts are not recorded.
"""

from __future__ import annotations

from typing import Any

from reranker.config import Settings

MISSING = (
    "otel_enabled is set but the OpenTelemetry packages are missing ({error}); "
    "install them with: pip install 'reranker[otel]'"
)


def build_tracer_provider(settings: Settings, exporter: Any = None) -> Any:
    """An SDK TracerProvider exporting to `exporter`, or to OTLP/gRPC at settings.otel_endpoint."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise RuntimeError(MISSING.format(error=exc)) from None
    provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise RuntimeError(MISSING.format(error=exc)) from None
    otlp = OTLPSpanExporter(endpoint=settings.otel_endpoint) if settings.otel_endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(otlp))
    return provider


def tracing_interceptor(tracer_provider: Any) -> Any:
    """The asyncio server interceptor that opens one span per RPC on `tracer_provider`."""
    try:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
    except ImportError as exc:
        raise RuntimeError(MISSING.format(error=exc)) from None
    return aio_server_interceptor(tracer_provider=tracer_provider)


def shutdown(tracer_provider: Any) -> None:
    """Flush pending spans (called on server stop)."""
    if tracer_provider is not None and hasattr(tracer_provider, "shutdown"):
        tracer_provider.shutdown()
