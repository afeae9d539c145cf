"""`reranker consume`: user events from a Redis Stream consumer group into the profile store.

Delivery is at least once, and counting is exactly once:
- a batch is read with XREADGROUP, written with `RerankService.record_events`, and only then
  acknowledged (XACK): a consumer that dies between the two leaves the batch pending, to be read
  again by itself at restart (same `stream_consumer` name) or by another consumer of the group
  (XAUTOCLAIM after `stream_claim_idle_ms`);
- a redelivered event is not counted twice: the profile store de-duplicates by event id, and an
  event without an `event_id` field gets its stream entry id (`<stream key>/<entry id>`).

Back-pressure: when the encoder is overloaded or failing (`Overloaded`, `EncodeTimeout`,
`EncoderFailed`), the model is not loaded yet (`NotReady`), or the Redis profile store is degraded
(its writes go to an in-process outage buffer that dies with the process: acknowledging them
would lose them in a crash), the batch stays unacknowledged and is retried after a wait that doubles up
to `stream_backoff_max_ms`; nothing new is read meanwhile, so the backlog waits in Redis, where the
group's lag (`reranker_stream_lag`) shows it.

Unusable entries (a missing user_id, an unknown type, a time beyond the event policy) are copied to
`stream_dead_letter_key` with the reason, then acknowledged, so one bad message never blocks a
partition. Entry fields: user_id, item_id, type (a name like CLICK, or its number), timestamp (unix
seconds; absent = now), event_id, text (the item's text, encoded when its vector is not cached), weight.

Kafka maps one to one: topic partition <-> stream, consumer group <-> group, committed offset <->
XACK (commit after `record_events`), partition lag <-> group lag. It is not built in: no broker can
run in the project's test environment to test it against.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import Counter, Gauge

from reranker.errors import EncoderFailed, EncodeTimeout, InvalidRequest, NotReady, Overloaded
from reranker.users.redis_store import REDIS_ERRORS, redis_client
from reranker.types import Event, EventType, RecordResult

if TYPE_CHECKING:
    from reranker.config import Settings
    from reranker.serving.metrics import Metrics

log = logging.getLogger(__name__)

# Waited out, never acknowledged past: an overloaded, slow, failing or not yet loaded encoder.
RETRYABLE = (Overloaded, EncodeTimeout, NotReady, EncoderFailed)
_FIRST_BACKOFF_S = 0.01


class BadEntry(ValueError):
    """A stream entry that cannot become an Event (the reason names the field)."""


def _text(fields: dict[bytes, bytes], name: str) -> str | None:
    raw = fields.get(name.encode())
    return None if raw is None else raw.decode("utf-8", "replace")


def event_from_entry(stream_key: str, entry_id: str, fields: dict[bytes, bytes]) -> Event:
    user_id, item_id = _text(fields, "user_id"), _text(fields, "item_id")
    if not user_id:
        raise BadEntry("user_id is missing or empty")
    if not item_id:
        raise BadEntry("item_id is missing or empty")
    kind_raw = (_text(fields, "type") or "CLICK").strip()
    try:
        kind = EventType(int(kind_raw)) if kind_raw.lstrip("-").isdigit() else EventType[kind_raw.upper()]
    except (KeyError, ValueError):
        raise BadEntry(f"type {kind_raw!r} is not an event type") from None
    timestamp, weight = 0.0, None
    try:
        if (raw := _text(fields, "timestamp")) not in (None, ""):
            timestamp = float(raw)  # type: ignore[arg-type]
        if (raw := _text(fields, "weight")) not in (None, ""):
            weight = float(raw)  # type: ignore[arg-type]
    except ValueError as exc:
        raise BadEntry(f"timestamp / weight: {exc}") from None
    if not math.isfinite(timestamp) or timestamp < 0:
        raise BadEntry(f"timestamp {timestamp!r} is not a time")
    event_id = _text(fields, "event_id") or f"{stream_key}/{entry_id}"
    return Event(user_id, item_id, kind, timestamp, event_id, _text(fields, "text") or None, weight)


class StreamMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.events = Counter("reranker_stream_events", "Stream entries handled by the consumer, by result "
                              "(applied, duplicate, dead_letter).", ["result"], registry=r)
        self.lag = Gauge("reranker_stream_lag", "Entries in the stream not yet delivered to the group (XINFO GROUPS lag).",
                         registry=r)
        self.pending = Gauge("reranker_stream_pending", "Entries delivered to the group and not acknowledged yet.",
                             registry=r)
        self.backpressure = Counter("reranker_stream_backpressure_waits", "Waits before retrying a batch the encoder "
                                    "refused (overloaded, timed out, not loaded).", registry=r)


@dataclass
class ConsumerStats:
    batches: int = 0
    applied: int = 0
    duplicates: int = 0
    dead: int = 0
    backpressure_waits: int = 0


class StreamConsumer:
    """Reads `stream_key` as `stream_consumer` of `stream_group` and records its events through `record`
    (RerankService.record_events). Run `run(stop)` on a thread, or `poll_once()` step by step."""

    def __init__(
        self,
        settings: Settings,
        record: Callable[[Sequence[Event]], RecordResult],
        metrics: Metrics,
        *,
        client: redis.Redis | Any = None,
        sleep: Callable[[float], None] = time.sleep,
        durable: Callable[[], bool] = lambda: True,
    ) -> None:
        s = settings
        self.key = s.stream_key
        self.group = s.stream_group
        self.name = s.stream_consumer or socket.gethostname()
        self.batch_size = s.stream_batch_size
        self.block_ms = s.stream_block_ms
        self.claim_idle_ms = s.stream_claim_idle_ms
        self.dead_key = s.stream_dead_letter_key
        self.backoff_max_s = s.stream_backoff_max_ms / 1000.0
        url = s.stream_url or s.redis_url
        if client is None:
            if not url:
                raise ValueError("reranker consume needs stream_url (or redis_url): the Redis holding the stream")
            timeout = max(5.0, 2 * self.block_ms / 1000.0)
            client = redis_client(url, timeout_s=timeout, connect_timeout_s=5.0)
        self.client = client
        self._record = record
        self._durable = durable  # False while the profile store writes to its outage fallback
        self._sleep = sleep
        self.metrics = StreamMetrics(metrics)
        self.stats = ConsumerStats()
        self._own_pending_done = False  # entries this consumer read before a restart: first
        self._claim_cursor = "0-0"
        self._last_lag_read = 0.0

    def ensure_group(self) -> None:
        """Create the group (reading the stream from its start) if it does not exist yet."""
        try:
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.ensure_group()
        log.info("consuming %s as %s of group %s", self.key, self.name, self.group)
        while not stop.is_set():
            try:
                self.poll_once(stop)
            except REDIS_ERRORS as exc:
                log.warning("event stream unavailable (%s); retrying in 1 s", exc)
                stop.wait(1.0)

    def poll_once(self, stop: threading.Event | None = None) -> int:
        """Read one batch (own pending entries first, then entries idle at other consumers, then new
        ones), record it, acknowledge it. Returns the entries handled."""
        entries = self._read()
        if entries:
            self._handle(entries, stop)
        self._update_lag()
        return len(entries)

    def _read(self) -> list[tuple[str, dict[bytes, bytes]]]:
        if not self._own_pending_done:
            got = self.client.xreadgroup(self.group, self.name, {self.key: "0"}, count=self.batch_size)
            entries = _entries(got)
            if entries:
                return entries
            self._own_pending_done = True
        if self.claim_idle_ms > 0:
            cursor, claimed, *_ = self.client.xautoclaim(self.key, self.group, self.name, self.claim_idle_ms,
                                                         start_id=self._claim_cursor, count=self.batch_size)
            self._claim_cursor = _str(cursor)
            claimed = [(_str(i), f) for i, f in claimed if f is not None]
            if claimed:
                return claimed
        got = self.client.xreadgroup(self.group, self.name, {self.key: ">"}, count=self.batch_size, block=self.block_ms)
        return _entries(got)

    def _handle(self, entries: list[tuple[str, dict[bytes, bytes]]], stop: threading.Event | None) -> None:
        events: list[Event] = []
        ids: list[str] = []
        dead: list[tuple[str, dict[bytes, bytes], str]] = []
        for entry_id, fields in entries:
            try:
                events.append(event_from_entry(self.key, entry_id, fields))
                ids.append(entry_id)
            except BadEntry as exc:
                dead.append((entry_id, fields, str(exc)))
        if events:
            result = self._record_with_backpressure(events, ids, dead, stop)
            if result is None:  # stopped while waiting: leave the batch pending
                return
            self.stats.applied += result.accepted
            self.stats.duplicates += result.duplicates
            self.metrics.events.labels(result="applied").inc(result.accepted)
            self.metrics.events.labels(result="duplicate").inc(result.duplicates)
        if dead:
            self._dead_letter(dead)
        self.client.xack(self.key, self.group, *[entry_id for entry_id, _ in entries])
        self.stats.batches += 1

    def _record_with_backpressure(self, events: list[Event], ids: list[str], dead: list[tuple[str, dict[bytes, bytes], str]],
                                  stop: threading.Event | None) -> RecordResult | None:
        wait = _FIRST_BACKOFF_S
        while True:
            try:
                result = self._record(events)
                if self._durable():
                    return result
                reason = "the profile store is degraded (Redis unreachable): its outage buffer is not durable"
            except RETRYABLE as exc:
                reason = f"the encoder refused it ({exc})"
            except InvalidRequest:
                return self._record_one_by_one(events, ids, dead)
            self.stats.backpressure_waits += 1
            self.metrics.backpressure.inc()
            log.debug("stream batch not acknowledged: %s; retrying in %.2f s", reason, wait)
            if stop is not None:
                if stop.wait(wait):
                    return None
            else:
                self._sleep(wait)
            wait = min(self.backoff_max_s, wait * 2)

    def _record_one_by_one(self, events: list[Event], ids: list[str],
                           dead: list[tuple[str, dict[bytes, bytes], str]]) -> RecordResult:
        """A batch refused as invalid: isolate the events at fault (dead letters), keep the rest."""
        total = RecordResult()
        for event, entry_id in zip(events, ids):
            try:
                total = total + self._record([event])
            except InvalidRequest as exc:
                dead.append((entry_id, {b"user_id": event.user_id.encode(), b"item_id": event.item_id.encode(),
                                        b"event_id": event.event_id.encode()}, str(exc)))
        return total

    def _dead_letter(self, dead: list[tuple[str, dict[bytes, bytes], str]]) -> None:
        self.stats.dead += len(dead)
        self.metrics.events.labels(result="dead_letter").inc(len(dead))
        for entry_id, _, reason in dead:
            log.warning("stream entry %s is unusable (%s)%s", entry_id, reason,
                        f"; copied to {self.dead_key}" if self.dead_key else "; dropped")
        if self.dead_key:
            for entry_id, fields, reason in dead:
                self.client.xadd(self.dead_key, {**fields, b"error": reason.encode(), b"source_id": entry_id.encode()})

    def _update_lag(self, every_s: float = 0.5) -> None:
        now = time.monotonic()
        if now - self._last_lag_read < every_s:
            return
        self._last_lag_read = now
        lag, pending = self.lag()
        self.metrics.lag.set(lag)
        self.metrics.pending.set(pending)

    def lag(self) -> tuple[int, int]:
        """(entries not yet delivered to the group, entries delivered and not acknowledged)."""
        for group in self.client.xinfo_groups(self.key):
            if _str(group.get("name", b"")) == self.group:
                lag = group.get("lag")
                if lag is None:  # Redis < 7 or an undefined lag: fall back to the stream length
                    lag = self.client.xlen(self.key)
                return int(lag), int(group.get("pending", 0))
        return 0, 0

    def close(self) -> None:
        self.client.close()


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(got: Any) -> list[tuple[str, dict[bytes, bytes]]]:
    out = []
    for _stream, messages in got or []:
        out.extend((_str(entry_id), fields) for entry_id, fields in messages if fields is not None)
    return out


def consume(settings: Settings) -> int:
    """`reranker consume`: load the model, then record the stream's events until SIGTERM / SIGINT."""
    import signal

    from reranker.serving.metrics import MetricsEndpoint
    from reranker.service import RerankService

    if not settings.redis_url:
        log.warning("redis_url is empty: events go to this process's in-process profiles, which no server reads")
    service = RerankService(settings)
    endpoint = MetricsEndpoint(service.metrics, settings.metrics_address) if settings.metrics_address else None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service.load()
    consumer = StreamConsumer(settings, service.record_events, service.metrics,
                              durable=lambda: not getattr(service.profiles, "degraded", False))
    try:
        consumer.run(stop)
    finally:
        consumer.close()
        service.close()
        if endpoint is not None:
            endpoint.stop()
    s = consumer.stats
    log.info("stopped: %d events applied, %d duplicates, %d dead letters", s.applied, s.duplicates, s.dead)
    return 0
