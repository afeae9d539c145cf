"""Probes: the health-only listener kubelet reaches, and `python -m reranker.serving.probe` (Docker HEALTHCHECK)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker.serving import probe
from reranker.serving.server import SERVICE_NAME
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc
from tests.conftest import GatedEncoder, REPO, ServerFactory, candidate, fake_settings
from reranker.tools.harness import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_listener_mirrors_the_main_status_and_serves_nothing_else(make_server: ServerFactory) -> None:
    encoder = GatedEncoder()
    running, _ = make_server(fake_settings(health_address="127.0.0.1:0"), encoder, wait=False)
    assert running.health_port > 0 and running.health_port != running.port
    assert health_status(running.health_port) == NOT_SERVING  # loading
    assert health_status(running.health_port, SERVICE_NAME) == NOT_SERVING
    encoder.gate.set()
    running.loader.join(10)
    assert health_status(running.health_port) == SERVING
    assert health_status(running.health_port, SERVICE_NAME) == SERVING
    with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as ch:  # the API is not exposed there
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RerankerServiceStub(ch).Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1)]))
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_health_listener_is_off_by_default(make_server: ServerFactory) -> None:
    running, _ = make_server()
    assert running.health_server is None and running.health_port == 0


def test_graceful_stop_turns_the_health_listener_not_serving_first(make_server: ServerFactory) -> None:
    running, _ = make_server(fake_settings(health_address="127.0.0.1:0"))
    running.health.enter_graceful_shutdown()  # the first step of RunningServer.stop
    assert health_status(running.health_port) == NOT_SERVING


def test_probe_exit_codes(make_server: ServerFactory) -> None:
    encoder = GatedEncoder()
    running, _ = make_server(fake_settings(), encoder, wait=False)
    address = f"127.0.0.1:{running.port}"
    assert probe.check(address) == 1
    encoder.gate.set()
    running.loader.join(10)
    assert probe.check(address) == 0
    assert probe.check(address, SERVICE_NAME) == 0
    dead = f"127.0.0.1:{free_port()}"
    assert probe.check(dead, timeout_s=0.5) == 2


def test_probe_runs_as_a_module(make_server: ServerFactory) -> None:
    running, _ = make_server()
    run = subprocess.run(
        [sys.executable, "-m", "reranker.serving.probe", f"--address=127.0.0.1:{running.port}"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert run.returncode == 0 and "SERVING" in run.stdout
