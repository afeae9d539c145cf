"""A real `python -m reranker serve` (or `consume`) child process for integration tests: its port
(read from its log), health, /metrics, its log lines, and signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Sequence


from conftest import REPO
from reranker.tools.harness import SERVING, free_port, health_status, wait_serving  # noqa: F401  (SERVING: the tests import it from here)



class ReRankerProcess:
    """`python -m reranker <command> <args>` with JSON logs on stderr, collected line by line."""

    def __init__(
        self, command: str, args: Sequence[str], *, env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.metrics_port = free_port()
        env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO), RERANKER_LOG_FORMAT="json")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reranker", command, *args, f"--metrics-address=127.0.0.1:{self.metrics_port}"],
            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self.port = 0
        self._port_seen = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = re.search(r"listening on \S+ \(port (\d+)[,)]", line)
            if match and not self.port:
                self.port = int(match.group(1))
                self._port_seen.set()
        self._port_seen.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def records(self) -> list[dict[str, object]]:
        """The JSON log records so far (a non-JSON line, e.g. a raw traceback, as {"raw": line})."""
        out: list[dict[str, object]] = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def wait_port(self, timeout: float = 60.0) -> int:
        self._port_seen.wait(timeout)
        assert self.port, f"never listened; exit={self.process.poll()}\n{self.log[-3000:]}"
        return self.port

    def health(self) -> int | None:
        return health_status(f"127.0.0.1:{self.wait_port()}", 5.0)

    def wait_serving(self, timeout: float = 60.0) -> None:
        try:
            wait_serving(f"127.0.0.1:{self.wait_port()}", timeout, self.process, lambda: self.log, poll_s=0.05)
        except RuntimeError as exc:
            raise AssertionError(str(exc)) from None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def metric(self, name: str, default: float | None = None) -> float:
        """One sample of /metrics by its full name with labels, e.g. 'x_total{kind="lists"}'."""
        for line in self.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        if default is not None:
            return default
        raise AssertionError(f"{name} not in /metrics")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout)
        self._close()
        return code

    def _close(self) -> None:
        self._reader.join(10)
        if self.process.stderr is not None and not self._reader.is_alive():
            self.process.stderr.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close()
