"""`reranker serve` as a real process: flags, health, SIGTERM drain, exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc

from conftest import REPO
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc
from reranker.tools import harness
from reranker.tools.harness import free_port


def run_cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "reranker", *args],
        # metrics off: a fixed default port would collide between concurrent test runs
        env={**os.environ, "PYTHONPATH": str(REPO), "RERANKER_METRICS_ADDRESS": "", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def wait_serving(port: int, timeout: float = 30.0) -> None:
    harness.wait_serving(f"127.0.0.1:{port}", timeout)


def test_serve_answers_then_drains_on_sigterm() -> None:
    port = free_port()
    proc = run_cli("serve", "--encoder", "fake", env={"RERANKER_ADDRESS": f"127.0.0.1:{port}"})
    try:
        wait_serving(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RerankerServiceStub(channel)
            response = stub.Rerank(
                pb.RerankRequest(user_id="u", candidates=[pb.Candidate(item_id="a", score=1, text="t")]), timeout=5
            )
            assert response.variant == pb.VARIANT_RERANKED
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "draining" in output and "stopped" in output


def test_bad_settings_exit_with_a_clear_message() -> None:
    proc = run_cli("serve", "--blend-weight", "3")
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "blend_weight must be in [0, 1]" in output


def test_settings_command_prints_the_reference() -> None:
    proc = run_cli("settings")
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "RERANKER_MAX_CANDIDATES" in output and "--kill-switch" in output
