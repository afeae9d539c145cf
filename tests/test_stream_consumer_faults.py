"""`reranker consume` under faults, as real processes against real redis-servers: the consumer's
invariant (docs/reliability.md, "Stream consumer"):

- an entry is acknowledged (XACK) only after its event is durably written to the profile store, or
  after the whole entry and the reason are copied to the dead-letter stream;
- a poisoned entry or profile affects only its own user, and never makes the process exit;
- entries are validated with exactly the gRPC edge's limits and policy (eventpolicy.checked_event).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from reranker.service import RerankService
from reranker.types import Event, EventType
from reranker.users.compact import decode
from conftest import REPO, fake_settings
from redis_server import RedisServer, free_port, stored_profile
from test_redis_profiles import redis_server, redis_url  # noqa: F401  (the fixtures: one redis-server per module)

KEY = "faults"
DEAD = KEY + ":dead"
DIM = 16
NOW = time.time()


class Consume:
    """`python -m reranker consume` as a child process, its output in a file."""

    def __init__(self, tmp_path: Path, *flags: str, metrics: bool = True) -> None:
        self.metrics_port = free_port() if metrics else 0
        self.log = tmp_path / f"consume-{time.monotonic_ns()}.log"
        args = [sys.executable, "-m", "reranker", "consume", "--encoder", "fake", "--fake-dim", str(DIM),
                "--stream-key", KEY, "--stream-group", "g", "--stream-consumer", "c1", "--stream-block-ms", "50",
                "--stream-backoff-max-ms", "100", "--stream-dead-letter-key", DEAD, *flags]
        args += ["--metrics-address", f"127.0.0.1:{self.metrics_port}" if metrics else ""]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out,
                                            stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if not self.alive():
                raise AssertionError(f"consume exited ({self.process.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def metric(self, line_start: str) -> float:
        """The value of the exposition line starting with `line_start` (0 when absent)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"consume did not stop on SIGTERM:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., Consume]]:
    processes: list[Consume] = []

    def start(*flags: str, metrics: bool = True) -> Consume:
        processes.append(Consume(tmp_path, *flags, metrics=metrics))
        return processes[-1]

    yield start
    for p in processes:
        if p.alive():
            p.kill()


def group(client: redis.Redis) -> dict[str, int]:
    """lag, pending and entries-read of group g (zeros before it exists)."""
    groups = client.xinfo_groups(KEY) if client.exists(KEY) else []
    for g in groups:
        if g["name"] in (b"g", "g"):
            return {"lag": int(g["lag"] or 0), "pending": int(g["pending"]), "read": int(g["entries-read"] or 0)}
    return {"lag": -1, "pending": -1, "read": 0}


def entry(user: str, item: str, **extra: str) -> dict[str, str]:
    return {"user_id": user, "item_id": item, "type": "CLICK", "timestamp": str(int(NOW) - 60),
            "text": f"text of {item}", **extra}


def dead_letters(client: redis.Redis) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in client.xrange(DEAD)] if client.type(DEAD) == b"stream" else []


def as_bytes(fields: dict[str, str | bytes]) -> dict[bytes, bytes]:
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}


def full_count(client: redis.Redis, user: str) -> int:
    """The user's event count in its profile in Redis (0: none)."""
    profile = stored_profile(client, user, DIM)
    return 0 if profile is None else profile.event_count  # type: ignore[attr-defined]


