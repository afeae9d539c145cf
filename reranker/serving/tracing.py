"""Optional OpenTelemetry tracing of every RPC (settings `otel_*`; off by default).

Needs the `otel` extra: pip install 'reranker[otel]'. Spans go to an OTLP/gRPC collector through a
batching span processor, so export problems never slow an RPC down. A span carries the method and
status code (opentelemetry-instrumentation-grpc); user ids and texts are not recorded.

`otel_enabled` turns tracing on; the rest follows the standard OpenTelemetry environment variables,
read by the SDK as the specification says, with our own settings as overrides where they are set:

| what | standard variables | override |
| --- | --- | --- |
| service name | OTEL_SERVICE_NAME, else `service.name` in OTEL_RESOURCE_ATTRIBUTES, else "reranker" | otel_service_name |
| collector | OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT (and their _HEADERS, _TIMEOUT, ...) | otel_endpoint |
| sampling | OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on) | |
| off switch | OTEL_SDK_DISABLED=true: no tracing even with otel_enabled | |
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from reranker.config import ObservabilitySettings

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "reranker"

MISSING = (
    "otel_enabled is set but the OpenTelemetry packages are missing ({error}); "
    "install them with: pip install 'reranker[otel]'"
)


def tracing_enabled(settings: ObservabilitySettings, env: Mapping[str, str] | None = None) -> bool:
    """otel_enabled, unless the standard OTEL_SDK_DISABLED=true switches the SDK off."""
    env = os.environ if env is None else env
    if settings.otel_enabled and env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.info("tracing stays off: OTEL_SDK_DISABLED=true")
        return False
    return settings.otel_enabled


def build_tracer_provider(settings: ObservabilitySettings, exporter: Any = None) -> Any:
    """An SDK TracerProvider exporting to `exporter`, or to OTLP/gRPC at otel_endpoint or where the
    standard OTEL_EXPORTER_OTLP_* variables say; resource and sampler from the OTEL_* variables."""
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise RuntimeError(MISSING.format(error=exc)) from None
    # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (the SDK reads them); otel_service_name wins when
    # set; our name instead of the SDK's "unknown_service" when none is given.
    resource = Resource.create({SERVICE_NAME: settings.otel_service_name} if settings.otel_service_name else {})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER / _ARG (the SDK reads them)
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
