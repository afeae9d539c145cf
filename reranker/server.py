"""Server assembly: gRPC server, health (NOT_SERVING until warm), reflection, graceful shutdown."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from reranker.config import Settings
from reranker.interceptors import ErrorMappingInterceptor
from reranker.service import RerankService
from reranker.servicer import RerankerServicer
from reranker.tls import TransportConfigError, is_loopback, server_credentials
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

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
    tls: bool = False

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
        self.service.close()


def build_server(settings: Settings, service: RerankService) -> RunningServer:
    """Create, bind and start the server; the model loads in the background (health flips when warm).

    Raises TransportConfigError when a TLS certificate path is unusable.
    """
    credentials = server_credentials(settings)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        interceptors=[ErrorMappingInterceptor()],
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )
    pb_grpc.add_RerankerServiceServicer_to_server(RerankerServicer(service), server)
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
        raise RuntimeError(f"could not bind {settings.address}")

    running = RunningServer(server, port, health_servicer, service, threading.Thread(), tls=credentials is not None)
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
        running.set_serving(True)
        log.info("serving on port %d (model %s)", port, service.model_version)

    running.loader = threading.Thread(target=load, name="model-loader", daemon=True)
    server.start()
    running.loader.start()
    return running


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain gracefully. Returns the process exit status.

    If the model fails to load: with on_load_failure=fail_open keep running NOT_SERVING (Rerank
    answers with the upstream order); with on_load_failure=exit stop and return EXIT_LOAD_FAILED.
    """
    try:
        running = build_server(settings, RerankService(settings))
    except TransportConfigError as exc:
        log.error("cannot start: %s", exc)
        print(f"reranker: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    log.info("listening on %s (port %d, %s)", settings.address, running.port, "TLS" if running.tls else "plaintext")
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
