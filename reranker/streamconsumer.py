"""`reranker consume`: user events from a Redis Stream consumer group into the profile store.

The invariant: an entry is acknowledged (XACK) only after its event is durably written to the
profile store, or after the whole entry (every field) and the reason are copied to
`stream_dead_letter_key`. A poisoned entry or profile affects only its own user; nothing an entry
or a user's stored value holds makes the process exit. How it is kept:

- **At least once, counted exactly once.** A batch is read with XREADGROUP, written with
  `RerankService.record_events`, and only then acknowledged: a consumer that dies between the two
  leaves the batch pending, read again by itself at restart (same `stream_consumer` name) or by
  another consumer of the group (XAUTOCLAIM after `stream_claim_idle_ms`). A redelivered event is
  not counted twice: the profile store de-duplicates by event id, and an entry without an
  `event_id` field gets its stream entry id (`<stream key>/<entry id>`).
- **The edge's validation.** Each entry becomes an Event through `eventpolicy.checked_event`, the
  function the gRPC edge validates events with: the same limits (`max_id_chars`, `max_text_chars`,
  `max_event_weight`, `max_event_skew_seconds`) and messages (`user_id is 100000 characters; the
  limit is 256`). Fields must be UTF-8. A refused entry is dead-lettered at once.
- **Back-pressure: waited out, never acknowledged past.** An encoder that is overloaded, slow,
  failing or not loaded yet (`Overloaded`, `EncodeTimeout`, `EncoderFailed`, `NotReady`), a profile
  store that is degraded (its writes go to an in-process outage buffer that dies with the process),
  or a profile Redis that refuses every write for now (connection lost, OOM, READONLY, LOADING,
  cluster down): the events stay unacknowledged and are written again after a wait that doubles up
  to `stream_backoff_max_ms`. Nothing new is read meanwhile: the backlog waits in Redis, where
  `reranker_stream_lag` and `reranker_stream_pending` show it (updated during the waits too).
- **Per-user failures stay per user.** Any other failure of a write (a stored profile that cannot
  be read, a wrong-type key, a refusal by the service) is not the store's: the batch is written
  again user by user, then entry by entry, and only the entries that still fail are dead-lettered,
  with the exception as the reason. The other users' events are written and acknowledged.
- **A dead letter that cannot be written is not acknowledged.** When the dead-letter stream refuses
  the copy (e.g. the key holds another type), the entry stays pending (unacknowledged, nothing lost);
  it is counted once in `reranker_stream_dead_letter_failures_total`, an error is logged at most once
  a minute, and the entry is tried again (own pending entries are re-read every 10 s while any are
  left, and XAUTOCLAIM takes idle ones) while the consumer goes on with the rest of the stream.

Entry fields: user_id, item_id, type (a name like CLICK, or its number; absent = CLICK), timestamp
(unix seconds; absent or empty = now), event_id, text (the item's text, encoded when its vector is
not cached), weight. A dead letter is the entry's fields plus `error` (the reason) and `source_id`
(the entry's id in `stream_key`).

Kafka maps one to one: topic partition <-> stream, consumer group <-> group, committed offset <->
XACK (commit after `record_events`), partition lag <-> group lag. It is not built in: no broker can
run in the project's test environment to test it against.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import Counter, Gauge

from reranker.errors import EncoderFailed, EncodeTimeout, InvalidRequest, NotReady, Overloaded
from reranker.users.eventpolicy import EventLimits, EventRefused, checked_event
from reranker.users.redis_store import REDIS_ERRORS, redis_client
from reranker.types import Event, EventType, RecordResult

if TYPE_CHECKING:
    from reranker.config import Settings, StreamSettings
    from reranker.metrics import Metrics

log = logging.getLogger(__name__)

# Waited out, never acknowledged past: an overloaded, slow, failing or not yet loaded encoder.
RETRYABLE = (Overloaded, EncodeTimeout, NotReady, EncoderFailed)
# Replies (first word) of a Redis that refuses any write for now, whatever the key.
_BUSY_REPLIES = frozenset({"BUSY", "MISCONF", "NOREPLICAS"})
_FIRST_BACKOFF_S = 0.01
_REVISIT_PENDING_S = 10.0  # re-read own pending entries this often while some could not be dead-lettered
_ERROR_LOG_INTERVAL_S = 60.0
_MAX_PARKED = 100_000  # entry ids remembered as counted in dead_letter_failures
_SHOWN = 40  # characters of a refused value quoted in a reason


def waited_out(exc: BaseException) -> bool:
    """Whether a failure of a write is the encoder's or the whole store's (waited out, retried), not
    the events' or their user's. Redis replies that name one key's problem (WRONGTYPE, a script
    error on a value) are the user's; lost connections, timeouts and replies such as OOM, READONLY,
    LOADING, NOSCRIPT, TRYAGAIN or CLUSTERDOWN are the store's."""
    if isinstance(exc, RETRYABLE):
        return True
    if type(exc) is redis.ResponseError:
        return str(exc).split(" ", 1)[0] in _BUSY_REPLIES
    return isinstance(exc, REDIS_ERRORS)


