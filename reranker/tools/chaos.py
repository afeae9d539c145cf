"""Chaos soak: `serve` + `consume` + redis-server + training log + catalog watcher + head reload,
together, for a fixed time, while faults are injected at random moments.

`reranker soak --chaos` (and tests/test_chaos.py, in a short form) starts, in a work directory:
- two redis-servers (profiles; the event stream), each with an append-only file fsync'ed on every
  write, so a killed and restarted Redis keeps what it acknowledged;
- `reranker serve` (fake encoder) with the profile Redis, a training log, a shared catalog, a head
  file and a snapshot path;
- `reranker consume` reading the stream into the profile Redis.

Load: a writer sends `RecordEvents` for its own users (each user gets at most `events_per_user`
events, each with its own id, so the user's profile lists every one of them), a producer appends
events for other users to the stream (and now and then an entry the policy refuses, which must be
dead-lettered whole), and a reader sends `Rerank` calls and polls health.

Faults, shuffled and spread over the run: the profile Redis killed (SIGKILL) and restarted; a
poisoned user key (a junk value, a wrong-type key); a bad catalog publish (truncated, a lying
manifest, a NaN row, garbage), followed by a good one; a garbage head + SIGHUP, followed by a good
head; the training-log disk full (RLIMIT_FSIZE of the running server); SIGTERM + restart of `serve`
or of `consume`; SIGHUP to `consume`.

At the end, with every fault cleared, the stream drained and both processes stopped by SIGTERM, a
fresh `serve` on the same Redis and snapshot is asked for every user's profile. The run passes when:
- every acknowledged event (an OK `RecordEvents`, or a stream entry that was XACKed and is not in
  the dead letters) is in the user's profile (its event id's hash in the profile's id memory, read
  from Redis; GetUserProfile finds the user with at least that many events);
- every refused stream entry is in the dead letters with all its fields and a reason;
- no process exited except after an injected signal (and then with status 0);
- no response carried a NaN or infinite score, and every one was a valid reordering;
- health told the truth: while it said SERVING, every Rerank got an answer (reranked or a
  fail-open fallback), never an error status.

Nothing here is imported by the server itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker.tools.loadtest import ServerProcess, check_reordering, item_text
from reranker.users.compact_redis import read_profile
from reranker.users.profiles import event_id_hash
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

FAULTS = (
    "redis_kill",
    "poison_key",
    "bad_catalog",
    "garbage_head",
    "training_log_disk_full",
    "sigterm_serve",
    "sigterm_consume",
    "sighup_consume",
)
DIM = 32
STREAM_KEY = "chaos:events"
DEAD_LETTERS = "chaos:dead"
PREFIX = "chaos"
SERVING = health_pb2.HealthCheckResponse.SERVING


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A redis-server on a fixed loopback port whose data survives SIGKILL (AOF, fsync always)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on {self.port} did not start") from None
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=2)


class ChildProcess:
    """A `python -m reranker <command>` child whose exits are watched: an exit not announced by
    `expect_exit` is an unexpected exit."""

    def __init__(self, name: str, start: Callable[[], subprocess.Popen[str] | ServerProcess]) -> None:
        self.name = name
        self._start = start
        self.handle: subprocess.Popen[str] | ServerProcess | None = None
        self.expected_exit = False
        self.starts = 0

    @property
    def proc(self) -> subprocess.Popen[str]:
        assert self.handle is not None
        return self.handle.proc if isinstance(self.handle, ServerProcess) else self.handle

    def start(self) -> None:
        old = self.handle
        self.handle = self._start()
        self.starts += 1
        self.expected_exit = False
        _release(old)

    def release(self) -> None:
        self.expected_exit = True
        _release(self.handle)

    def signal(self, signum: int, *, exits: bool) -> None:
        self.expected_exit = exits
        if self.proc.poll() is None:
            self.proc.send_signal(signum)


def _release(handle: subprocess.Popen[str] | ServerProcess | None) -> None:
    """Kill (if still running) and close the pipes and files of a child that is no longer used."""
    if isinstance(handle, ServerProcess):
        handle.__exit__(None, None, None)
    elif handle is not None:
        if handle.poll() is None:
            handle.kill()
        handle.wait(10)
        log_file = getattr(handle, "log_file", None)
        if log_file is not None:
            log_file.close()


@dataclass
class ChaosReport:
    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[tuple[float, str, str]] = field(default_factory=list)
    rpc_events_acked: int = 0
    stream_events_added: int = 0
    stream_refusals_added: int = 0
    acknowledged_lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    dead_letters_missing: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    nan_scores: int = 0
    invalid_responses: Counter[str] = field(default_factory=Counter)
    rerank_outcomes: Counter[str] = field(default_factory=Counter)
    record_outcomes: Counter[str] = field(default_factory=Counter)
    health_lies: int = 0
    health_lie_examples: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, object]:
        out = {name: dict(value) if isinstance(value, Counter) else value for name, value in vars(self).items()}
        out["fault_log"] = [f"{t:7.1f}s {name}: {what}" for t, name, what in self.fault_log]
        out["injected_faults"] = sum(self.faults.values())
        out["passed"] = self.passed
        return out


# --- the files the server watches -------------------------------------------------------------------
def _publish(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".publish")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_head(path: Path, seed: int) -> None:
    from reranker.model.encoder import FakeEncoder
    from reranker.ranking import head as ranking_head

    rng = np.random.default_rng(seed)
    features = len(ranking_head.FEATURES)
    head = ranking_head.RankingHead(
        weights=rng.normal(size=features), mean=np.zeros(features), std=np.ones(features),
        adapter_down=np.zeros((DIM, 4), dtype=np.float32), adapter_up=np.zeros((4, DIM), dtype=np.float32),
        prior=np.zeros(DIM, dtype=np.float32), popularity={"item-1": 1.0}, encoder_version=FakeEncoder(DIM).version,
    )
    tmp = path.with_name(path.stem + ".publish.npz")
    head.save(tmp)
    os.replace(tmp, path)


def _bad_catalogs(good: bytes, work_dir: Path) -> list[tuple[str, bytes]]:
    """Bad publishes derived from a good catalog file: damaged bytes, a manifest that lies, and a
    well-formed catalog (its checksum right) with one NaN row, as a broken encoder would write it."""
    from reranker.model import catalog
    from reranker.model.catalog import write_catalog

    bad = [("truncated", good[: len(good) // 2]), ("garbage", os.urandom(len(good)))]
    try:
        header_end = good.index(b"\0", 8)
        manifest = json.loads(good[8:header_end])
    except ValueError:
        return bad

    def with_manifest(**changes: object) -> bytes:
        text = json.dumps({**manifest, **changes}).encode()
        return good[:8] + text + b"\0" * (header_end - 8 - len(text)) + good[header_end:]

    bad += [
        ("manifest count larger", with_manifest(count=int(manifest["count"]) * 2)),
        ("manifest dtype changed", with_manifest(dtype="float32" if manifest.get("dtype") == "float16" else "float16")),
        ("manifest offset shifted", with_manifest(vectors_offset=int(manifest.get("vectors_offset", 4096)) + 2)),
    ]
    vectors = np.random.default_rng(0).normal(size=(8, int(manifest["dim"]))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[3] = np.nan
    path = work_dir / "nan-catalog.build"
    ids = [f"item-{i}" for i in range(8)]
    checked = catalog.unusable_rows
    catalog.unusable_rows = lambda rows: np.zeros(len(rows), dtype=bool)  # a broken tool: no check on write
    try:
        write_catalog(path, ids, [item_text(i) for i in range(8)], vectors, model_version=manifest["model_version"])
    finally:
        catalog.unusable_rows = checked
    bad.append(("a NaN row", path.read_bytes()))
    return bad


class _Channel:
    """A channel to wherever `serve` listens now (a restarted server gets a new port)."""

    def __init__(self, target: Callable[[], str | None]) -> None:
        self._target = target
        self._at: str | None = None
        self._channel: grpc.Channel | None = None
        self.stub: pb_grpc.RerankerServiceStub | None = None
        self.health: health_pb2_grpc.HealthStub | None = None

    def follow(self) -> bool:
        """Point at the current server; False while there is none."""
        target = self._target()
        if target is None:
            return False
        if target != self._at:
            self.close()
            self._at, self._channel = target, grpc.insecure_channel(target)
            self.stub, self.health = pb_grpc.RerankerServiceStub(self._channel), health_pb2_grpc.HealthStub(self._channel)
        return True

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


# --- the run ----------------------------------------------------------------------------------------
class ChaosSoak:
    def __init__(self, work_dir: Path, *, duration_s: float, faults: int, seed: int, catalog_items: int = 300,
                 events_per_user: int = 8, log: Callable[[str], None] = lambda _m: None) -> None:
        self.dir = work_dir
        self.duration_s = duration_s
        self.fault_count = faults
        self.rng = random.Random(seed)
        self.catalog_items = catalog_items
        self.events_per_user = events_per_user
        self.log = log
        self.report = ChaosReport()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.profiles_redis = RedisProcess(work_dir / "redis-profiles")
        self.stream_redis = RedisProcess(work_dir / "redis-stream")
        self.catalog_path = work_dir / "catalog.bin"
        self.head_path = work_dir / "head.npz"
        self.training_log_dir = work_dir / "training-log"
        self.snapshot_path = work_dir / "snapshot.bin"
        self.serve = ChildProcess("serve", self._start_serve)
        self.consume = ChildProcess("consume", self._start_consume)
        self.acked: dict[str, set[str]] = {}  # user -> event ids acknowledged (RPC OK)
        self.streamed: dict[str, set[str]] = {}  # user -> event ids appended to the stream
        self.refused_entries: dict[str, dict[str, str]] = {}  # event id -> fields of an entry the policy refuses
        self.victims: list[str] = []
        self.health: list[tuple[float, int | None]] = []
        self.serve_down_since: float | None = None  # set while serve is being restarted on purpose
        self.good_catalog = b""

    # --- processes ----------------------------------------------------------------------------------
    def _common(self) -> list[str]:
        return ["--encoder", "fake", "--fake-dim", str(DIM), "--redis-url", self.profiles_redis.url,
                "--redis-prefix", PREFIX, "--redis-retry-seconds", "0.5", "--log-level", "INFO"]

    def _start_serve(self) -> ServerProcess:
        server = ServerProcess([
            *self._common(), "--metrics-address=", "--grace-seconds", "2", "--drain-delay-seconds", "0",
            "--training-log-dir", str(self.training_log_dir), "--training-log-sample", "1.0",
            "--training-log-flush-seconds", "0.2", "--catalog-path", str(self.catalog_path),
            "--catalog-poll-seconds", "0.3", "--head-path", str(self.head_path), "--head-reload-seconds", "0.5",
            "--snapshot-path", str(self.snapshot_path),
        ])
        server.wait_serving(120)
        return server

    def _start_consume(self) -> subprocess.Popen[str]:
        log_file = open(self.dir / f"consume-{self.consume.starts}.log", "w")  # noqa: SIM115 (closed with the child)
        child = subprocess.Popen(
            [sys.executable, "-m", "reranker", "consume", *self._common(), "--metrics-address=", "--stream-url", self.stream_redis.url,
             "--stream-key", STREAM_KEY, "--stream-group", "chaos", "--stream-consumer", "chaos-1",
             "--stream-dead-letter-key", DEAD_LETTERS, "--stream-backoff-max-ms", "500", "--stream-block-ms", "200"],
            stdout=log_file, stderr=subprocess.STDOUT, text=True,
        )
        child.log_file = log_file  # type: ignore[attr-defined]
        return child

    def _target(self) -> str | None:
        handle = self.serve.handle
        return handle.target if isinstance(handle, ServerProcess) and handle.port else None

    def _watch_exits(self) -> None:
        while not self.stop.is_set():
            for child in (self.serve, self.consume):
                if child.handle is None or child.expected_exit:
                    continue
                code = child.proc.poll()
                if code is not None:
                    self._problem_exit(child, code)
                    try:
                        child.start()
                    except Exception as exc:  # noqa: BLE001 (reported, the run goes on)
                        self.report.unexpected_exits.append(f"{child.name} failed to restart: {exc}")
            time.sleep(0.2)

    def _problem_exit(self, child: ChildProcess, code: int) -> None:
        tail = ""
        if isinstance(child.handle, ServerProcess):
            tail = "\n".join(child.handle.lines[-15:])
        else:
            logs = sorted(self.dir.glob(f"{child.name}-*.log"))
            tail = "\n".join(logs[-1].read_text(errors="replace").splitlines()[-15:]) if logs else ""
        self.report.unexpected_exits.append(f"{child.name} exited with {code} at {self._t():.1f}s:\n{tail}")
        self.log(f"UNEXPECTED EXIT of {child.name} ({code})")

    def _t(self) -> float:
        return time.monotonic() - self.started

    # --- load -----------------------------------------------------------------------------------------
    def _event(self, user: str, event_id: str) -> pb.Event:
        item = self.rng.randrange(self.catalog_items)
        return pb.Event(user_id=user, item_id=f"item-{item}", type=pb.EVENT_TYPE_CLICK, event_id=event_id,
                        text=item_text(item))

    def _writer(self) -> None:
        rng = random.Random(1)
        user_n, sent, seq = 0, 0, 0
        channel = _Channel(self._target)
        while not self.stop.is_set():
            if not channel.follow():
                time.sleep(0.05)
                continue
            stub = channel.stub
            if sent >= self.events_per_user:
                user_n, sent = user_n + 1, 0
            user = f"rpc-user-{user_n}"
            batch = [self._event(user, f"rpc-{seq + i}") for i in range(rng.randint(1, 2))]
            seq += len(batch)
            sent += len(batch)
            with_victim = rng.random() < 0.1 and bool(self.victims)
            if with_victim:  # bystanders' events next to a poisoned user's, in one batch
                batch.append(self._event(rng.choice(self.victims), f"victim-{seq}"))
            try:
                assert stub is not None
                stub.RecordEvents(pb.RecordEventsRequest(events=batch), timeout=3.0)
                with self.lock:
                    for event in batch:
                        if event.user_id == user:
                            self.acked.setdefault(user, set()).add(event.event_id)
                self.report.record_outcomes["OK"] += 1
            except grpc.RpcError as exc:
                code = exc.code().name  # type: ignore[attr-defined]
                self.report.record_outcomes[("with a poisoned user: " if with_victim else "") + code] += 1
            time.sleep(0.01)
        channel.close()

    def _producer(self) -> None:
        rng = random.Random(2)
        client = self.stream_redis.client()
        user_n, sent, seq = 0, 0, 0
        while not self.stop.is_set():
            if sent >= self.events_per_user:
                user_n, sent = user_n + 1, 0
            user = f"stream-user-{user_n}"
            item = rng.randrange(self.catalog_items)
            fields = {"user_id": user, "item_id": f"item-{item}", "type": "CLICK", "event_id": f"st-{seq}",
                      "timestamp": f"{time.time():.3f}", "text": item_text(item)}
            refused = rng.random() < 0.03
            if refused:
                fields = {**fields, "user_id": f"refused-{seq}", "weight": "1e30"}
            try:
                client.xadd(STREAM_KEY, fields)  # type: ignore[arg-type]
            except redis.RedisError:
                time.sleep(0.1)
                continue
            with self.lock:
                if refused:
                    self.refused_entries[fields["event_id"]] = fields
                    self.report.stream_refusals_added += 1
                else:
                    self.streamed.setdefault(user, set()).add(fields["event_id"])
                    self.report.stream_events_added += 1
                    sent += 1
            seq += 1
            if rng.random() < 0.05 and self.victims:
                victim = rng.choice(self.victims)
                try:
                    client.xadd(STREAM_KEY, {**fields, "user_id": victim, "event_id": f"victim-st-{seq}"})  # type: ignore[arg-type]
                except redis.RedisError:
                    pass
            time.sleep(0.01)
        client.close()

    def _reader(self) -> None:
        rng = random.Random(3)
        channel = _Channel(self._target)
        while not self.stop.is_set():
            if not channel.follow():
                time.sleep(0.05)
                continue
            stub, health = channel.stub, channel.health
            assert stub is not None and health is not None
            try:
                said: int | None = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
            except grpc.RpcError:
                said = None
            request = self._rerank_request(rng)
            restarting = self.serve_down_since is not None
            try:
                response = stub.Rerank(request, timeout=2.0)
            except grpc.RpcError as exc:
                self._rerank_failed(exc, health_serving=said == SERVING and not restarting)
                continue
            self._judge_response(request, response)
            time.sleep(0.02)
        channel.close()

    def _rerank_request(self, rng: random.Random) -> pb.RerankRequest:
        """20 random catalog items, with texts, for a user with acknowledged events (mostly), a cold
        user or a poisoned one."""
        with self.lock:
            users = list(self.acked)
        user = rng.choice(users) if users and rng.random() < 0.9 else f"cold-{rng.randrange(10**6)}"
        if self.victims and rng.random() < 0.1:
            user = rng.choice(self.victims)
        items = rng.sample(range(self.catalog_items), 20)
        request = pb.RerankRequest(user_id=user, request_id=f"chaos-{rng.randrange(10**9)}")
        for rank, item in enumerate(items):
            c = request.candidates.add(item_id=f"item-{item}", score=float(20 - rank))
            c.text = item_text(item)
        return request

    def _rerank_failed(self, exc: grpc.RpcError, *, health_serving: bool) -> None:
        """Count a failed Rerank; one that fails (other than by deadline) while health said SERVING,
        outside a restart, is a health lie."""
        code = exc.code().name  # type: ignore[attr-defined]
        self.report.rerank_outcomes[code] += 1
        if health_serving and code != "DEADLINE_EXCEEDED":
            self.report.health_lies += 1
            if len(self.report.health_lie_examples) < 5:
                self.report.health_lie_examples.append(f"{self._t():.1f}s health SERVING, Rerank {code}: "
                                                       f"{exc.details()}")  # type: ignore[attr-defined]

    def _judge_response(self, request: pb.RerankRequest, response: pb.RerankResponse) -> None:
        """Count the answer's variant, and whether it is a valid reordering with finite scores."""
        self.report.rerank_outcomes[pb.Variant.Name(response.variant)] += 1
        problem = check_reordering(request, response)
        if problem is not None:
            self.report.invalid_responses[problem] += 1
        scores = [v for it in response.items for v in (it.score, it.semantic_score)]
        if any(not math.isfinite(v) for v in scores):
            self.report.nan_scores += 1

    # --- faults ---------------------------------------------------------------------------------------
    def _inject(self, name: str) -> str:
        if name == "redis_kill":
            self.profiles_redis.kill()
            down = self.rng.uniform(1.0, 4.0)
            time.sleep(down)
            self.profiles_redis.start()
            return f"profile Redis killed, restarted after {down:.1f}s"
        if name == "poison_key":
            victim = f"victim-{len(self.victims)}"
            client = self.profiles_redis.client()
            kind = self.rng.choice(["junk bytes", "wrong type"])
            base = f"{PREFIX}:{{{victim}}}:"
            try:
                if kind == "junk bytes":
                    client.hset(base + "p", mapping={"lt": b"\xff\xfe junk", "count": b"not a number", "ref": b"x"})
                    client.set(base + "u", b"\xff\x00garbage")
                else:
                    client.set(base + "p", b"x")
                    client.hset(base + "u", "x", "y")
                    client.set(base + "h", b"x")
            finally:
                client.close()
            self.victims.append(victim)
            return f"{kind} at {victim}'s keys"
        if name == "bad_catalog":
            kind, data = self.rng.choice(_bad_catalogs(self.good_catalog, self.dir))
            _publish(self.catalog_path, data)
            time.sleep(self.rng.uniform(1.0, 3.0))
            self._rebuild_catalog()
            return f"bad catalog ({kind}), then a good one"
        if name == "garbage_head":
            _publish(self.head_path, os.urandom(self.rng.randint(0, 4000)))
            self.serve.signal(signal.SIGHUP, exits=False)
            time.sleep(self.rng.uniform(1.0, 3.0))
            _write_head(self.head_path, self.rng.randrange(1000))
            self.serve.signal(signal.SIGHUP, exits=False)
            return "garbage head + SIGHUP, then a good head + SIGHUP"
        if name == "training_log_disk_full":
            pid = self.serve.proc.pid
            limit = 512
            # Only the soft limit: lowering a hard limit of another process cannot be undone here.
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            time.sleep(self.rng.uniform(2.0, 5.0))
            try:
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            except ProcessLookupError:
                pass
            return "serve's RLIMIT_FSIZE at 512 bytes for a few seconds"
        if name == "sigterm_serve":
            self.serve_down_since = time.monotonic()
            self.serve.signal(signal.SIGTERM, exits=True)
            code = self.serve.proc.wait(30)
            if code != 0:
                self.report.unexpected_exits.append(f"serve exited with {code} after SIGTERM at {self._t():.1f}s")
            self.serve.start()
            self.serve_down_since = None
            return f"serve SIGTERM (exit {code}), restarted"
        if name == "sigterm_consume":
            self.consume.signal(signal.SIGTERM, exits=True)
            code = self.consume.proc.wait(30)
            if code != 0:
                self.report.unexpected_exits.append(f"consume exited with {code} after SIGTERM at {self._t():.1f}s")
            self.consume.start()
            return f"consume SIGTERM (exit {code}), restarted"
        if name == "sighup_consume":
            self.consume.signal(signal.SIGHUP, exits=False)
            return "consume SIGHUP"
        raise ValueError(name)

    def _rebuild_catalog(self) -> None:
        _publish(self.catalog_path, self.good_catalog)

    def _make_catalog(self) -> bytes:
        items = self.dir / "items.tsv"
        items.write_text("item_id\ttext\n" + "".join(f"item-{i}\t{item_text(i)}\n" for i in range(self.catalog_items)))
        out = self.dir / "catalog.build"
        subprocess.run([sys.executable, "-m", "reranker", "embed-catalog", "--items", str(items), "--out", str(out),
                        "--encoder", "fake", "--fake-dim", str(DIM)], check=True, capture_output=True, timeout=300)
        return out.read_bytes()

    # --- the end ----------------------------------------------------------------------------------------
    def _drain_stream(self, timeout_s: float = 120.0) -> None:
        client = self.stream_redis.client()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                groups = client.xinfo_groups(STREAM_KEY)
                group = next((g for g in groups if g["name"] in (b"chaos", "chaos")), None)
                if group is not None and int(group["pending"]) == 0 and int(group.get("lag") or 0) == 0:
                    return
                time.sleep(0.5)
            self.report.problems.append(f"the stream did not drain in {timeout_s:.0f}s: {groups}")
        finally:
            client.close()

    def _verify(self) -> None:
        checker = ServerProcess([*self._common(), "--metrics-address=", "--snapshot-path", str(self.snapshot_path),
                                 "--catalog-path", str(self.catalog_path), "--recent-events-per-user", "50"])
        with checker:
            checker.wait_serving(120)
            with grpc.insecure_channel(checker.target) as channel:
                lost = self._lost_events(pb_grpc.RerankerServiceStub(channel))
                self.report.acknowledged_lost = len(lost)
                self.report.lost_examples = lost[:10]
            checker.terminate()
            checker.wait(30)
        self.report.dead_letters_missing += self._refusals_not_dead_lettered()

    def _lost_events(self, stub: pb_grpc.RerankerServiceStub) -> list[str]:
        """Acknowledged events (RPC and stream) missing from their user's profile, once the events kept
        at the last shutdown have had 20 s to replay in the background."""
        expected = [(user, ids, "rpc") for user, ids in self.acked.items()]
        expected += [(user, ids, "stream") for user, ids in self.streamed.items()]
        deadline = time.monotonic() + 20  # events kept at the last shutdown replay in the background
        while True:
            lost = []
            for user, ids, source in expected:
                lost += [f"{source} {user} {missing}" for missing in self._missing(stub, user, ids)]
            if not lost or time.monotonic() > deadline:
                return lost
            time.sleep(1.0)

    def _refusals_not_dead_lettered(self) -> int:
        """Refused stream entries missing from the dead letters, changed there, or without an error."""
        client = self.stream_redis.client()
        try:
            dead = client.xrange(DEAD_LETTERS)
        finally:
            client.close()
        dead_fields = {}
        for _entry_id, fields in dead:
            decoded = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
            dead_fields[decoded.get("event_id", "")] = decoded
        missing = 0
        for event_id, fields in self.refused_entries.items():
            got = dead_fields.get(event_id)
            if got is None or any(got.get(k) != v for k, v in fields.items()) or not got.get("error"):
                missing += 1
        return missing

    def _missing(self, stub: pb_grpc.RerankerServiceStub, user: str, ids: set[str]) -> list[str]:
        """The acknowledged event ids of `user` its profile does not hold. A profile keeps no event ids
        in its events (GetUserProfile's recent events are its history rows), only their hashes, for
        idempotency: they are read from the user's profile in Redis, and GetUserProfile must find the
        user with at least that many events."""
        profile = stub.GetUserProfile(pb.GetUserProfileRequest(user_id=user), timeout=10)
        client = self.profiles_redis.client()
        try:
            stored = read_profile(client, user, DIM, PREFIX)
        finally:
            client.close()
        held = set() if stored is None else set(stored.ids.tolist())
        missing = sorted(event_id for event_id in ids if event_id_hash(event_id) not in held)
        if not missing and (not profile.found or profile.event_count < len(ids)):
            missing = [f"(GetUserProfile: found={profile.found}, {profile.event_count} events, {len(ids)} acknowledged)"]
        return missing

    def run(self) -> ChaosReport:
        self.training_log_dir.mkdir(parents=True, exist_ok=True)
        self.profiles_redis.start()
        self.stream_redis.start()
        self.good_catalog = self._make_catalog()
        self._rebuild_catalog()
        _write_head(self.head_path, 0)
        self.serve.start()
        self.consume.start()
        self.log(f"serve on {self._target()}, work dir {self.dir}")
        threads = [threading.Thread(target=f, daemon=True, name=f.__name__)
                   for f in (self._writer, self._producer, self._reader, self._watch_exits)]
        for thread in threads:
            thread.start()
        schedule = [FAULTS[i % len(FAULTS)] for i in range(self.fault_count)]
        self.rng.shuffle(schedule)
        gap = self.duration_s / (len(schedule) + 1)
        for name in schedule:
            time.sleep(max(0.0, self.rng.uniform(0.5 * gap, 1.5 * gap)))
            try:
                what = self._inject(name)
            except Exception as exc:  # noqa: BLE001 (a harness failure is a problem of the run)
                what = f"could not inject: {exc!r}"
                self.report.problems.append(f"{name}: {what}")
            self.report.faults[name] += 1
            self.report.fault_log.append((self._t(), name, what))
            self.log(f"{self._t():7.1f}s {name}: {what}")
        while self._t() < self.duration_s:
            time.sleep(0.2)
        # Everything cleared: the last writes land, the stream drains, both processes stop by SIGTERM.
        if self.profiles_redis.proc is None or self.profiles_redis.proc.poll() is not None:
            self.profiles_redis.start()
        self.stop.set()
        for thread in threads:
            thread.join(30)
        self._drain_stream()
        for child in (self.serve, self.consume):
            child.signal(signal.SIGTERM, exits=True)
            code = child.proc.wait(60)
            if code != 0:
                self.report.unexpected_exits.append(f"{child.name} exited with {code} after the final SIGTERM")
        if isinstance(self.serve.handle, ServerProcess):
            (self.dir / "serve-last.log").write_text(self.serve.handle.log)
        self._verify()
        self.report.seconds = round(self._t(), 1)
        self.report.rpc_events_acked = sum(len(v) for v in self.acked.values())
        self._judge()
        return self.report

    def _judge(self) -> None:
        r = self.report
        if r.acknowledged_lost:
            r.problems.append(f"{r.acknowledged_lost} acknowledged events lost, e.g. {r.lost_examples[:3]}")
        if r.dead_letters_missing:
            r.problems.append(f"{r.dead_letters_missing} refused stream entries not dead-lettered whole")
        if r.unexpected_exits:
            r.problems.append(f"{len(r.unexpected_exits)} unexpected exits")
        if r.nan_scores:
            r.problems.append(f"{r.nan_scores} responses with a non-finite score")
        if r.invalid_responses:
            r.problems.append(f"invalid responses: {dict(r.invalid_responses)}")
        internal = {k: v for k, v in (r.record_outcomes | r.rerank_outcomes).items() if k.endswith("INTERNAL")}
        if internal:
            r.problems.append(f"INTERNAL errors: {internal}")
        if r.health_lies:
            r.problems.append(f"{r.health_lies} Rerank errors while health said SERVING")

    def close(self) -> None:
        self.stop.set()
        for child in (self.serve, self.consume):
            child.release()
        self.profiles_redis.stop()
        self.stream_redis.stop()


def add_chaos_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chaos", action="store_true",
                        help="chaos soak: serve + consume + Redis + training log + catalog + head under injected faults")
    parser.add_argument("--faults", type=int, default=24, help="with --chaos: faults to inject (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="with --chaos: seed of the fault schedule")
    parser.add_argument("--work-dir", default="", help="with --chaos: keep the run's files here (default: a temp dir)")


def run_chaos_command(args: argparse.Namespace) -> int:
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="reranker-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    soak = ChaosSoak(work, duration_s=args.duration, faults=args.faults, seed=args.seed,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        report = soak.run()
    finally:
        soak.close()
    text = json.dumps(report.summary(), indent=2, default=str)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    print("PASS" if report.passed else "FAIL: " + "; ".join(report.problems), file=sys.stderr)
    return 0 if report.passed else 1


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover (python -m reranker.tools.chaos)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--report", default="")
    add_chaos_arguments(parser)
    return run_chaos_command(parser.parse_args(argv))
