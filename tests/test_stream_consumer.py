"""`reranker consume` against a real redis-server: a Redis Streams consumer group into the profile
store, at least once with exactly-once counting, acknowledgement after the write, lag as a metric,
back-pressure while the encoder is overloaded, dead letters for unusable entries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import pytest
import redis

from reranker.errors import InvalidRequest, Overloaded
from reranker.serving import convert
from reranker.metrics import Metrics
from reranker.service import RerankService
from reranker.users.eventpolicy import EventLimits
from reranker.streamconsumer import StreamConsumer, event_from_entry
from reranker.types import Event, RecordResult
from reranker.v1 import reranker_pb2 as pb
from conftest import REPO, fake_settings
from redis_server import RedisServer, stored_profile
from test_redis_profiles import redis_server, redis_url  # noqa: F401  (the fixtures: one redis-server per module)

KEY = "events"


def settings(url: str, **overrides: object):  # type: ignore[no-untyped-def]
    base = dict(redis_url=url, stream_key=KEY, stream_group="g", stream_consumer="c1", stream_batch_size=50,
                stream_block_ms=50, stream_claim_idle_ms=0, stream_dead_letter_key=KEY + ":dead")
    return fake_settings(**{**base, **overrides})


def loaded_service(url: str) -> RerankService:
    service = RerankService(settings(url))
    service.load()
    return service


def push(server: RedisServer, n: int, start: int = 0, users: int = 5, **extra: str) -> None:
    client = server.client()
    pipe = client.pipeline()
    for i in range(start, start + n):
        pipe.xadd(KEY, {"user_id": f"u{i % users}", "item_id": f"item-{i % 17}", "type": "CLICK",
                        "timestamp": str(1_700_000_000 + i), "text": f"text of item {i % 17}", **extra})
    pipe.execute()
    client.close()


def drain(consumer: StreamConsumer, limit: int = 100) -> None:
    for _ in range(limit):
        if consumer.poll_once() == 0:
            return
    raise AssertionError("the consumer did not drain the stream")


def counts(service: RerankService, users: int = 5) -> list[int]:
    out = []
    for u in range(users):
        state = service.profiles.get(f"u{u}", recent=False)  # type: ignore[union-attr]
        out.append(0 if state is None else state.event_count)
    return out


def test_events_from_the_stream_reach_the_shared_profiles_and_are_acknowledged(
    redis_server: RedisServer, redis_url: str
) -> None:
    service = loaded_service(redis_url)
    consumer = StreamConsumer.from_settings(settings(redis_url), service.record_events, service.metrics)
    consumer.ensure_group()
    push(redis_server, 120)
    drain(consumer)
    assert counts(service) == [24] * 5
    assert consumer.lag() == (0, 0)  # all delivered and acknowledged
    consumer._last_lag_read = 0.0
    consumer.poll_once()
    text = service.metrics.exposition().decode()
    assert 'reranker_stream_events_total{result="applied"} 120.0' in text
    assert "reranker_stream_lag 0.0" in text and "reranker_stream_pending 0.0" in text
    # A second service (another replica) sees what the consumer wrote.
    other = loaded_service(redis_url)
    assert counts(other) == [24] * 5
    for s in (service, other):
        s.close()
    consumer.close()


def test_lag_counts_entries_not_yet_delivered(redis_server: RedisServer, redis_url: str) -> None:
    service = loaded_service(redis_url)
    consumer = StreamConsumer.from_settings(settings(redis_url, stream_batch_size=30), service.record_events, service.metrics)
    consumer.ensure_group()
    push(redis_server, 100)
    consumer.poll_once()
    assert consumer.lag() == (70, 0)
    service.close()
    consumer.close()


class ProcessDied(BaseException):
    """Stands for the process dying at that point (an Exception would be the events' failure: dead-lettered)."""


def test_a_crash_between_write_and_ack_redelivers_and_nothing_counts_twice(
    redis_server: RedisServer, redis_url: str
) -> None:
    service = loaded_service(redis_url)

    def write_then_crash(events: Sequence[Event]) -> RecordResult:
        service.record_events(events)
        raise ProcessDied("the process died before XACK")

    crashing = StreamConsumer.from_settings(settings(redis_url), write_then_crash, Metrics())
    crashing.ensure_group()
    push(redis_server, 50)
    with pytest.raises(ProcessDied):
        crashing.poll_once()
    assert counts(service) == [10] * 5
    assert crashing.lag() == (0, 50)  # delivered, not acknowledged
    # The same consumer restarted reads its pending entries again: they are duplicates by event id
    # (the stream entry id stands in for the missing event_id field).
    restarted = StreamConsumer.from_settings(settings(redis_url), service.record_events, service.metrics)
    drain(restarted)
    assert restarted.stats.duplicates == 50 and restarted.stats.applied == 0
    assert counts(service) == [10] * 5 and restarted.lag() == (0, 0)
    service.close()
    for c in (crashing, restarted):
        c.close()


def test_another_consumer_takes_over_entries_left_pending_by_a_dead_one(
    redis_server: RedisServer, redis_url: str
) -> None:
    service = loaded_service(redis_url)

    def crash(events: Sequence[Event]) -> RecordResult:
        raise ProcessDied("died before writing")

    dead = StreamConsumer.from_settings(settings(redis_url), crash, Metrics())
    dead.ensure_group()
    push(redis_server, 40)
    with pytest.raises(ProcessDied):
        dead.poll_once()
    time.sleep(0.06)
    survivor = StreamConsumer.from_settings(settings(redis_url, stream_consumer="c2", stream_claim_idle_ms=50),
                              service.record_events, service.metrics)
    drain(survivor)
    assert survivor.stats.applied == 40 and counts(service) == [8] * 5 and survivor.lag() == (0, 0)
    service.close()
    for c in (dead, survivor):
        c.close()


def test_an_overloaded_encoder_holds_the_batch_unacknowledged_and_backs_off(
    redis_server: RedisServer, redis_url: str
) -> None:
    service = loaded_service(redis_url)
    refusals = {"left": 4}
    pending_seen: list[int] = []
    waits: list[float] = []

    def overloaded_at_first(events: Sequence[Event]) -> RecordResult:
        if refusals["left"] > 0:
            refusals["left"] -= 1
            pending_seen.append(consumer.lag()[1])
            raise Overloaded("encoder queue is full")
        return service.record_events(events)

    consumer = StreamConsumer.from_settings(settings(redis_url, stream_backoff_max_ms=40), overloaded_at_first, service.metrics,
                              sleep=waits.append)
    consumer.ensure_group()
    push(redis_server, 30)
    drain(consumer)
    assert waits == [0.01, 0.02, 0.04, 0.04]  # doubling, capped at stream_backoff_max_ms
    assert pending_seen == [30] * 4  # nothing acknowledged while refused
    assert counts(service) == [6] * 5 and consumer.lag() == (0, 0)
    assert "reranker_stream_backpressure_waits_total 4.0" in service.metrics.exposition().decode()
    service.close()
    consumer.close()


def test_unusable_entries_go_to_the_dead_letter_stream_and_the_rest_is_applied(
    redis_server: RedisServer, redis_url: str
) -> None:
    service = loaded_service(redis_url)
    consumer = StreamConsumer.from_settings(settings(redis_url), service.record_events, service.metrics)
    consumer.ensure_group()
    push(redis_server, 10)
    client = redis_server.client()
    client.xadd(KEY, {"item_id": "x", "error": "the producer's own field"})  # no user
    client.xadd(KEY, {"user_id": "u0", "item_id": "x", "type": "TELEPORT"})
    client.xadd(KEY, {"user_id": "u0", "item_id": "x", "timestamp": "nan"})
    client.xadd(KEY, {"user_id": "u0", "item_id": "x", "timestamp": str(time.time() + 10 * 86400)})  # beyond the skew
    push(redis_server, 10, start=10)
    drain(consumer)
    assert consumer.stats.dead == 4 and consumer.stats.applied == 20
    assert counts(service) == [4] * 5 and consumer.lag() == (0, 0)
    reasons = [fields[b"error"].decode() for _, fields in client.xrange(KEY + ":dead")]
    assert "user_id" in reasons[0] and "TELEPORT" in reasons[1] and "timestamp" in reasons[2]
    assert "timestamp" in reasons[3]
    first = client.xrange(KEY + ":dead")[0][1]  # the whole entry: a field named like the reason is kept aside
    assert first[b"entry.error"] == b"the producer's own field" and first[b"item_id"] == b"x" and first[b"source_id"]
    client.close()
    service.close()
    consumer.close()


def test_reranker_consume_runs_as_a_process_and_stops_on_sigterm(redis_server: RedisServer, redis_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "reranker", "consume", "--encoder", "fake", "--fake-dim", "16", "--redis-url", redis_url,
         "--stream-key", KEY, "--stream-group", "proc", "--stream-block-ms", "50", "--metrics-address", ""],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        push(redis_server, 25)
        client = redis_server.client()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            groups = client.xinfo_groups(KEY) if client.exists(KEY) else []
            if groups and groups[0]["lag"] == 0 and groups[0]["pending"] == 0 and groups[0]["entries-read"] == 25:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the consumer process did not acknowledge the events")
        assert stored_profile(client, "u0", 16).event_count == 5  # type: ignore[union-attr]
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out.decode()[-2000:]
    assert b"25 events applied" in out


def test_a_consumer_needs_a_redis(redis_url: str) -> None:
    with pytest.raises(ValueError, match="stream_url"):
        StreamConsumer.from_settings(fake_settings(), lambda events: RecordResult(), Metrics())


def test_stop_while_backing_off_leaves_the_batch_pending(redis_server: RedisServer, redis_url: str) -> None:
    def always_overloaded(events: Sequence[Event]) -> RecordResult:
        raise Overloaded("full")

    consumer = StreamConsumer.from_settings(settings(redis_url), always_overloaded, Metrics())
    consumer.ensure_group()
    push(redis_server, 5)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 30  # until it backed off 3 times (not a time: a busy machine is slower)
    while consumer.stats.backpressure_waits < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(10)
    assert not thread.is_alive() and consumer.lag() == (0, 5) and consumer.stats.backpressure_waits >= 3
    consumer.close()


def test_nothing_is_acknowledged_while_the_profile_store_is_degraded(redis_server: RedisServer, redis_url: str) -> None:
    service = loaded_service(redis_url)
    degraded = {"left": 3}
    waits: list[float] = []

    def durable() -> bool:  # as `consume` wires it: not service.profiles.degraded
        degraded["left"] -= 1
        pending_while_degraded.append(consumer.lag()[1])
        return degraded["left"] < 0

    pending_while_degraded: list[int] = []
    consumer = StreamConsumer.from_settings(settings(redis_url), service.record_events, service.metrics, sleep=waits.append,
                              durable=durable)
    consumer.ensure_group()
    push(redis_server, 20)
    drain(consumer)
    assert pending_while_degraded[:3] == [20, 20, 20] and len(waits) == 3
    # The batch was recorded 4 times; ids de-duplicate, so it counts once (the retry that is
    # acknowledged finds it already written: 20 duplicates).
    assert counts(service) == [4] * 5 and consumer.lag() == (0, 0) and consumer.stats.duplicates == 20
    service.close()
    consumer.close()


def test_one_users_failing_write_is_dead_lettered_and_not_waited_on(redis_server: RedisServer, redis_url: str) -> None:
    """A write that fails for one user (a wrong-type key, an unreadable stored profile) is that user's
    problem: the others' events are written and acknowledged, the user's entries dead-lettered with
    the reason; no back-pressure wait (it would never end)."""
    service = loaded_service(redis_url)
    waits: list[float] = []

    def wrong_type_for_the_victim(events: Sequence[Event]) -> RecordResult:
        if any(e.user_id == "victim" for e in events):
            raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return service.record_events(events)

    consumer = StreamConsumer.from_settings(settings(redis_url), wrong_type_for_the_victim, service.metrics, sleep=waits.append)
    consumer.ensure_group()
    push(redis_server, 10)
    client = redis_server.client()
    for i in range(2):
        client.xadd(KEY, {"user_id": "victim", "item_id": f"v{i}", "text": "victim's item", "weight": "2"})
    push(redis_server, 10, start=10)
    drain(consumer)
    assert waits == [] and consumer.stats.backpressure_waits == 0
    assert counts(service) == [4] * 5 and consumer.stats.applied == 20 and consumer.lag() == (0, 0)
    letters = [fields for _, fields in client.xrange(KEY + ":dead")]
    assert [f[b"item_id"] for f in letters] == [b"v0", b"v1"] and all(f[b"weight"] == b"2" for f in letters)
    assert all(b"WRONGTYPE" in f[b"error"] for f in letters)
    client.close()
    service.close()
    consumer.close()


def test_a_profile_redis_that_refuses_every_write_is_waited_out(redis_server: RedisServer, redis_url: str) -> None:
    """Lost connections and store-wide refusals (OOM, READONLY) are back-pressure: nothing is
    dead-lettered or acknowledged until the write goes through."""
    service = loaded_service(redis_url)
    failures: list[Exception] = [redis.ConnectionError("connection reset"), redis.exceptions.OutOfMemoryError("OOM"),
                                 redis.exceptions.ReadOnlyError("READONLY"), redis.ResponseError("BUSY running a script")]
    waits: list[float] = []
    pending_seen: list[int] = []

    def store_refuses_at_first(events: Sequence[Event]) -> RecordResult:
        if failures:
            pending_seen.append(consumer.lag()[1])
            raise failures.pop(0)
        return service.record_events(events)

    consumer = StreamConsumer.from_settings(settings(redis_url), store_refuses_at_first, service.metrics, sleep=waits.append)
    consumer.ensure_group()
    push(redis_server, 15)
    drain(consumer)
    assert len(waits) == 4 and pending_seen == [15] * 4 and consumer.stats.dead == 0
    assert counts(service) == [3] * 5 and consumer.lag() == (0, 0)
    service.close()
    consumer.close()


NOW = time.time()


def edge_event(fields: dict[str, str]) -> pb.Event:
    msg = pb.Event(user_id=fields.get("user_id", ""), item_id=fields.get("item_id", ""),
                   type=int(fields.get("type", "2")), event_id=fields.get("event_id", ""))
    if "timestamp" in fields:
        msg.timestamp.seconds = int(fields["timestamp"])  # out-of-range seconds too, as a client may send
    if "text" in fields:
        msg.text = fields["text"]
    if "weight" in fields:
        msg.weight = float(fields["weight"])
    return msg


@pytest.mark.parametrize("change", [
    {"user_id": ""}, {"user_id": "u" * 257}, {"item_id": ""}, {"item_id": "i" * 257}, {"event_id": "e" * 257},
    {"text": "t" * 4001}, {"weight": "1e30"}, {"weight": "-6.5"}, {"weight": "nan"}, {"type": "99"},
    {"timestamp": "0"}, {"timestamp": str(int(NOW * 1000))}, {"timestamp": str(int(NOW + 7200))},
    {"timestamp": "300000000000"},
])
def test_the_consumer_refuses_exactly_what_the_edge_refuses_with_the_same_message(change: dict[str, str]) -> None:
    s = fake_settings()
    fields = {"user_id": "u", "item_id": "i", "type": "2", "timestamp": str(int(NOW) - 5), "text": "t", **change}
    with pytest.raises(InvalidRequest) as at_edge:
        convert.event_from_pb(edge_event(fields), "events[0]", convert.Limits.from_settings(s.limits, s.users), now=NOW)
    with pytest.raises(InvalidRequest) as in_stream:
        event_from_entry(KEY, "1-0", {k.encode(): v.encode() for k, v in fields.items()},
                         EventLimits.from_settings(s.limits, s.users), NOW)
    assert str(at_edge.value) == "events[0]." + str(in_stream.value)
    assert type(at_edge.value) is type(in_stream.value)


def test_the_consumer_accepts_what_the_edge_accepts_at_the_limits() -> None:
    s = fake_settings()
    fields = {"user_id": "u" * 256, "item_id": "i" * 256, "event_id": "e" * 256, "text": "t" * 4000,
              "weight": "-6", "type": "7", "timestamp": str(int(NOW + 3600))}
    at_edge = convert.event_from_pb(edge_event(fields), "events[0]", convert.Limits.from_settings(s.limits, s.users), now=NOW)
    in_stream = event_from_entry(KEY, "1-0", {k.encode(): v.encode() for k, v in fields.items()},
                                 EventLimits.from_settings(s.limits, s.users), NOW)
    assert in_stream == at_edge
