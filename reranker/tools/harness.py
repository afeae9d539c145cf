"""What benchmarks, tools and tests need around a real server: a free loopback port, a `reranker
serve` child process waited on until SERVING, a process's memory read from /proc, and a throw-away
redis-server. Nothing here is imported by the server itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
# The checkout this package runs from (children get it on PYTHONPATH), and the data folder beside it.
REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health_status(address: str, timeout: float = 2.0, service: str = "") -> int | None:
    """The server's health status (health_pb2 enum) for `service`, or None if it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError:
            return None


def wait_serving(
    address: str, timeout_s: float, child: subprocess.Popen | None = None, log: object = None, service: str = "",
    poll_s: float = 0.1,
) -> None:
    """Until the health service at `address` says SERVING; raises RuntimeError after `timeout_s`, or
    at once when `child` exits first (with the tail of `log`: a path, or a callable returning text)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            raise RuntimeError(f"server exited with status {child.returncode} before SERVING:\n{_tail(log)}")
        if health_status(address, 2.0, service) == SERVING:
            return
        time.sleep(poll_s)
    raise RuntimeError(f"server at {address} did not become SERVING within {timeout_s:.0f} s\n{_tail(log)}")


def _tail(log: object) -> str:
    if callable(log):
        return str(log())[-3000:]
    if isinstance(log, (str, Path)) and Path(log).is_file():
        return Path(log).read_text(errors="replace")[-3000:]
    return ""


def child_env(**overrides: str) -> dict[str, str]:
    """This environment with the repository root first on PYTHONPATH (a child runs this checkout)."""
    env = dict(os.environ)
    root = str(REPO)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(overrides)
    return env


# --- memory ------------------------------------------------------------------------------------------
def proc_memory(pid: int | str = "self", smaps: bool = False) -> dict[str, int]:
    """Memory of a process in bytes from /proc/<pid>/status (VmRSS, VmHWM, RssAnon, RssFile, ...) and,
    with `smaps`, /proc/<pid>/smaps_rollup (Pss, Shared_Clean, ...). Empty where /proc is unavailable."""
    out: dict[str, int] = {}
    files = ["status", "smaps_rollup"] if smaps else ["status"]
    for name in files:
        try:
            lines = Path(f"/proc/{pid}/{name}").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                out[key.strip()] = int(parts[0]) * 1024
    return out


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process (Linux /proc); None where unavailable."""
    return proc_memory(pid).get("VmRSS")


# --- a reranker serve child ----------------------------------------------------------------------------
class ServerProcess:
    """`python -m reranker serve ...` as a child process on 127.0.0.1:<free port>.

    Collects the child's log output (stderr) in the background; `port` is parsed from the
    "listening on" line. Use as a context manager: the child is killed on exit if still running.
    """

    def __init__(self, args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        argv = [sys.executable, "-m", "reranker", "serve", "--address", "127.0.0.1:0", *args]
        child_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self._port_known = threading.Event()
        self._reader = threading.Thread(target=self._read, name="server-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if self.port is None and "listening on" in line and "(port " in line:
                self.port = int(line.split("(port ", 1)[1].split(",")[0].split(")")[0])
                self._port_known.set()
        self._port_known.set()  # child exited

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_port(self, timeout: float = 60.0) -> int:
        if not self._port_known.wait(timeout) or self.port is None:
            raise RuntimeError(f"server did not start listening; exit={self.proc.poll()}\n{self.log}")
        return self.port

    def health(self, timeout: float = 2.0) -> int | None:
        """Overall health status (health_pb2 enum), or None if the server does not answer."""
        with grpc.insecure_channel(self.target) as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
            except grpc.RpcError:
                return None

    def wait_serving(self, timeout: float = 120.0) -> None:
        self.wait_port(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}\n{self.log}")
            if self.health() == SERVING:
                return
            time.sleep(0.1)
        raise RuntimeError(f"server not SERVING after {timeout} s\n{self.log}")

    def rss(self) -> int | None:
        return rss_bytes(self.proc.pid)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()



# --- a throw-away redis-server ------------------------------------------------------------------------
class RedisUnavailable(RuntimeError):
    """redis-server is not installed (scripts/ensure-redis.sh installs it)."""


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailable("redis-server is not installed (run scripts/ensure-redis.sh, or `make test`)")
    return binary


class RedisServer:
    """A redis-server on a free loopback port, its files in a temp dir, persisting nothing.
    `start()` returns it once it answers PING; `cleanup()` stops it and deletes the dir."""

    def __init__(self, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="reranker-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import redis

        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--logfile", str(self.dir / "redis.log"), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 30  # a loaded 2-core machine
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = (self.dir / "redis.log").read_text() if (self.dir / "redis.log").exists() else ""
                        raise RuntimeError(f"redis-server did not start on port {self.port}: {log[-500:]}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def client(self):  # -> redis.Redis
        import redis

        return redis.Redis(port=self.port, decode_responses=False)

    def kill(self) -> None:
        """SIGKILL: a crashed node (no shutdown, no last write of anything)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()


# --- a real embedding server -----------------------------------------------------------------------------
class InfinityServer:
    """`infinity_emb v2` serving a local model directory on a free loopback port, as /v1/embeddings."""

    def __init__(self, model_dir: Path, model: str, binary: str, threads: int = 1) -> None:
        self.binary = binary
        self.threads = threads  # torch threads of the server; 0 = its default (every core)
        self.model_dir, self.model = model_dir, model
        self.port = free_port()
        self.log_path = Path(tempfile.mkdtemp(prefix="reranker-infinity-")) / "infinity.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> InfinityServer:
        env = dict(os.environ, HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        env.pop("PYTHONPATH", None)  # its own venv, not ours
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [self.binary, "v2", "--model-id", str(self.model_dir), "--served-model-name", self.model,
                 "--host", "127.0.0.1", "--port", str(self.port), "--url-prefix", "/v1", "--device", "cpu",
                 "--engine", "torch", "--batch-size", "32", "--no-model-warmup"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"infinity_emb exited with {self.process.returncode}: {self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"infinity_emb did not listen within {timeout:.0f} s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
