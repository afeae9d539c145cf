"""The learning loop of docs/learning-loop.md at small scale, through real processes: serve with the training log on,
replay an ml-100k slice with the Python client, train from the log, hot reload (SIGHUP) into an
experiment arm, replay more, and read the new arm's online metrics from /metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from reranker.evaluation import formats
from reranker.tools.harness import ServerProcess, free_port
from reranker.learning.traininglog import read_training_log

from conftest import REPO
from test_eval_cli import ml_slice  # noqa: F401 (the 60-user ml-100k slice, a module fixture)

USERS = 20


def _cli(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-m", "reranker", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _samples(port: int, name: str) -> dict[frozenset[tuple[str, str]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            out[frozenset(tuple(p.split("=", 1)) for p in labels.replace('"', "").split(","))] = float(value)  # type: ignore[misc]
    return out


def _until(condition: object, say: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, say()  # type: ignore[operator]
        time.sleep(0.05)


def test_serve_replay_train_reload_and_watch_the_arm(ml_slice: Path, tmp_path: Path) -> None:
    log_dir, heads, metrics_port = tmp_path / "log", tmp_path / "heads", free_port()
    heads.mkdir()
    served = [
        "--encoder", "fake", "--fake-dim", "64", "--metrics-address", f"127.0.0.1:{metrics_port}",
        "--training-log-dir", str(log_dir), "--training-log-flush-seconds", "0.1",
        "--online-metrics-window-seconds", "600", "--experiment-arms", f"b=50:{heads / 'b.npz'}",
        "--head-reload-seconds", "0",  # SIGHUP only: the test sends it
    ]
    replay = ["replay", "--items", str(ml_slice / "items.tsv"), "--events", str(ml_slice / "events.tsv"),
              "--max-users", str(USERS), "--num-candidates", "30"]
    with ServerProcess(served) as server:
        server.wait_serving()
        first = json.loads(_cli(*replay, "--target", server.target, "--start", "0.5", "--stop", "0.75"))
        assert first["failed_rpcs"] == 0 and first["lists"] > 100
        assert set(first["per_arm"]) <= {"b", "treatment"} and len(first["per_arm"]) == 2
        # Until the server says it has handed every list and event to the OS (counted after the flush),
        # not a sleep: a busy machine's writer thread may be late by more than any flush interval.
        records = "reranker_training_log_records_total"
        wanted = {("kind", "lists"): first["lists"], ("kind", "events"): first["bootstrap_events"] + first["events"]}
        _until(lambda: {k: _samples(metrics_port, records).get(frozenset({k})) for k in wanted} == wanted,
               lambda: f"{_samples(metrics_port, records)} != {wanted}")
        logged = read_training_log(log_dir)
        assert len(logged.lists) == first["lists"] and len(logged.events) == first["bootstrap_events"] + first["events"]

        report = _cli("train", "--items", str(ml_slice / "items.tsv"), "--training-log", str(log_dir),
                      "--encoder", "fake", "--fake-dim", "64", "--retriever", "popularity,itemknn",
                      "--num-candidates", "30", "--adapter-epochs", "1", "--output", str(heads / "b.tmp.npz"),
                      "--no-progress")
        version = report.strip().splitlines()[-1].split()[1]  # "head <version> written to ..."
        os.replace(heads / "b.tmp.npz", heads / "b.npz")  # atomic: the server never sees half a file
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not any(f"arm b now serves {version}" in line for line in server.lines):
            assert time.monotonic() < deadline, server.log[-3000:]
            time.sleep(0.05)

        second = json.loads(_cli(*replay, "--target", server.target, "--start", "0.75", "--stop", "1.0",
                                 "--no-bootstrap", "--no-upsert"))
        assert second["failed_rpcs"] == 0 and second["per_arm"]["b"]["lists"] > 30
        new_arm = frozenset({("arm", "b"), ("model_version", f"fake-hash-v1+{version}")})

        def online() -> tuple[float | None, float | None]:
            return (_samples(metrics_port, "reranker_online_lists_total").get(new_arm),
                    _samples(metrics_port, "reranker_online_lists_judged_total").get(new_arm))

        # The online metrics are fed by the training log's writer thread: until they have every list
        # and its next event (not a sleep).
        expected = second["per_arm"]["b"]["lists"]
        _until(lambda: online() == (expected, expected), lambda: f"{online()} != {(expected, expected)}")
        lists = _samples(metrics_port, "reranker_online_lists_total")
        judged = _samples(metrics_port, "reranker_online_lists_judged_total")
        # The new head's series exists and moved: every list the replay got from it is counted and judged
        # (the replay records the user's next event right after each list).
        assert lists[new_arm] == second["per_arm"]["b"]["lists"] and judged[new_arm] == lists[new_arm]
        hits = _samples(metrics_port, "reranker_online_hits_at_k")[new_arm | {("k", "10")}]
        assert hits == pytest.approx(second["per_arm"]["b"]["hits@10"], abs=1e-3)
        server.terminate()
        assert server.wait(30) == 0
    assert formats.read_served_lists(sorted(log_dir.glob("served-*.tsv"))[0])  # the plain reader reads it too
