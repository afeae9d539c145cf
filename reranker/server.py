"""Server assembly: gRPC server, health (NOT_SERVING until warm), reflection, graceful shutdown."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from reranker import tracing
from reranker.config import Settings
from reranker.interceptors import ErrorMappingInterceptor
from reranker.metrics import MetricsEndpoint
from reranker.observability import ObservabilityInterceptor
from reranker.service import RerankService
from reranker.servicer import RerankerServicer
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RerankerService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service: RerankService
    loader: threading.Thread
    metrics_endpoint: MetricsEndpoint | None = None
    tracer_provider: Any = None
    health_server: grpc.Server | None = None
    health_port: int = 0

    @property
    def metrics_port(self) -> int:
        """Port of the /metrics endpoint (0 when metrics_address is empty)."""
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else 0

    def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float | None) -> None:
        """Graceful shutdown: report NOT_SERVING, refuse new RPCs, let in-flight ones finish."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        self.service.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        tracing.shutdown(self.tracer_provider)


def build_server(settings: Settings, service: RerankService, *, tracer_provider: Any = None) -> RunningServer:
    """Create, bind and start the server; the model loads in the background (health flips when warm).

    With `otel_enabled`, RPCs are traced on `tracer_provider` (default: OTLP export per settings).
    """
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    # Outermost first: tracing sees everything; observation sits inside the error mapping.
    interceptors: list[grpc.ServerInterceptor] = [
        ErrorMappingInterceptor(),
        ObservabilityInterceptor(settings, service.metrics),
    ]
    owned_provider = None
    if settings.otel_enabled:
        if tracer_provider is None:
            tracer_provider = owned_provider = tracing.build_tracer_provider(settings)
        interceptors.insert(0, tracing.tracing_interceptor(tracer_provider))
    endpoint = MetricsEndpoint(service.metrics, settings.metrics_address) if settings.metrics_address else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        interceptors=interceptors,
        options=options,
    )
    pb_grpc.add_RerankerServiceServicer_to_server(RerankerServicer(service), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(settings.address)
    if port == 0:
        if endpoint is not None:
            endpoint.stop()
        raise RuntimeError(f"could not bind {settings.address}")

    running = RunningServer(server, port, health_servicer, service, threading.Thread(), endpoint, owned_provider)
    running.set_serving(False)

    def load() -> None:
        try:
            service.load()
        except Exception:
            log.exception("model failed to load; staying NOT_SERVING, Rerank fails open")
            return
        running.set_serving(True)
        log.info("serving on port %d (model %s)", port, service.model_version)

    if settings.health_address:
        try:
            running.health_server, running.health_port = _health_only_server(settings.health_address, health_servicer)
        except RuntimeError:
            if endpoint is not None:
                endpoint.stop()
            raise
    running.loader = threading.Thread(target=load, name="model-loader", daemon=True)
    server.start()
    running.loader.start()
    return running


def _health_only_server(address: str, health_servicer: health.HealthServicer) -> tuple[grpc.Server, int]:
    """A second listener with only the health service, sharing the main server's status."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind health_address {address}")
    server.start()
    return server, port


def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully."""
    running = build_server(settings, RerankService(settings))
    log.info("listening on %s (port %d)", settings.address, running.port)
    if running.metrics_endpoint is not None:
        log.info("metrics on http://%s/metrics", settings.metrics_address)
    if running.health_server is not None:
        log.info("health-only listener on %s (port %d)", settings.health_address, running.health_port)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: draining for up to %.1f s", signum, settings.grace_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    running.stop(settings.grace_seconds)
    log.info("stopped")