def _text(fields: dict[bytes, bytes], name: str) -> str:
    raw = fields.get(name.encode())
    if raw is None:
        return ""
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise InvalidRequest(f"{name} is not valid UTF-8") from None


def _number(fields: dict[bytes, bytes], name: str) -> float | None:
    raw = _text(fields, name).strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise InvalidRequest(f"{name} {raw[:_SHOWN]!r} is not a number") from None


def _event_type(raw: str) -> int:
    raw = raw.strip() or "CLICK"
    try:
        return int(raw) if raw.isascii() and raw.lstrip("-").isdigit() else int(EventType[raw.upper()])
    except (KeyError, ValueError):
        raise InvalidRequest(f"type {raw[:_SHOWN]!r} is not a known EventType") from None


def event_from_entry(stream_key: str, entry_id: str, fields: dict[bytes, bytes], limits: EventLimits,
                     now: float | None) -> Event:
    """The entry's Event, validated like an event at the gRPC edge (eventpolicy.checked_event), or
    InvalidRequest naming the field (EventRefused for the time / weight policy)."""
    user_id, item_id = _text(fields, "user_id"), _text(fields, "item_id")
    kind = _event_type(_text(fields, "type"))
    timestamp, weight = _number(fields, "timestamp"), _number(fields, "weight")
    event_id, text = _text(fields, "event_id"), _text(fields, "text")
    event = checked_event(user_id, item_id, kind, timestamp, event_id, text or None, weight, name="", limits=limits,
                          now=now)
    if event_id:
        return event
    return Event(event.user_id, event.item_id, event.type, event.timestamp, f"{stream_key}/{entry_id}", event.text,
                 event.weight)


@dataclass(slots=True)
class _Entry:
    """One stream entry in a batch: its Event, or the reason it is to be dead-lettered."""

    id: str
    fields: dict[bytes, bytes]
    event: Event | None = None
    reason: str = ""


class StreamMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.refused = metrics.events_refused
        self.events = Counter("reranker_stream_events", "Stream entries handled by the consumer, by result "
                              "(applied, duplicate, dead_letter).", ["result"], registry=r)
        self.lag = Gauge("reranker_stream_lag", "Entries in the stream not yet delivered to the group (XINFO GROUPS lag).",
                         registry=r)
        self.pending = Gauge("reranker_stream_pending", "Entries delivered to the group and not acknowledged yet.",
                             registry=r)
        self.backpressure = Counter("reranker_stream_backpressure_waits", "Waits before retrying a batch the encoder "
                                    "refused (overloaded, timed out, not loaded) or the profile store could not "
                                    "write durably (degraded, Redis refusing writes).", registry=r)
        self.dead_letter_failures = Counter(
            "reranker_stream_dead_letter_failures", "Unusable entries that could not be copied to the dead-letter "
            "stream (e.g. its key holds another type): left pending, unacknowledged, and tried again; each counted "
            "once.", registry=r)


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
        settings: StreamSettings,
        record: Callable[[Sequence[Event]], RecordResult],
        metrics: Metrics,
        *,
        limits: EventLimits,
        redis_url: str = "",
        client: redis.Redis | Any = None,
        sleep: Callable[[float], None] = time.sleep,
        durable: Callable[[], bool] = lambda: True,
        now: Callable[[], float] = time.time,
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
        self.limits = limits  # the edge's event checks, shared
        url = s.stream_url or redis_url
        if client is None:
            if not url:
                raise ValueError("reranker consume needs stream_url (or redis_url): the Redis holding the stream")
            timeout = max(5.0, 2 * self.block_ms / 1000.0)
            client = redis_client(url, timeout_s=timeout, connect_timeout_s=5.0)
        self.client = client
        self._record = record
        self._durable = durable  # False while the profile store writes to its outage fallback
        self._now = now  # server time: event times are checked against it
        self._sleep = sleep
        self.metrics = StreamMetrics(metrics)
        self.stats = ConsumerStats()
        self._own_pending_done = False  # entries this consumer read before a restart: first
        self._pending_from = "0"  # where the next read of own pending entries starts
        self._claim_cursor = "0-0"
        self._last_lag_read = 0.0
        # Entries that could not be dead-lettered (left pending), by id: counted once, tried again.
        self._parked: dict[str, None] = {}
        self._revisit_at = 0.0
        self._last_error_log: dict[str, float] = {}  # by kind: when an error was last logged

    @classmethod
    def from_settings(cls, settings: Settings, record: Callable[[Sequence[Event]], RecordResult], metrics: Metrics,
                      **kwargs: Any) -> StreamConsumer:
        """The consumer of the stream section, with the edge's event limits (limits and users
        sections) and redis_url as the stream's Redis where stream_url is empty."""
        limits = EventLimits.from_settings(settings.limits, settings.users)
        return cls(settings.stream, record, metrics, limits=limits, redis_url=settings.redis.redis_url, **kwargs)

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
                self._reread_own_pending()  # a batch read before the failure may be pending, unacknowledged
                stop.wait(1.0)

    def poll_once(self, stop: threading.Event | None = None) -> int:
        """Read one batch (own pending entries first, then entries idle at other consumers, then new
        ones), record it, acknowledge it. Returns the entries handled."""
        if self._parked and time.monotonic() >= self._revisit_at:
            self._reread_own_pending()
        entries = self._read()
        if entries:
            self._handle(entries, stop)
        self._update_lag()
        return len(entries)

    def _reread_own_pending(self) -> None:
        self._own_pending_done = False
        self._pending_from = "0"
        self._revisit_at = time.monotonic() + _REVISIT_PENDING_S

    def _read(self) -> list[tuple[str, dict[bytes, bytes]]]:
        while not self._own_pending_done:
            got = self.client.xreadgroup(self.group, self.name, {self.key: self._pending_from}, count=self.batch_size)
            entries, last = self._entries(got)
            if last is None:
                self._own_pending_done = True
                self._pending_from = "0"
                break
            self._pending_from = last  # past entries left pending on purpose (see _dead_letter)
            if entries:
                return entries
        if self.claim_idle_ms > 0:
            cursor, claimed, *_ = self.client.xautoclaim(self.key, self.group, self.name, self.claim_idle_ms,
                                                         start_id=self._claim_cursor, count=self.batch_size)
            self._claim_cursor = _str(cursor)
            claimed = [(_str(i), f) for i, f in claimed if f is not None]
            if claimed:
                return claimed
        got = self.client.xreadgroup(self.group, self.name, {self.key: ">"}, count=self.batch_size, block=self.block_ms)
        return self._entries(got)[0]

    def _entries(self, got: Any) -> tuple[list[tuple[str, dict[bytes, bytes]]], str | None]:
        """A read's entries and the last id read. A pending entry deleted from the stream since (no
        fields) is acknowledged: nothing is left of it to write."""
        out, gone, last = [], [], None
        for _stream, messages in got or []:
            for entry_id, fields in messages:
                last = _str(entry_id)
                if fields is None:
                    gone.append(last)
                else:
                    out.append((last, fields))
        if gone:
            self.client.xack(self.key, self.group, *gone)
        return out, last

    def _handle(self, entries: list[tuple[str, dict[bytes, bytes]]], stop: threading.Event | None) -> None:
        now = self._now()
        batch = [self._parse(entry_id, fields, now) for entry_id, fields in entries]
        # Refused entries first: dead-lettered and acknowledged whatever happens to the others.
        self._ack(self._dead_letter([e for e in batch if e.reason]))
        valid = [e for e in batch if e.event is not None]
        if valid:
            result = self._write(valid, stop)
            if result is None:  # stopped while waiting: leave the batch pending
                return
            self.stats.applied += result.accepted
            self.stats.duplicates += result.duplicates
            self.metrics.events.labels(result="applied").inc(result.accepted)
            self.metrics.events.labels(result="duplicate").inc(result.duplicates)
            written = [e.id for e in valid if not e.reason]
            self._ack(written + self._dead_letter([e for e in valid if e.reason]))
        self.stats.batches += 1

    def _ack(self, entry_ids: list[str]) -> None:
        if entry_ids:
            self.client.xack(self.key, self.group, *entry_ids)

    def _parse(self, entry_id: str, fields: dict[bytes, bytes], now: float) -> _Entry:
        entry = _Entry(entry_id, fields)
        try:
            entry.event = event_from_entry(self.key, entry_id, fields, self.limits, now)
        except EventRefused as exc:
            self.metrics.refused.labels(field=exc.field).inc()
            entry.reason = str(exc)
        except InvalidRequest as exc:
            entry.reason = str(exc)
        return entry

    # --- writing -----------------------------------------------------------------------------------
    def _write(self, entries: list[_Entry], stop: threading.Event | None) -> RecordResult | None:
        """Write the entries' events durably (waiting out back-pressure); when the write fails for
        another reason, write them again user by user, then one by one, and mark the entries that
        still fail with the reason (to be dead-lettered). None: stopped while waiting."""
        try:
            return self._write_durably([e.event for e in entries], stop)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001  (not waited out: the events' or their user's failure)
            if len(entries) == 1:
                if isinstance(exc, InvalidRequest):
                    entries[0].reason = str(exc)
                else:
                    entries[0].reason = f"writing the event failed: {type(exc).__name__}: {exc}"
                    if self._due("write"):
                        log.error("writing a stream entry's event failed (%s); the entry is dead-lettered, the "
                                  "other users' events are written", type(exc).__name__, exc_info=exc)
                return RecordResult()
            users: dict[str, list[_Entry]] = {}
            for e in entries:
                users.setdefault(e.event.user_id, []).append(e)  # type: ignore[union-attr]
            parts = list(users.values()) if len(users) > 1 else [[e] for e in entries]
            total = RecordResult()
            for part in parts:
                result = self._write(part, stop)
                if result is None:
                    return None
                total = total + result
            return total

    def _write_durably(self, events: list[Event], stop: threading.Event | None) -> RecordResult | None:
        """record(events), again after a doubling wait while the failure is waited out (encoder, a
        store that is degraded or refuses every write); None when `stop` is set while waiting."""
        wait = _FIRST_BACKOFF_S
        while True:
            try:
                result = self._record(events)
                if self._durable():
                    return result
                reason = "the profile store is degraded (Redis unreachable): its outage buffer is not durable"
            except Exception as exc:
                if not waited_out(exc):
                    raise
                reason = f"{type(exc).__name__}: {exc}"
            self.stats.backpressure_waits += 1
            self.metrics.backpressure.inc()
            log.debug("stream batch not acknowledged: %s; retrying in %.2f s", reason, wait)
            self._update_lag_quietly()
            if stop is not None:
                if stop.wait(wait):
                    return None
            else:
                self._sleep(wait)
            wait = min(self.backoff_max_s, wait * 2)

    # --- dead letters ------------------------------------------------------------------------------
    def _dead_letter(self, dead: list[_Entry]) -> list[str]:
        """Copy each entry, whole, with its reason to the dead-letter stream; returns the ids copied
        (or dropped, without a dead-letter stream): those may be acknowledged. An entry the dead-letter
        stream refuses stays pending."""
        if not dead:
            return []
        copied = self._copy_letters(dead) if self.dead_key else dead
        if copied:
            self._count_dead(copied)
        return [e.id for e in copied]

    def _copy_letters(self, dead: list[_Entry]) -> list[_Entry]:
        """XADD each entry's letter to the dead-letter stream (one pipeline); returns the entries
        copied. Those the stream refuses (a Redis error reply) are parked; any other error is raised."""
        pipe = self.client.pipeline(transaction=False)
        for e in dead:
            pipe.xadd(self.dead_key, self._letter(e))
        replies = pipe.execute(raise_on_error=False)
        failed = [(e, r) for e, r in zip(dead, replies) if isinstance(r, Exception)]
        if any(not isinstance(r, redis.ResponseError) for _, r in failed):
            raise next(r for _, r in failed if not isinstance(r, redis.ResponseError))
        refused = [e for e, _ in failed]
        refused_ids = {e.id for e in refused}
        copied = [e for e in dead if e.id not in refused_ids]
        if failed:
            self._parked_failed(refused, failed[0][1])
        return copied

    def _count_dead(self, copied: list[_Entry]) -> None:
        """Count and log entries copied to the dead letters (or dropped), and unpark them."""
        self.stats.dead += len(copied)
        self.metrics.events.labels(result="dead_letter").inc(len(copied))
        for e in copied:
            self._parked.pop(e.id, None)
        first = copied[0]
        log.warning("%d stream entries unusable (first: %s, %s); %s", len(copied), first.id, first.reason[:200],
                    f"copied to {self.dead_key}" if self.dead_key else "dropped (stream_dead_letter_key is empty)")

    def _letter(self, e: _Entry) -> dict[bytes, bytes]:
        """The whole entry, plus `error` and `source_id` (an entry's own fields of those names are
        kept as `entry.error` / `entry.source_id`)."""
        letter = {(b"entry." + k if k in (b"error", b"source_id") else k): v for k, v in e.fields.items()}
        letter[b"error"] = e.reason.encode("utf-8", "replace")
        letter[b"source_id"] = e.id.encode()
        return letter

    def _parked_failed(self, refused: list[_Entry], error: Exception) -> None:
        new = [e for e in refused if e.id not in self._parked]
        self.metrics.dead_letter_failures.inc(len(new))
        if not self._parked:  # the first ones: tried again after a while, not at once
            self._revisit_at = time.monotonic() + _REVISIT_PENDING_S
        for e in refused:
            self._parked[e.id] = None
        while len(self._parked) > _MAX_PARKED:
            del self._parked[next(iter(self._parked))]
        if self._due("dead_letter"):
            log.error("could not copy %d unusable stream entries to the dead-letter stream %s (%s): they stay "
                      "pending, unacknowledged, and are tried again; %d are waiting. Make %s a stream (or delete it)",
                      len(refused), self.dead_key, error, len(self._parked), self.dead_key)

    def _due(self, kind: str) -> bool:
        """Whether an error of this kind may be logged now (at most once per _ERROR_LOG_INTERVAL_S)."""
        now = time.monotonic()
        if now - self._last_error_log.get(kind, -_ERROR_LOG_INTERVAL_S) < _ERROR_LOG_INTERVAL_S:
            return False
        self._last_error_log[kind] = now
        return True

    # --- lag -----------------------------------------------------------------------------------------
    def _update_lag(self, every_s: float = 0.5) -> None:
        now = time.monotonic()
        if now - self._last_lag_read < every_s:
            return
        self._last_lag_read = now
        lag, pending = self.lag()
        self.metrics.lag.set(lag)
        self.metrics.pending.set(pending)

    def _update_lag_quietly(self) -> None:
        try:
            self._update_lag()
        except REDIS_ERRORS:
            pass  # the stream's Redis is unavailable: the gauges keep their last values

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


def consume(settings: Settings) -> int:
    """`reranker consume`: load the model, then record the stream's events until SIGTERM / SIGINT."""
    import signal

    from reranker.metrics import MetricsEndpoint
    from reranker.service import RerankService

    if not settings.redis.redis_url:
        log.warning("redis_url is empty: events go to this process's in-process profiles, which no server reads")
    service = RerankService(settings)
    metrics_address = settings.observability.metrics_address
    endpoint = MetricsEndpoint(service.metrics, metrics_address) if metrics_address else None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service.load()
    consumer = StreamConsumer.from_settings(settings, service.record_events, service.metrics, now=service.now,
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
