"""Server assembly: gRPC server, health (NOT_SERVING until warm), reflection, graceful shutdown.

The server is grpc's asyncio server, running on its own event-loop thread: a warm Rerank is
answered on that thread without a hop to a worker pool (see servicer.py), which is what keeps
the added latency small under concurrency. Work that waits runs on a `max_workers` thread pool.
`RunningServer` is the synchronous handle the rest of the program (and the tests) use.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from reranker.serving import tracing
from reranker.config import Settings
from reranker.metrics import MetricsEndpoint
from reranker.serving.observability import Observer
from reranker.service import RerankService
from reranker.serving.servicer import RerankerServicer, add_to_server
from reranker.serving.tls import TransportConfigError, is_loopback, server_credentials
from reranker.v1 import reranker_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RerankerService"].full_name
# `reranker serve` exit status when the model cannot load and on_load_failure=exit.
EXIT_LOAD_FAILED = 3
# ... and when a transport setting (certificate path) is unusable.
EXIT_BAD_CONFIG = 2
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EventLoopThread:
    """An asyncio event loop on a daemon thread; `run` executes a coroutine there and waits."""

    def __init__(self, name: str = "grpc-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class HealthStatus:
    """The asyncio health servicer, set from any thread but the loop's."""

    def __init__(self, servicer: health.aio.HealthServicer, loop: EventLoopThread) -> None:
        self.servicer = servicer
        self._loop = loop

    def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self._run(self.servicer.set(service, status))

    def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service from now on (kubelet stops routing here)."""
        self._run(self.servicer.enter_graceful_shutdown())

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        # The model may finish loading after the server stopped: then there is nobody to tell.
        if self._loop.closed:
            coro.close()
            return
        try:
            self._loop.run(coro, timeout=10)
        except (RuntimeError, futures.TimeoutError):
            coro.close()
            if not self._loop.closed:
                raise


@dataclass
class RunningServer:
    server: aio.Server
    port: int
    health: HealthStatus
    service: RerankService
    loader: threading.Thread
    event_loop: EventLoopThread
    blocking_pool: futures.ThreadPoolExecutor
    metrics_endpoint: MetricsEndpoint | None = None
    tracer_provider: Any = None
    health_server: aio.Server | None = None
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
        then refuse new RPCs and give in-flight ones up to `grace` seconds to finish. Idempotent."""
        if self.event_loop.closed:
            return
        # Each step runs whatever the steps before it did (a failure is logged): the service's close
        # (training log, snapshot, Redis replay flush) must run even if, say, the listener did not stop cleanly.
        _step("health: NOT_SERVING", self.health.enter_graceful_shutdown)
        if drain_delay > 0:
            time.sleep(drain_delay)
        _step("gRPC server stop", lambda: self.event_loop.run(self.server.stop(grace)))
        if self.health_server is not None:
            health_server = self.health_server
            _step("health listener stop", lambda: self.event_loop.run(health_server.stop(0)))
        _step("service close", self.service.close)
        _step("worker pool", lambda: self.blocking_pool.shutdown(wait=False, cancel_futures=True))
        _step("event loop", self.event_loop.close)
        if self.metrics_endpoint is not None:
            _step("metrics endpoint", self.metrics_endpoint.stop)
        _step("tracing", lambda: tracing.shutdown(self.tracer_provider))