def test_nothing_acknowledged_is_lost_when_the_profile_redis_is_down_and_the_consumer_is_killed(
    redis_server: RedisServer, redis_url: str, started: Callable[..., Consume]
) -> None:
    """A refused entry in a batch must not let the valid events past the durability check: with the
    profile Redis down they sit in the store's in-process outage buffer, and a SIGKILL loses them."""
    stream = redis_server.client()
    profile_redis = RedisServer()  # its port is free: nothing answers there yet
    try:
        valid = [entry(f"u{i}", f"i{i}") for i in range(5)]
        refused = entry("u9", "i9", weight="1e30")
        for fields in valid[:3] + [refused] + valid[3:]:
            stream.xadd(KEY, fields)
        flags = ("--redis-url", profile_redis.url, "--stream-url", redis_url, "--redis-retry-seconds", "0.2")
        first = started(*flags)
        first.wait_for(lambda: len(dead_letters(stream)) == 1, "the refused entry to be dead-lettered")
        # Several back-off rounds (counted, not slept: a busy machine backs off fewer times a second).
        first.wait_for(lambda: first.metric("reranker_stream_backpressure_waits_total") >= 3, "several back-off rounds")
        pending_while_down = group(stream)["pending"]
        pending_gauge = first.metric("reranker_stream_pending")
        first.kill()  # SIGKILL: whatever sat in the process's outage buffer is gone

        profile_redis.start()
        second = started(*flags)
        second.wait_for(lambda: group(stream)["pending"] == 0 and group(stream)["lag"] == 0, "the stream to drain")
        profiles = profile_redis.client()
        counts = [full_count(profiles, f"u{i}") for i in range(5)]
        assert counts == [1] * 5, f"acknowledged events were lost: counts {counts}"
        assert pending_while_down == 5, "entries were acknowledged while their events were not durably written"
        assert pending_gauge == 5, "reranker_stream_pending did not move while the batch backed off"
        # The dead letter is the whole entry, with the reason and its source entry id.
        [letter] = dead_letters(stream)
        assert {k: v for k, v in letter.items() if k not in (b"error", b"source_id")} == as_bytes(refused)
        assert b"weight" in letter[b"error"] and letter[b"source_id"]
        assert full_count(profiles, "u9") == 0
        profiles.close()
        assert second.stop() == 0, second.output()[-2000:]
    finally:
        profile_redis.cleanup()
        stream.close()


def poison_a_compact_profile(url: str, user: str) -> bytes:
    """A compact profile in Redis whose history row id is not UTF-8 (a valid profile, one byte changed)."""
    service = RerankService(fake_settings(redis_url=url, profile_layout="compact", fake_dim=DIM))
    service.load()
    service.record_events([Event(user, "poison-item", EventType.CLICK, NOW - 100, "seed", "a poisoned item", None)])
    service.close()
    client = redis.Redis.from_url(url)
    key = f"reranker:{{{user}}}:u"
    blob = client.get(key)
    assert blob is not None and b"poison-item" in blob
    poisoned = blob.replace(b"poison-item", b"\xffoison-item")
    client.set(key, poisoned)
    client.close()
    return poisoned


def test_a_poisoned_profile_affects_only_its_user_and_the_consumer_keeps_running(
    redis_server: RedisServer, redis_url: str, started: Callable[..., Consume]
) -> None:
    client = redis_server.client()
    poisoned = poison_a_compact_profile(redis_url, "victim")
    bystanders = [f"b{i:02d}" for i in range(20)]
    for i, user in enumerate(bystanders):
        client.xadd(KEY, entry(user, f"i{i}"))
        if i in (5, 15):
            client.xadd(KEY, entry("victim", f"v{i}", event_id=f"victim-{i}"))
    consume = started("--redis-url", redis_url, "--profile-layout", "compact")
    consume.wait_for(lambda: group(client) == {"lag": 0, "pending": 0, "read": 22}, "all 22 entries acknowledged")
    for user in bystanders:
        blob = client.get(f"reranker:{{{user}}}:u")
        assert blob is not None and decode(blob, DIM).event_count == 1, f"bystander {user} was not applied"
    # The victim's entries are its own problem: dead-lettered with the reason (or, where the store
    # reads an unreadable profile as a new one, applied to a fresh profile). Never lost silently.
    letters = [f for f in dead_letters(client) if f[b"user_id"] == b"victim"]
    blob = client.get("reranker:{victim}:u")
    if letters:
        assert len(letters) == 2 and all(f[b"error"] and f[b"text"] for f in letters), letters
        assert blob == poisoned
    else:
        assert blob is not None and decode(blob, DIM).event_count == 2
    time.sleep(0.5)
    assert consume.alive(), consume.output()[-3000:]
    assert consume.stop() == 0, consume.output()[-2000:]
    client.close()


