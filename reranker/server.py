"""Server assembly: gRPC server, health (NOT_SERVING until warm), reflection, graceful shutdown."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
import time
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
from reranker.servicer import RerankerServicer, add_to_server
from reranker.tls import TransportConfigError, is_loopback, server_credentials
from reranker.v1 import reranker_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RerankerService"].full_name
# `reranker serve` exit status when the model cannot load and on_load_failure=exit.
EXIT_LOAD_FAILED = 3
# ... and when a transport setting (certificate path) is unusable.
EXIT_BAD_CONFIG = 2
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
    tls: bool = False

    @property
    def metrics_port(self) -> int:
        """Port of the /metrics endpoint (0 when metrics_address is empty)."""
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else 0

    def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, grace: float | None, drain_delay: float = 0.0) -> None:
        """Graceful shutdown: report NOT_SERVING (still accepting RPCs for `drain_delay` seconds),
        then refuse new RPCs and give in-flight ones up to `grace` seconds to finish."""
        self.health.enter_graceful_shutdown()
        if drain_delay > 0:
            time.sleep(drain_delay)
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        self.service.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        tracing.shutdown(self.tracer_provider)


def build_server(
    settings: Settings, service: RerankService, *, tracer_provider: Any = None, freeze_gc: bool = False
) -> RunningServer:
    """Create, bind and start the server; the model loads in the background (health flips when warm).

    `freeze_gc` (for a process that runs one server: `serve`): once the model is loaded, and before
    SERVING, collect and `gc.freeze()` everything alive. The model, tokenizer and libraries are
    ~370k long-lived objects; a full cyclic collection over them takes ~200 ms, which would land on
    some Rerank's latency. Frozen objects are never scanned again (reference counting still frees them).

    With `otel_enabled`, RPCs are traced on `tracer_provider` (default: OTLP export per settings).
    Raises TransportConfigError when a TLS certificate path is unusable.
    """
    credentials = server_credentials(settings)
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
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )
    add_to_server(RerankerServicer(service), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if credentials is None:
        port = server.add_insecure_port(settings.address)
        if not is_loopback(settings.address):
            log.warning("listening on %s WITHOUT TLS: anyone who can reach it can call it", settings.address)
    else:
        port = server.add_secure_port(settings.address, credentials)
    if port == 0:
        if endpoint is not None:
            endpoint.stop()
        raise RuntimeError(f"could not bind {settings.address}")

    running = RunningServer(
        server, port, health_servicer, service, threading.Thread(), endpoint, owned_provider, tls=credentials is not None
    )
    running.set_serving(False)

    def load() -> None:
        try:
            service.load()
        except Exception:
            if settings.on_load_failure == "exit":
                log.exception("model failed to load")
            else:
                log.exception("model failed to load; staying NOT_SERVING, Rerank fails open (upstream order)")
            return
        if freeze_gc:
            gc.collect()
            gc.freeze()
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


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain gracefully. Returns the process exit status.

    If the model fails to load: with on_load_failure=fail_open keep running NOT_SERVING (Rerank
    answers with the upstream order); with on_load_failure=exit stop and return EXIT_LOAD_FAILED.
    """
    try:
        running = build_server(settings, RerankService(settings), freeze_gc=True)
    except TransportConfigError as exc:
        log.error("cannot start: %s", exc)
        print(f"reranker: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    log.info("listening on %s (port %d, %s)", settings.address, running.port, "TLS" if running.tls else "plaintext")
    if running.metrics_endpoint is not None:
        log.info("metrics on http://%s/metrics", settings.metrics_address)
    if running.health_server is not None:
        log.info("health-only listener on %s (port %d)", settings.health_address, running.health_port)
    stopping = threading.Event()
    load_failed: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: draining for up to %.1f s", signum, settings.drain_delay_seconds + settings.grace_seconds)
        stopping.set()

    def watch_loader() -> None:
        running.loader.join()
        if not running.service.ready and settings.on_load_failure == "exit":
            load_failed.append(running.service.load_error or "unknown error")
            stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=watch_loader, name="load-watcher", daemon=True).start()
    stopping.wait()
    if load_failed:
        running.stop(0)
        log.error("model failed to load: %s; exiting (on_load_failure=exit)", load_failed[0])
        return EXIT_LOAD_FAILED
    running.stop(settings.grace_seconds, settings.drain_delay_seconds)
    log.info("stopped")
    return 0
