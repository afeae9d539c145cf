"""The training log is a side path: a full disk or an unusable directory is counted and logged
once per interval, never fails a request, health or the shutdown (real `serve` processes, a real
RLIMIT_FSIZE, real signals, a real redis-server)."""

from __future__ import annotations

import dataclasses
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from reranker.config import Settings
from reranker.learning.traininglog import TrainingLog, read_training_log
from reranker.types import Event, EventType
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

from conftest import REPO, candidate, event, fake_settings
from redis_server import RedisServer
from serve_process import SERVING, ReRankerProcess

FILE_LIMIT = 16 * 1024  # bytes: any file the server writes stops growing here (EFBIG), like a full disk
LISTS = "reranker_training_log_records_total{kind=\"lists\"}"
LISTS_DROPPED = "reranker_training_log_dropped_total{kind=\"lists\"}"
ERRORS = "reranker_training_log_write_errors_total"


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def _errors(proc: ReRankerProcess, needle: str) -> list[dict[str, object]]:
    return [r for r in proc.records() if r.get("level") == "ERROR" and needle in str(r.get("message", ""))]


def _logged_errors(proc: ReRankerProcess, needle: str, timeout: float = 30.0) -> list[dict[str, object]]:
    """The ERROR records about `needle`, once there is one: the line is written after the counts it
    explains and crosses a pipe and a reader thread, so it may trail the metrics a test waited on."""
    deadline = time.monotonic() + timeout
    while not _errors(proc, needle):
        assert time.monotonic() < deadline, f"no ERROR about {needle!r} logged\n{proc.log[-3000:]}"
        time.sleep(0.05)
    return _errors(proc, needle)


def _rerank_many(stub: pb_grpc.RerankerServiceStub, n: int, user: str = "u1") -> None:
    cands = [candidate(f"item-{i:02d}", 20.0 - i, f"text number {i}") for i in range(20)]
    for i in range(n):
        response = stub.Rerank(pb.RerankRequest(user_id=user, candidates=cands, request_id=f"list-{i:04d}"), timeout=10)
        assert response.variant != pb.VARIANT_FALLBACK, response.fallback_reason


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


