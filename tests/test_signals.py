"""Every long-running command handles SIGHUP and SIGTERM from its first instruction: real
`python -m reranker` processes, real signals, a real redis-server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

from conftest import REPO, candidate
from redis_server import RedisServer, stored_profile
from serve_process import SERVING, ReRankerProcess

STREAM = "events"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` (its SigCgt mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return False


def _grpc_loaded(pid: int) -> bool:
    """Whether grpc's native module (the first heavy import of serve and consume) is mapped yet."""
    try:
        return "cygrpc" in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_until_caught(proc: ReRankerProcess, signum: int, timeout: float = 30.0) -> bool:
    """Poll until the child catches `signum`; whether grpc was already loaded at that moment."""
    deadline = time.monotonic() + timeout
    while not _catches(proc.process.pid, signum):
        assert proc.process.poll() is None, f"exited with {proc.process.returncode}\n{proc.log[-3000:]}"
        assert time.monotonic() < deadline, "never installed a handler"
        time.sleep(0.001)
    return _grpc_loaded(proc.process.pid)


def _consume_args(redis_server: RedisServer, group: str) -> list[str]:
    return ["--encoder=fake", "--fake-dim=16", f"--redis-url={redis_server.url}", f"--stream-key={STREAM}",
            f"--stream-group={group}", "--stream-block-ms=50"]


def _wait_applied(redis_server: RedisServer, user: str, count: int, proc: ReRankerProcess) -> None:
    client = redis_server.client()
    deadline = time.monotonic() + 60
    while getattr(stored_profile(client, user, 16), "event_count", 0) != count:  # --fake-dim=16
        assert proc.process.poll() is None, f"exited with {proc.process.returncode}\n{proc.log[-3000:]}"
        assert time.monotonic() < deadline, proc.log[-3000:]
        time.sleep(0.05)
    client.close()


def _push(redis_server: RedisServer, user: str, item: str) -> None:
    client = redis_server.client()
    client.xadd(STREAM, {"user_id": user, "item_id": item, "type": "CLICK", "event_id": f"{user}-{item}"})
    client.close()


@pytest.mark.parametrize("command", ["serve", "consume"])
def test_sighup_from_the_first_instruction_does_not_kill_and_sigterm_exits_clean(
    command: str, redis_server: RedisServer
) -> None:
    """The handler is there before the heavy imports; SIGHUPs all through startup change nothing."""
    if command == "serve":
        proc = ReRankerProcess("serve", ["--encoder=fake", "--fake-dim=16", "--address=127.0.0.1:0", "--grace-seconds=1"])
    else:
        proc = ReRankerProcess("consume", _consume_args(redis_server, "early"))
    try:
        grpc_was_loaded = _wait_until_caught(proc, signal.SIGHUP)
        assert not grpc_was_loaded, "SIGHUP is caught only after the heavy imports: a SIGHUP before that kills"
        deadline = time.monotonic() + 60
        while True:  # SIGHUP every 20 ms until the command does its work
            proc.signal(signal.SIGHUP)
            time.sleep(0.02)
            assert proc.process.poll() is None, f"SIGHUP killed it ({proc.process.returncode})\n{proc.log[-3000:]}"
            if command == "serve" and proc.port and proc.health() == SERVING:
                break
            if command == "consume" and "consuming" in proc.log:
                break
            assert time.monotonic() < deadline, proc.log[-3000:]
        if command == "serve":
            with grpc.insecure_channel(f"127.0.0.1:{proc.port}") as channel:
                response = pb_grpc.RerankerServiceStub(channel).Rerank(
                    pb.RerankRequest(user_id="u", candidates=[candidate("a", 1.0, "x"), candidate("b", 0.5, "y")]), timeout=10)
                assert response.variant == pb.VARIANT_RERANKED
        else:
            _push(redis_server, "early-user", "item-1")
            _wait_applied(redis_server, "early-user", 1, proc)
        assert proc.stop() == 0, proc.log[-3000:]
    finally:
        proc.kill()


def test_sighup_to_a_running_consumer_is_logged_and_it_keeps_consuming(redis_server: RedisServer) -> None:
    proc = ReRankerProcess("consume", _consume_args(redis_server, "steady"))
    try:
        _push(redis_server, "steady-user", "item-1")
        _wait_applied(redis_server, "steady-user", 1, proc)
        proc.signal(signal.SIGHUP)
        _push(redis_server, "steady-user", "item-2")
        _wait_applied(redis_server, "steady-user", 2, proc)
        assert proc.process.poll() is None
        # The SIGHUP line is written by a thread the handler starts, then crosses a pipe and a reader
        # thread: it may come after item-2 is applied. Wait for it (it must come), do not sample it.
        deadline = time.monotonic() + 30
        while not any("SIGHUP" in str(r.get("message", "")) for r in proc.records()):
            assert time.monotonic() < deadline, f"SIGHUP was not logged\n{proc.log[-3000:]}"
            time.sleep(0.05)
        assert proc.stop() == 0, proc.log[-3000:]
    finally:
        proc.kill()
    assert any("stopped" in str(r.get("message", "")) for r in proc.records())


def test_sigterm_during_startup_exits_clean(redis_server: RedisServer) -> None:
    """SIGTERM before serve has finished starting: a clean exit (0), never a death by the signal."""
    proc = ReRankerProcess("serve", ["--encoder=fake", "--fake-dim=16", "--address=127.0.0.1:0", "--grace-seconds=1"])
    try:
        assert not _wait_until_caught(proc, signal.SIGTERM)
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.log[-3000:]
    finally:
        proc.kill()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_soak_stops_its_server_child_too(signum: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    soak = subprocess.Popen(
        [sys.executable, "-m", "reranker", "soak", "--duration=60", "--clients=1", "--catalog=50", "--users=5",
         "--", "--encoder=fake", "--fake-dim=16"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    server = 0
    try:
        assert soak.stderr is not None
        for line in soak.stderr:  # "server pid N SERVING on ...": the child is up and the load starts
            if "SERVING on" in line:
                server = int(line.split("server pid ")[1].split()[0])
                break
        assert server and server in _children(soak.pid)
        soak.send_signal(signum)
        soak.wait(30)
        deadline = time.monotonic() + 30
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(server), "the soak's server outlived it"
        assert soak.returncode == 128 + signum
    finally:
        if soak.poll() is None:
            soak.kill()
            soak.wait(10)
        if server and _alive(server):
            os.kill(server, signal.SIGKILL)
        if soak.stderr is not None:
            soak.stderr.close()