def _step(what: str, step: Callable[[], object]) -> None:
    """One step of the shutdown: an exception is logged, never stops the steps after it."""
    try:
        step()
    except Exception:
        log.exception("shutdown: %s failed; going on with the next step", what)


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
    credentials = server_credentials(settings.server)
    options = [
        ("grpc.max_receive_message_length", settings.server.max_message_bytes),
        ("grpc.max_send_message_length", settings.server.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    interceptors: list[aio.ServerInterceptor] = []
    owned_provider = None
    if tracing.tracing_enabled(settings.observability):
        if tracer_provider is None:
            tracer_provider = owned_provider = tracing.build_tracer_provider(settings.observability)
        interceptors.append(tracing.tracing_interceptor(tracer_provider))
    metrics_address = settings.observability.metrics_address
    endpoint = MetricsEndpoint(service.metrics, metrics_address) if metrics_address else None
    event_loop = EventLoopThread()
    pool = futures.ThreadPoolExecutor(max_workers=settings.server.max_workers, thread_name_prefix="blocking")

    async def start() -> tuple[aio.Server, int, health.aio.HealthServicer, aio.Server | None, int]:
        server = aio.server(
            interceptors=interceptors, options=options, maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs or None
        )
        observer = Observer(service.settings.observability, service.metrics)
        # runtime_settings_file changes access_log_sample
        service.watch_settings(lambda new: observer.apply(new.observability))
        add_to_server(RerankerServicer(service, pool), server, observer)
        health_servicer = health.aio.HealthServicer()
        for name in ("", SERVICE_NAME):  # before start: never SERVING while the model loads
            await health_servicer.set(name, NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        port = _bind(server, settings.server.address, credentials, "")
        if credentials is None and not is_loopback(settings.server.address):
            log.warning("listening on %s WITHOUT TLS: anyone who can reach it can call it", settings.server.address)
        health_server, health_port = None, 0
        if settings.server.health_address:
            health_server, health_port = _health_only_server(settings.server.health_address, health_servicer)
            await health_server.start()
        await server.start()
        return server, port, health_servicer, health_server, health_port

    try:
        server, port, health_servicer, health_server, health_port = event_loop.run(start())
    except BaseException:
        event_loop.close()
        pool.shutdown(wait=False)
        if endpoint is not None:
            endpoint.stop()
        raise

    running = RunningServer(
        server, port, HealthStatus(health_servicer, event_loop), service, threading.Thread(), event_loop, pool,
        endpoint, owned_provider, health_server, health_port, tls=credentials is not None,
    )

    def load() -> None:
        try:
            service.load()
        except Exception:
            if settings.server.on_load_failure == "exit":
                log.exception("model failed to load")
            else:
                log.exception("model failed to load; staying NOT_SERVING, Rerank fails open (upstream order)")
            return
        if freeze_gc:
            gc.collect()
            gc.freeze()
        running.set_serving(True)
        log.info("serving on port %d (model %s)", port, service.model_version)

    running.loader = threading.Thread(target=load, name="model-loader", daemon=True)
    running.loader.start()
    return running


def _health_only_server(address: str, health_servicer: health.aio.HealthServicer) -> tuple[aio.Server, int]:
    """A second listener with only the health service, sharing the main server's status."""
    server = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, _bind(server, address, None, "health_address ")


def _bind(server: aio.Server, address: str, credentials: grpc.ServerCredentials | None, what: str) -> int:
    """Listen on `address` (TLS with `credentials`); RuntimeError naming `what` when that fails
    (grpc reports a failed bind either by raising or by returning port 0)."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise RuntimeError(f"could not bind {what}{address}")
    return port


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then drain gracefully; SIGHUP reloads the ranking heads (hotreload.py).
    Returns the process exit status (0 after a signal, whatever a step of the shutdown did).

    The handlers are installed before anything else: a signal during the start-up (the server binding,
    the model loading) is handled like one later (SIGTERM drains what there is, SIGHUP reloads what
    there is). If the model fails to load: with on_load_failure=fail_open keep running NOT_SERVING
    (Rerank answers with the upstream order); with on_load_failure=exit stop and return EXIT_LOAD_FAILED.
    """
    stopping = threading.Event()
    load_failed: list[str] = []
    started: list[RunningServer] = []

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: draining for up to %.1f s", signum,
                 settings.server.drain_delay_seconds + settings.server.grace_seconds)
        stopping.set()

    def on_hangup(_signum: int, _frame: object) -> None:
        if not started:
            return  # nothing to reload yet: the heads are read when the model loads
        log.info("SIGHUP: reloading the ranking heads and the runtime settings file")
        service = started[0].service
        threading.Thread(target=service.reload_heads, name="sighup-reload", daemon=True).start()
        if service.runtime_settings is not None:
            threading.Thread(target=service.runtime_settings.check, name="sighup-settings", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        running = build_server(settings, RerankService(settings), freeze_gc=True)
    except TransportConfigError as exc:
        log.error("cannot start: %s", exc)
        print(f"reranker: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    started.append(running)
    log.info("listening on %s (port %d, %s)", settings.server.address, running.port, "TLS" if running.tls else "plaintext")
    if running.metrics_endpoint is not None:
        log.info("metrics on http://%s/metrics", settings.observability.metrics_address)
    if running.health_server is not None:
        log.info("health-only listener on %s (port %d)", settings.server.health_address, running.health_port)

    def watch_loader() -> None:
        running.loader.join()
        if not running.service.ready and settings.server.on_load_failure == "exit":
            load_failed.append(running.service.load_error or "unknown error")
            stopping.set()

    threading.Thread(target=watch_loader, name="load-watcher", daemon=True).start()
    stopping.wait()
    if load_failed:
        running.stop(0)
        log.error("model failed to load: %s; exiting (on_load_failure=exit)", load_failed[0])
        return EXIT_LOAD_FAILED
    running.stop(settings.server.grace_seconds, settings.server.drain_delay_seconds)
    log.info("stopped")
    return 0