def test_full_disk_then_sigterm_still_snapshots_replays_redis_and_exits_clean(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """EFBIG on the training log, Redis down then back, SIGTERM: the close, the snapshot and the
    replay flush each run; the exit status is 0; the metrics count only what reached disk."""
    log_dir, snapshot = tmp_path / "log", tmp_path / "snapshot.bin"
    proc = ReRankerProcess("serve", [
        "--encoder=fake", "--fake-dim=16", "--address=127.0.0.1:0", "--grace-seconds=1",
        f"--redis-url={redis_server.url}", "--redis-timeout-ms=300", f"--training-log-dir={log_dir}",
        "--training-log-flush-seconds=0.05", f"--snapshot-path={snapshot}", "--snapshot-interval-seconds=0",
    ], preexec_fn=_limit_file_size)
    try:
        proc.wait_serving()
        with grpc.insecure_channel(f"127.0.0.1:{proc.port}") as channel:
            stub = pb_grpc.RerankerServiceStub(channel)
            _rerank_many(stub, 120)  # ~2 KB per list: far past FILE_LIMIT
            deadline = time.monotonic() + 20
            while proc.metric(LISTS) + proc.metric(LISTS_DROPPED) < 120:  # the writer has seen every list
                assert time.monotonic() < deadline, proc.log[-3000:]
                time.sleep(0.05)
            time.sleep(0.3)  # a few flush intervals more
            written, dropped = proc.metric(LISTS), proc.metric(LISTS_DROPPED)
            on_disk = len(read_training_log(log_dir).lists)
            assert 0 < on_disk < 120 and dropped > 0
            assert written == on_disk, f"records_total says {written} lists, {on_disk} are on disk"
            assert proc.metric(ERRORS) >= 1
            assert proc.health() == SERVING
            assert len(_logged_errors(proc, "training log")) == 1  # once per interval, not once per record
            redis_server.stop()  # events during the outage go to the replay buffer (RPC OK)
            ok = stub.RecordEvents(pb.RecordEventsRequest(events=[
                event("u-replay", "item-01", event_id="e1"), event("u-replay", "item-02", event_id="e2")]), timeout=10)
            assert ok.accepted == 2
        redis_server.start()  # back, empty: only the replay flush at shutdown brings the two events
        assert proc.stop() == 0, proc.log[-3000:]
    finally:
        proc.kill()
    assert snapshot.exists() and snapshot.stat().st_size > 0, proc.log[-3000:]
    keys = redis_server.client().keys("*u-replay*")
    assert keys, f"the replay buffer was not flushed into Redis at shutdown\n{proc.log[-3000:]}"
    assert len(read_training_log(log_dir).lists) == on_disk  # nothing new appeared, nothing was half-read
    assert not [r for r in proc.records() if "raw" in r and "Traceback" in str(r["raw"])]


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process may not create files in (root ignores mode bits: use sysfs then)."""
    if os.geteuid() != 0:
        directory = tmp_path / "ro"
        directory.mkdir()
        directory.chmod(0o555)
        return directory
    directory = Path("/sys/kernel")
    try:
        (directory / "reranker-probe.tsv").open("xb").close()
    except OSError:
        return directory
    pytest.skip("no unwritable directory available")


@pytest.mark.parametrize("kind", ["not writable", "a file"])
def test_an_unusable_training_log_dir_serves_and_logs_one_clear_error(tmp_path: Path, kind: str) -> None:
    if kind == "a file":
        directory = tmp_path / "log"
        directory.write_text("not a directory")
    else:
        directory = _unwritable_dir(tmp_path)
    proc = ReRankerProcess("serve", [
        "--encoder=fake", "--fake-dim=16", "--address=127.0.0.1:0", "--grace-seconds=1",
        f"--training-log-dir={directory}", "--training-log-flush-seconds=0.05",
    ])
    try:
        proc.wait_serving(30)  # a side path: the model loads and the server serves
        with grpc.insecure_channel(f"127.0.0.1:{proc.port}") as channel:
            stub = pb_grpc.RerankerServiceStub(channel)
            _rerank_many(stub, 200)
            for i in range(50):
                stub.RecordEvents(pb.RecordEventsRequest(events=[event("u1", f"item-{i % 20:02d}")]), timeout=10)
            deadline = time.monotonic() + 20
            while proc.metric(LISTS_DROPPED) < 200:  # every list is counted as dropped
                assert time.monotonic() < deadline, proc.log[-3000:]
                time.sleep(0.05)
            assert proc.health() == SERVING
            errors = _logged_errors(proc, "training log")
            assert len(errors) == 1, proc.log[-3000:]  # one line per interval, naming the flag and the path
            assert "--training-log-dir" in str(errors[0]["message"]) and str(directory) in str(errors[0]["message"])
            assert len(proc.log) < 20_000  # no traceback per record
            assert proc.metric(LISTS) == 0
            assert proc.metric(ERRORS) >= 1
        assert proc.stop() == 0
    finally:
        proc.kill()


# --- in process: the writer recovers once the directory works again ----------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _events_written(log: TrainingLog, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while log.written["events"] + log.dropped["events"] < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_failing_directory_is_retried_after_the_retry_interval(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    directory.write_text("in the way")
    clock = Clock()
    settings = dataclasses.replace(fake_settings(), training_log_flush_seconds=0.01, training_log_retry_seconds=30.0)
    log = TrainingLog(settings.learning, directory=str(directory), clock=clock)
    try:
        log.events([Event("u", "a", EventType.CLICK, 1.0)])
        _events_written(log, 1)
        assert log.dropped["events"] == 1 and log.write_errors >= 1
        directory.unlink()  # fixed, but the writer waits out its retry interval
        log.events([Event("u", "b", EventType.CLICK, 2.0)])
        _events_written(log, 2)
        assert log.dropped["events"] == 2
        clock.now += 31
        log.events([Event("u", "c", EventType.CLICK, 3.0)])
        _events_written(log, 3)
    finally:
        log.close()
    assert log.written["events"] == 1
    assert [e.item_id for e in read_training_log(directory).events] == ["c"]


CLOSE_ON_A_FULL_DISK = """
import dataclasses, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from conftest import fake_settings
from reranker.learning.traininglog import TrainingLog, read_training_log
from reranker.types import Event, EventType
settings = dataclasses.replace(fake_settings(), training_log_flush_seconds=3600.0)
log = TrainingLog(settings.learning, directory=sys.argv[1])
log.events([Event("u", f"item-{i}", EventType.CLICK, float(i)) for i in range(1000)])
log.close()  # the only flush: it meets the full disk
print(log.written["events"], log.dropped["events"], len(read_training_log(sys.argv[1]).events))
"""


def test_close_never_raises_on_a_full_disk_and_counts_the_rows_that_reached_it(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    done = subprocess.run([sys.executable, "-c", CLOSE_ON_A_FULL_DISK, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    written, dropped, on_disk = (int(x) for x in done.stdout.split())
    assert 0 < on_disk < 1000 and written == on_disk and dropped == 1000 - on_disk


def test_a_failing_sink_is_logged_once_per_interval_and_the_records_are_still_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_record: object) -> None:
        raise RuntimeError("join failed")

    settings = dataclasses.replace(fake_settings(), training_log_flush_seconds=0.01)
    with caplog.at_level("ERROR", logger="reranker.learning.traininglog"):
        log = TrainingLog(settings.learning, directory=str(tmp_path), sinks=[broken])
        for i in range(100):
            log.events([Event("u", f"item-{i}", EventType.CLICK, float(i + 1))])
        log.close()
    assert log.written["events"] == 100 and len(read_training_log(tmp_path).events) == 100
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "sink" in errors[0].getMessage() and errors[0].exc_info is not None
