"""The training log: served lists and events appended to rotating TSV files, off the request path.

Request path: `served(...)` / `events(...)` decide sampling and append one tuple to a bounded
deque (no lock, no I/O, no formatting); when it is full the record is dropped and counted
(`reranker_training_log_dropped`). One writer thread drains it, formats rows, hashes user ids,
writes the files and feeds the online-metrics join (onlinemetrics.py), so the join costs the
request path nothing either.

Files (in `training_log_dir`), each a header line then rows, named so that sorting the names
sorts them in time: `served-<UTC start>-<pid>-<seq>.tsv` (the candidates.tsv form that
`formats.read_served_lists` and `reranker train --candidates` read) and `events-...tsv` (the
events.tsv form of `formats.read_events`).

served columns: user_id, item_id, score (upstream; see served_rows for its exact form), label (empty), timestamp (server clock, unix
seconds), list_id (the request id), returned_rank (0-based position in the answer; empty when it
was cut by top_k), variant (reranked, control, bypassed, fallback), model_version, arm, list_size
(rows of this list: a list cut short by a crash is recognised and skipped). Candidates are in
upstream order, duplicates removed (first occurrence), as the service ranks them.
events columns: user_id, item_id, timestamp (the event's, or the server's when it had none),
event_type.

User ids: with `log_user_salt` set, both files carry `userhash.user_hash(salt, user_id)`
(the access log's hash), so lists and events still join, and a log trained on never sees raw ids.
A backslash, tab, LF or CR inside an id (or list id, model version) is escaped as \\\\, \\t, \\n, \\r
(a row is always one line); `read_training_log` undoes it exactly.

Durability (the fsync policy):
- the writer thread hands each batch to the OS (one write + flush) at least every
  `training_log_flush_seconds`; a process crash (SIGKILL, OOM kill) loses at most the records of
  the last interval plus those still queued; what was flushed survives (page cache);
- a file is fsynced when it is closed (rotation, shutdown); with `training_log_fsync` every flush
  is fsynced too, which bounds a machine crash (power loss) the same way;
- a crash can leave a last line without its newline, or a list with fewer rows than its
  `list_size`: `read_training_log` never takes either as data. A restarted server never appends to
  an old file (it starts new ones), so a torn tail stays a tail.

Failures (best effort, docs/reliability.md "Training log"): the writer hands bytes to the OS itself
(os.write), so `reranker_training_log_records_total` counts exactly the records (lists; events: one
per event) that reached the file. A failed create/write/fsync (full disk, unusable directory) closes
that file at a torn tail, is counted, logged at most once per `training_log_retry_seconds`, and
records are dropped and counted for that long before a new file is tried. Nothing here raises into
a request, the model load or the shutdown.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from reranker.ranking import scoring
from reranker.config import LearningSettings
from reranker.records import EVENT_TYPES, CandidateRow, FormatError, Interaction, ServedList
from reranker.userhash import user_hash
from reranker.types import CandidateColumns, Event, EventType, RankedItems, RerankQuery, RerankResult, Variant

log = logging.getLogger(__name__)

SERVED_COLUMNS = (
    "user_id", "item_id", "score", "label", "timestamp", "list_id",
    "returned_rank", "variant", "model_version", "arm", "list_size",
)
EVENT_COLUMNS = ("user_id", "item_id", "timestamp", "event_type")
SERVED_PREFIX, EVENTS_PREFIX = "served-", "events-"
_IDLE_POLL_S = 0.05
_WRITE_THROUGH_BYTES = 1 << 20  # the writer's buffer is handed to the OS at this size even between flushes
_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_UNESCAPED = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def _field(text: str) -> str:
    r"""`text` as one TSV field: a backslash, tab, LF or CR becomes \\, \t, \n or \r (undone by `unescape`)."""
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return text.translate(_ESCAPE)
    return text


def unescape(text: str) -> str:
    """The id `_field` escaped, exactly."""
    if "\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: _UNESCAPED.get(m.group(1), m.group(0)), text)


@dataclass(frozen=True, slots=True)
class ServedRecord:
    """What the request path hands over: the query and the answer, formatted later by the writer."""

    served_at: float
    query: RerankQuery
    result: RerankResult


@dataclass(frozen=True, slots=True)
class EventsRecord:
    received_at: float
    events: tuple[Event, ...]


class RotatingTsv:
    """Append-only TSV files of one kind, rotated by size and age; never reopens an old file.

    `write` takes one record (whole lines) into a buffer in memory; `flush` hands the buffer to the
    OS with os.write, so this object knows exactly which records reached the file: `written` counts
    those, `lost` those that did not. It never raises an OSError: a failure (full disk, a directory
    that cannot be created or written) closes the file where it stopped (a torn tail, which the
    reader skips), counts the records still buffered as lost and the failure in `errors` (the last
    one in `last_error`), and drops further records (counted as lost) for `retry_seconds`; then it
    tries a new file.
    """

    def __init__(
        self, directory: Path, prefix: str, header: Sequence[str], *, max_bytes: int, max_seconds: float,
        keep_files: int = 0, fsync_each_flush: bool = False, clock: Callable[[], float] = time.time,
        retry_seconds: float = 30.0,
    ) -> None:
        self.directory, self.prefix, self.header = directory, prefix, "\t".join(header) + "\n"
        self.max_bytes, self.max_seconds, self.keep_files = max_bytes, max_seconds, keep_files
        self.fsync_each_flush = fsync_each_flush
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._fd: int | None = None
        self._path: Path | None = None
        self._buffer = bytearray()
        self._ends: list[int] = []  # where each buffered record ends in _buffer
        self._opened_at = 0.0
        self._bytes = 0
        self._seq = 0
        self._retry_at = 0.0
        self.files_opened = 0
        self.written = 0  # records handed to the OS
        self.lost = 0  # records that never reached a file
        self.errors = 0
        self.last_error = ""

    def prepare(self) -> bool:
        """Create the directory now (a start-up check); False (counted, see the class doc) when that fails."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:
            self._fail(exc, str(self.directory), reason="exists and is not a directory")
            return False
        except OSError as exc:
            self._fail(exc, f"cannot create the directory {self.directory}")
            return False
        return True

    def write(self, text: str) -> None:
        """Buffer one record (whole lines); rotates first when the file is full or old."""
        if self._fd is not None and (self._bytes >= self.max_bytes or self._clock() - self._opened_at >= self.max_seconds):
            self.close()
        if self._fd is None and not self._open():
            self.lost += 1
            return
        data = text.encode("utf-8", "surrogateescape")
        self._buffer += data
        self._ends.append(len(self._buffer))
        self._bytes += len(data)
        if len(self._buffer) >= _WRITE_THROUGH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered records to the OS (and fsync with `fsync_each_flush`)."""
        if self._fd is None or not self._buffer:
            return
        done = 0
        try:
            with memoryview(self._buffer) as data:
                while done < len(data):
                    done += os.write(self._fd, data[done:])
        except OSError as exc:
            self._fail(exc, f"cannot write to {self._path}", done)
            return
        self._settle(done)
        if self.fsync_each_flush:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._fail(exc, f"cannot fsync {self._path}")

    def rotate_if_old(self) -> None:
        if self._fd is not None and self._clock() - self._opened_at >= self.max_seconds:
            self.close()

    def close(self) -> None:
        """Flush, fsync and close the current file (counted, never raised, when that fails)."""
        self.flush()
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._fail(exc, f"cannot fsync {self._path}")
            return
        self._close_fd()

    def _settle(self, done: int) -> None:
        """`done` bytes of the buffer reached the file: count the records that fit in them, keep the rest."""
        whole = bisect.bisect_right(self._ends, done)
        self.written += whole
        del self._buffer[:done]
        self._ends = [end - done for end in self._ends[whole:]]

    def _fail(self, exc: OSError, what: str, done: int = 0, reason: str = "") -> None:
        self._settle(done)
        self.lost += len(self._ends)
        self._buffer.clear()
        self._ends.clear()
        self._close_fd()
        self.errors += 1
        self.last_error = f"{what}: {reason or exc.strerror or exc}"
        self._retry_at = self._clock() + self.retry_seconds

    def _close_fd(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.close(fd)
        except OSError:
            pass

    def _open(self) -> bool:
        now = self._clock()
        if self._retry_at:
            if now < self._retry_at:
                return False
            self._retry_at = 0.0
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{now % 1:.6f}"[1:]
        self._seq += 1
        path = self.directory / f"{self.prefix}{stamp}Z-{os.getpid()}-{self._seq:06d}.tsv"
        if not self.prepare():
            return False
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self._fail(exc, f"cannot create a file in {self.directory}")
            return False
        self._path = path
        self._buffer += self.header.encode()
        self._opened_at, self._bytes = now, len(self.header)
        self.files_opened += 1
        self._prune()
        return True

    def _prune(self) -> None:
        if self.keep_files <= 0:
            return
        files = sorted(self.directory.glob(f"{self.prefix}*.tsv"))
        for old in files[: max(0, len(files) - self.keep_files)]:
            try:
                old.unlink()
            except OSError:
                log.warning("training log: could not delete %s", old)


class _Throttled:
    """An ERROR line at most once per `interval` seconds; what it held back is counted in the next one."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0
        self._held = 0

    def error(self, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self.interval
        suffix = f" ({held} more since the last message)" if held else ""
        log.error(message + suffix, *args, exc_info=exc_info)


class TrainingLog:
    """The bounded queue, the writer thread, and the two rotating files (see the module doc).

    `sinks` get every record after it is written (the online-metrics join); they run on the
    writer thread. With `directory` None nothing is written to disk (online metrics only).
    Best effort: nothing here raises into a request or into the shutdown (see docs/reliability.md).
    """

    def __init__(
        self, settings: LearningSettings, registry: CollectorRegistry | None = None, *, user_salt: str = "",
        directory: str | None = None, sinks: Sequence[Callable[[Any], None]] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        s = settings
        self.sample = s.training_log_sample
        self.queue_size = s.training_log_queue_size
        self.flush_seconds = s.training_log_flush_seconds
        self.retry_seconds = s.training_log_retry_seconds
        self._salt = user_salt  # the observability section's log_user_salt
        self._clock = clock
        self._sinks = list(sinks)
        self._queue: collections.deque[ServedRecord | EventsRecord] = collections.deque()
        self._stop = threading.Event()
        directory = s.training_log_dir if directory is None else directory
        self.directory = directory
        self._files: tuple[RotatingTsv, RotatingTsv] | None = None
        if directory:
            common = dict(
                max_bytes=s.training_log_max_file_bytes, max_seconds=s.training_log_max_file_seconds,
                keep_files=s.training_log_keep_files, fsync_each_flush=s.training_log_fsync, clock=clock,
                retry_seconds=s.training_log_retry_seconds,
            )
            self._files = (
                RotatingTsv(Path(directory), SERVED_PREFIX, SERVED_COLUMNS, **common),  # type: ignore[arg-type]
                RotatingTsv(Path(directory), EVENTS_PREFIX, EVENT_COLUMNS, **common),  # type: ignore[arg-type]
            )
        # Lists: one per Rerank; events: one per event (a row each).
        self.written = {"lists": 0, "events": 0}  # handed to the OS (flushed)
        self.dropped = {"lists": 0, "events": 0}  # queue full, or could not be written
        self.write_errors = 0
        self._counted = {"lists": (0, 0), "events": (0, 0)}  # (written, lost) of the files already in the metrics
        self._unfiled = {"lists": 0, "events": 0}  # records with no bytes to write (no directory, an empty list)
        self._errors_log = _Throttled(self.retry_seconds)
        self._bug_log = _Throttled(self.retry_seconds)
        registry = registry if registry is not None else CollectorRegistry()
        self._written_metric = Counter(
            "reranker_training_log_records",
            "Training-log records written and flushed (handed to the OS), by kind (lists; events: one per event).",
            ["kind"], registry=registry,
        )
        self._dropped_metric = Counter(
            "reranker_training_log_dropped",
            "Training-log records dropped, by kind: the writer's queue was full, or writing failed (full disk, "
            "unusable training_log_dir).",
            ["kind"], registry=registry,
        )
        self._errors_metric = Counter(
            "reranker_training_log_write_errors",
            "Training-log file operations that failed (create, write, fsync: full disk, directory missing or not "
            "writable); records are dropped and a new file is tried every training_log_retry_seconds.",
            registry=registry,
        )
        self._cpu_metric = Counter(
            "reranker_training_log_cpu_seconds",
            "CPU time of the training-log writer thread (formatting, hashing, writing, the online-metrics join).",
            registry=registry,
        )
        for kind in ("lists", "events"):
            self._written_metric.labels(kind=kind)
            self._dropped_metric.labels(kind=kind)
        if self._files is not None:
            for f in self._files:
                f.prepare()
            self._count()
        self._thread = threading.Thread(target=self._run, name="training-log", daemon=True)
        self._thread.start()

    # --- request path --------------------------------------------------------------------------
    def served(self, query: RerankQuery, result: RerankResult) -> None:
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        self._put(ServedRecord(self._clock(), query, result), "lists", 1)

    def events(self, events: Sequence[Event]) -> None:
        self._put(EventsRecord(self._clock(), tuple(events)), "events", len(events))

    def _put(self, record: ServedRecord | EventsRecord, kind: str, n: int) -> None:
        if len(self._queue) >= self.queue_size or self._stop.is_set():  # racy by a few records: fine
            self.dropped[kind] += n
            self._dropped_metric.labels(kind=kind).inc(n)
            return
        self._queue.append(record)

    # --- writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            cpu_started = time.thread_time()
            stopping = self._stop.is_set()
            batch = self._drain()
            if batch:
                for record in batch:
                    try:
                        self._write(record)
                    except Exception:  # a bug in formatting: this record only
                        kind, n = ("lists", 1) if isinstance(record, ServedRecord) else ("events", len(record.events))
                        self._drop(kind, n)
                        self._bug_log.error("training log: a record could not be formatted; dropped", exc_info=True)
                    for sink in self._sinks:
                        try:
                            sink(record)
                        except Exception:
                            self._bug_log.error("training log: a sink failed on a record", exc_info=True)
            now = time.monotonic()
            if stopping or now - last_flush >= self.flush_seconds:
                self._flush()
                last_flush = now
            self._cpu_metric.inc(time.thread_time() - cpu_started)
            if stopping and not self._queue:
                break
            if not batch:
                self._stop.wait(_IDLE_POLL_S)

    def _drain(self, limit: int = 4096) -> list[ServedRecord | EventsRecord]:
        out = []
        queue = self._queue
        while queue and len(out) < limit:
            out.append(queue.popleft())
        return out

    def _flush(self) -> None:
        if self._files is not None:
            for f in self._files:
                f.flush()
                f.rotate_if_old()
        self._count()

    def _count(self) -> None:
        """Bring `written`, `dropped`, the error count and their metrics up to the files' counts."""
        for kind, n in self._unfiled.items():
            if n:
                self.written[kind] += n
                self._written_metric.labels(kind=kind).inc(n)
                self._unfiled[kind] = 0
        if self._files is None:
            return
        errors = 0
        for kind, f in zip(("lists", "events"), self._files):
            written, lost = self._counted[kind]
            if f.written > written:
                self.written[kind] += f.written - written
                self._written_metric.labels(kind=kind).inc(f.written - written)
            if f.lost > lost:
                self._drop(kind, f.lost - lost)
            self._counted[kind] = (f.written, f.lost)
            errors += f.errors
        if errors > self.write_errors:
            self._errors_metric.inc(errors - self.write_errors)
            self.write_errors = errors
            reasons = dict.fromkeys(f.last_error for f in self._files if f.last_error)
            self._errors_log.error(
                "training log: %s. Check --training-log-dir (RERANKER_TRAINING_LOG_DIR). Records are dropped and "
                "counted (reranker_training_log_dropped_total) and a new file is tried every %.0f s; serving is not "
                "affected", "; ".join(reasons), self.retry_seconds,
            )

    def _drop(self, kind: str, n: int) -> None:
        self.dropped[kind] += n
        self._dropped_metric.labels(kind=kind).inc(n)

    def _user(self, user_id: str) -> str:
        return user_hash(self._salt, user_id) if self._salt else _field(user_id)

    def _write(self, record: ServedRecord | EventsRecord) -> None:
        if isinstance(record, ServedRecord):
            text = served_rows(record, self._user(record.query.user_id)) if self._files is not None else ""
            if text:
                self._files[0].write(text)  # type: ignore[index]
            else:
                self._unfiled["lists"] += 1
            return
        if self._files is None:
            self._unfiled["events"] += len(record.events)
            return
        for row in event_lines(record, self._user):  # one record per event: each is counted on its own
            self._files[1].write(row)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, fsync and close the files. Idempotent; never raises (a failure is
        counted and logged), and never waits longer than `timeout` for a stuck writer."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("training log: the writer did not finish in %.0f s (a stuck disk?); its files are left open", timeout)
            return
        if self._files is not None:
            for f in self._files:
                f.close()
        self._count()


# "0".."4095" and, at index -1, "" (a candidate that was not returned): returned_rank without str() per row.
_RANK_TEXT = [str(i) for i in range(4096)] + [""]
_VARIANT_TEXT = {v: v.name.lower() for v in Variant}
_EVENT_TEXT = {t: t.name.lower() for t in EventType} | {EventType.UNSPECIFIED: "click"}


def served_rows(record: ServedRecord, user: str) -> str:
    """The rows of one served list (see the module doc), as one string of whole lines.

    This runs for every logged list, so it is written for speed: no per-row str() of floats
    (a float repr costs ~0.25-2 us, 100 of them per list were most of the writer's CPU). A score
    is written as an integer mantissa and a decimal exponent shared by the list, e.g.
    `125730221093393e-15`: exact to 16 significant digits of the list's largest |score|, and read
    back by float() like any number.
    """
    query, result = record.query, record.result
    candidates = CandidateColumns.of(query.candidates)
    ids, scores = candidates.item_ids, candidates.scores
    n = len(ids)
    if not n:
        return ""
    items = RankedItems.of(result.items)
    rank_of = np.full(n, -1, dtype=np.int64)  # returned rank by position in the request
    rank_of[items.original_ranks] = np.arange(len(items))
    if len(set(ids)) < n:  # duplicates: the first occurrence, as the service ranks them
        keep = np.asarray(scoring.first_occurrences(ids), dtype=np.int64)
        ids, scores, rank_of = [ids[i] for i in keep.tolist()], scores[keep], rank_of[keep]
    mantissas, exponent = _fixed_point(scores)
    rank_limit = len(_RANK_TEXT) - 1
    ranks = [_RANK_TEXT[r] if r < rank_limit else str(r) for r in rank_of.tolist()]
    joined = "".join(ids)
    if "\\" in joined or "\t" in joined or "\n" in joined or "\r" in joined:
        ids = [_field(i) for i in ids]
    list_id = _field(query.request_id or result.request_id) or uuid.uuid4().hex[:16]
    head = user + "\t"
    middle = f"e{exponent}\t\t{float(record.served_at)!r}\t{list_id}\t"
    tail = f"\t{_VARIANT_TEXT[result.variant]}\t{_field(result.model_version)}\t{result.arm}\t{len(ids)}\n"
    return "".join([f"{head}{i}\t{m}{middle}{r}{tail}" for i, m, r in zip(ids, mantissas.tolist(), ranks)])


def _fixed_point(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """(int64 mantissas, e) with mantissa * 10**e == score to 16 significant digits of max |score|."""
    largest = float(np.abs(scores).max()) if len(scores) else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return np.zeros(len(scores), dtype=np.int64), 0
    shift = 15 - math.floor(math.log10(largest))
    return np.rint(scores * 10.0**shift).astype(np.int64), -shift


def event_lines(record: EventsRecord, user: Callable[[str], str]) -> list[str]:
    """One line per event of the record."""
    out = []
    for e in record.events:
        ts = e.timestamp if e.timestamp > 0 else record.received_at
        kind = _EVENT_TEXT[e.type]
        out.append(f"{user(e.user_id)}\t{_field(e.item_id)}\t{float(ts)!r}\t{kind}\n")
    return out


def event_rows(record: EventsRecord, user: Callable[[str], str]) -> str:
    return "".join(event_lines(record, user))


# --- reading a log directory ----------------------------------------------------------------------
@dataclass
class TrainingLogData:
    """What `read_training_log` found: events (time order), served lists (time order), and what it skipped."""

    events: list[Interaction] = field(default_factory=list)
    lists: list[ServedList] = field(default_factory=list)
    # Per list id: (variant, model_version, arm, returned ranks per row (-1: not returned)).
    served_as: dict[str, tuple[str, str, str, tuple[int, ...]]] = field(default_factory=dict)
    files: int = 0
    torn_lines: int = 0  # a last line without its newline (a crash while writing)
    incomplete_lists: int = 0  # fewer rows than list_size (a crash while writing)


def _complete_lines(path: Path) -> tuple[str, list[str], bool]:
    """(header, data lines, whether a torn last line was dropped). Only lines ending in a newline count."""
    data = path.read_bytes()
    end = data.rfind(b"\n")
    torn = end != len(data) - 1
    if end < 0:
        return "", [], bool(data)
    lines = data[: end + 1].decode("utf-8", "surrogateescape").split("\n")[:-1]
    return lines[0], lines[1:], torn


def log_files(directory: str | Path) -> list[Path]:
    """The files of a training-log directory (events, then served lists), each kind in time order."""
    directory = Path(directory)
    return sorted(directory.glob(f"{EVENTS_PREFIX}*.tsv")) + sorted(directory.glob(f"{SERVED_PREFIX}*.tsv"))


def read_training_log(directory: str | Path, *, variants: Iterable[str] | None = None) -> TrainingLogData:
    """Events and served lists of a training-log directory (every file, in time order).

    `variants`: keep only lists served with these variants (e.g. {"control", "reranked"});
    default all. Raises FormatError naming the file and line for a row that is not a torn tail.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FormatError(f"{directory}: training log directory does not exist")
    out = TrainingLogData()
    for path in log_files(directory):
        part = read_log_file(path, variants=variants)
        out.files += 1
        out.events.extend(part.events)
        out.lists.extend(part.lists)
        out.served_as.update(part.served_as)
        out.torn_lines += part.torn_lines
        out.incomplete_lists += part.incomplete_lists
    out.events.sort(key=lambda e: e.timestamp)  # stable: ties keep file order
    out.lists.sort(key=lambda s: s.timestamp or 0.0)
    return out


def read_log_file(path: Path, *, variants: Iterable[str] | None = None) -> TrainingLogData:
    """One file of a training-log directory (an events-* or a served-* file), rows in file order."""
    keep = None if variants is None else set(variants)
    out = TrainingLogData(files=1)
    header, lines, torn = _complete_lines(path)
    out.torn_lines += torn
    if path.name.startswith(EVENTS_PREFIX):
        out.events = [_event(path, number, line) for number, line in enumerate(lines, start=2)]
    elif header:
        for served, meta, complete in _served_lists(path, header, lines):
            if not complete:
                out.incomplete_lists += 1
            elif keep is None or meta[0] in keep:
                out.lists.append(served)
                out.served_as[served.list_id] = meta
    return out


def _event(path: Path, number: int, line: str) -> Interaction:
    parts = line.split("\t")
    if len(parts) != len(EVENT_COLUMNS) or not parts[0] or not parts[1] or parts[3] not in EVENT_TYPES:
        raise FormatError(f"{path}:{number}: not an events row: {line[:80]!r}")
    try:
        return Interaction(unescape(parts[0]), unescape(parts[1]), float(parts[2]), parts[3])
    except ValueError:
        raise FormatError(f"{path}:{number}: timestamp {parts[2]!r} is not a number") from None


def _served_lists(
    path: Path, header: str, lines: list[str]
) -> Iterator[tuple[ServedList, tuple[str, str, str, tuple[int, ...]], bool]]:
    names = header.split("\t")
    if tuple(names[: len(SERVED_COLUMNS)]) != SERVED_COLUMNS:
        raise FormatError(f"{path}:1: not a training-log served file (header {header[:80]!r})")
    width = len(SERVED_COLUMNS)
    current: list[list[str]] = []

    def emit() -> Iterator[tuple[ServedList, tuple[str, str, str, tuple[int, ...]], bool]]:
        first = current[0]
        rows = tuple(CandidateRow(unescape(p[1]), float(p[2])) for p in current)
        ranks = tuple(int(p[6]) if p[6] else -1 for p in current)
        served = ServedList(unescape(first[5]), unescape(first[0]), float(first[4]), rows)
        yield served, (first[7], unescape(first[8]), first[9], ranks), len(rows) == int(first[10])

    for number, line in enumerate(lines, start=2):
        parts = line.split("\t")
        if len(parts) < width or not parts[0] or not parts[1] or not parts[5]:
            raise FormatError(f"{path}:{number}: not a served-list row: {line[:80]!r}")
        try:
            float(parts[2]), float(parts[4]), int(parts[10])
            if parts[6]:
                int(parts[6])
        except ValueError:
            raise FormatError(f"{path}:{number}: score, timestamp, returned_rank or list_size is not a number") from None
        if current and (parts[5] != current[0][5] or parts[0] != current[0][0]):
            yield from emit()  # a new list began before this one had all its rows
            current = []
        current.append(parts)
        if len(current) == int(current[0][10]):  # complete (list ids repeated by a caller stay apart)
            yield from emit()
            current = []
    if current:
        yield from emit()