def test_a_wrong_type_dead_letter_key_loses_nothing_counts_once_and_the_consumer_keeps_serving(
    redis_server: RedisServer, redis_url: str, started: Callable[..., Consume]
) -> None:
    client = redis_server.client()
    client.set(DEAD, "x")  # not a stream: every XADD to it fails
    bad = [{"item_id": "no-user", "text": "orphan"}, entry("u1", "heavy", weight="1e30")]
    for i in range(10):
        client.xadd(KEY, entry(f"u{i % 5}", f"i{i}"))
        if i in (3, 7):
            client.xadd(KEY, bad[i // 4])
    consume = started("--redis-url", redis_url, "--stream-claim-idle-ms", "200")
    consume.wait_for(lambda: group(client) == {"lag": 0, "pending": 2, "read": 12},
                     "the 10 valid entries acknowledged, the 2 that could not be dead-lettered left pending")
    time.sleep(1.5)  # the two are retried (claimed again every 200 ms) meanwhile
    assert group(client)["pending"] == 2
    assert [full_count(client, f"u{u}") for u in range(5)] == [2] * 5
    assert consume.metric('reranker_stream_events_total{result="applied"}') == 10
    assert consume.metric("reranker_stream_dead_letter_failures_total") == 2  # once per entry, not per retry
    assert consume.metric('reranker_stream_events_total{result="dead_letter"}') == 0
    assert consume.metric("reranker_stream_pending") == 2 and consume.metric("reranker_stream_lag") == 0
    errors = [line for line in consume.output().splitlines() if "dead-letter stream" in line and "ERROR" in line]
    assert 1 <= len(errors) <= 2, errors  # clear, and rate-limited

    client.delete(DEAD)  # the operator repairs the key: the two are copied, then acknowledged
    consume.wait_for(lambda: group(client)["pending"] == 0, "the parked entries to be dead-lettered")
    letters = dead_letters(client)
    assert [{k: v for k, v in f.items() if k not in (b"error", b"source_id")} for f in letters] == [as_bytes(b) for b in bad]
    assert b"user_id" in letters[0][b"error"] and b"weight" in letters[1][b"error"]
    assert consume.metric('reranker_stream_events_total{result="dead_letter"}') == 2
    assert consume.metric("reranker_stream_dead_letter_failures_total") == 2
    assert consume.stop() == 0, consume.output()[-2000:]
    client.close()


def test_entries_beyond_the_edge_limits_are_dead_lettered_whole_and_never_reach_redis(
    redis_server: RedisServer, redis_url: str, started: Callable[..., Consume]
) -> None:
    client = redis_server.client()
    huge_id, huge_text = "x" * 100_000, "y" * 1_000_000
    bad: list[dict[str, str | bytes]] = [
        entry(huge_id, "i1"),
        entry("u1", huge_id),
        entry("u1", "i1", text=huge_text),
        entry("u1", "i1", event_id="e" * 257),
        entry("u1", "i1", weight="1e30"),
        entry("u1", "i1", timestamp=str(int(NOW * 1000))),  # milliseconds sent as seconds
        entry("u1", "i1", timestamp="0"),
        entry("u1", "i1", type="TELEPORT"),
        {**entry("u1", "i1"), "user_id": b"\xffu1"},  # not UTF-8
    ]
    reasons = ["user_id is 100000 characters", "item_id is 100000 characters", "text is 1000000 characters",
               "event_id is longer than 256", "weight 1e+30 is outside", "timestamp is", "timestamp must be after 1970",
               "type 'TELEPORT'", "user_id is not valid UTF-8"]
    for i, fields in enumerate(bad):
        client.xadd(KEY, entry(f"ok{i}", f"i{i}"))
        client.xadd(KEY, fields)  # type: ignore[arg-type]
    consume = started("--redis-url", redis_url, metrics=False)
    consume.wait_for(lambda: group(client) == {"lag": 0, "pending": 0, "read": 2 * len(bad)}, "the stream to drain")
    letters = dead_letters(client)
    assert len(letters) == len(bad)
    for fields, letter, reason in zip(bad, letters, reasons):
        assert {k: v for k, v in letter.items() if k not in (b"error", b"source_id")} == as_bytes(fields)
        assert reason in letter[b"error"].decode(), (reason, letter[b"error"])
    assert [full_count(client, f"ok{i}") for i in range(len(bad))] == [1] * len(bad)
    longest = max(len(k) for k in client.scan_iter(match="reranker:*"))
    assert longest < 300, f"a key of {longest} bytes: an unchecked id reached Redis"
    assert consume.stop() == 0, consume.output()[-2000:]
    client.close()
