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

User ids: with `log_user_salt` set, both files carry `observability.user_hash(salt, user_id)`
(the access log's hash), so lists and events still join, and a log trained on never sees raw ids.
Tabs and line breaks inside ids become spaces (a row is always one line).

Durability (the fsync policy):
- the writer thread hands each batch to the OS (one write + flush) at least every
  `training_log_flush_seconds`; a process crash (SIGKILL, OOM kill) loses at most the records of
  the last interval plus those still queued; what was flushed survives (page cache);
- a file is fsynced when it is closed (rotation, shutdown); with `training_log_fsync` every flush
  is fsynced too, which bounds a machine crash (power loss) the same way;
- a crash can leave a last line without its newline, or a list with fewer rows than its
  `list_size`: `read_training_log` never takes either as data. A restarted server never appends to
  an old file (it starts new ones), so a torn tail stays a tail.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import random
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
from reranker.config import Settings
from reranker.evaluation.formats import EVENT_TYPES, CandidateRow, FormatError, Interaction, ServedList
from reranker.serving.observability import user_hash
from reranker.types import CandidateColumns, Event, EventType, RankedItems, RerankQuery, RerankResult, Variant

log = logging.getLogger(__name__)

SERVED_COLUMNS = (
    "user_id", "item_id", "score", "label", "timestamp", "list_id",
    "returned_rank", "variant", "model_version", "arm", "list_size",
)
EVENT_COLUMNS = ("user_id", "item_id", "timestamp", "event_type")
SERVED_PREFIX, EVENTS_PREFIX = "served-", "events-"
_IDLE_POLL_S = 0.05
_CLEAN = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


def _field(text: str) -> str:
    return text.translate(_CLEAN) if ("\t" in text or "\n" in text or "\r" in text) else text


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
    """Append-only TSV files of one kind, rotated by size and age; never reopens an old file."""

    def __init__(
        self, directory: Path, prefix: str, header: Sequence[str], *, max_bytes: int, max_seconds: float,
        keep_files: int = 0, fsync_each_flush: bool = False, clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory, self.prefix, self.header = directory, prefix, "\t".join(header) + "\n"
        self.max_bytes, self.max_seconds, self.keep_files = max_bytes, max_seconds, keep_files
        self.fsync_each_flush = fsync_each_flush
        self._clock = clock
        self._fh: Any = None
        self._opened_at = 0.0
        self._bytes = 0
        self._seq = 0
        self.files_opened = 0
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, text: str) -> None:
        """Append whole lines (buffered until `flush`); rotates first when the file is full or old."""
        if self._fh is not None and (self._bytes >= self.max_bytes or self._clock() - self._opened_at >= self.max_seconds):
            self.close()
        if self._fh is None:
            self._open()
        data = text.encode("utf-8", "surrogateescape")
        self._fh.write(data)
        self._bytes += len(data)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            if self.fsync_each_flush:
                os.fsync(self._fh.fileno())

    def rotate_if_old(self) -> None:
        if self._fh is not None and self._clock() - self._opened_at >= self.max_seconds:
            self.close()

    def close(self) -> None:
        if self._fh is None:
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None

    def _open(self) -> None:
        now = self._clock()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{now % 1:.6f}"[1:]
        self._seq += 1
        path = self.directory / f"{self.prefix}{stamp}Z-{os.getpid()}-{self._seq:06d}.tsv"
        # Buffered far beyond one batch: the writer decides when bytes reach the OS (flush).
        self._fh = open(path, "xb", buffering=1 << 20)  # noqa: SIM115 (closed by close())
        self._fh.write(self.header.encode())
        self._opened_at, self._bytes = now, len(self.header)
        self.files_opened += 1
        self._prune()

    def _prune(self) -> None:
        if self.keep_files <= 0:
            return
        files = sorted(self.directory.glob(f"{self.prefix}*.tsv"))
        for old in files[: max(0, len(files) - self.keep_files)]:
            try:
                old.unlink()
            except OSError:
                log.warning("training log: could not delete %s", old)


class TrainingLog:
    """The bounded queue, the writer thread, and the two rotating files (see the module doc).

    `sinks` get every record after it is written (the online-metrics join); they run on the
    writer thread. With `directory` None nothing is written to disk (online metrics only).
    """

    def __init__(
        self, settings: Settings, registry: CollectorRegistry | None = None, *,
        directory: str | None = None, sinks: Sequence[Callable[[Any], None]] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        s = settings
        self.sample = s.training_log_sample
        self.queue_size = s.training_log_queue_size
        self.flush_seconds = s.training_log_flush_seconds
        self._salt = s.log_user_salt
        self._clock = clock
        self._sinks = list(sinks)
        self._queue: collections.deque[ServedRecord | EventsRecord] = collections.deque()
        self._stop = threading.Event()
        directory = s.training_log_dir if directory is None else directory
        self._files: tuple[RotatingTsv, RotatingTsv] | None = None
        if directory:
            common = dict(
                max_bytes=s.training_log_max_file_bytes, max_seconds=s.training_log_max_file_seconds,
                keep_files=s.training_log_keep_files, fsync_each_flush=s.training_log_fsync, clock=clock,
            )
            self._files = (
                RotatingTsv(Path(directory), SERVED_PREFIX, SERVED_COLUMNS, **common),  # type: ignore[arg-type]
                RotatingTsv(Path(directory), EVENTS_PREFIX, EVENT_COLUMNS, **common),  # type: ignore[arg-type]
            )
        self.written = {"lists": 0, "events": 0}  # records handed to the OS (flushed)
        self.dropped = {"lists": 0, "events": 0}
        registry = registry if registry is not None else CollectorRegistry()
        self._written_metric = Counter(
            "reranker_training_log_records", "Training-log records written and flushed, by kind (lists, events).",
            ["kind"], registry=registry,
        )
        self._dropped_metric = Counter(
            "reranker_training_log_dropped",
            "Training-log records dropped because the writer's queue was full (or the writer failed), by kind.",
            ["kind"], registry=registry,
        )
        self._cpu_metric = Counter(
            "reranker_training_log_cpu_seconds",
            "CPU time of the training-log writer thread (formatting, hashing, writing, the online-metrics join).",
            registry=registry,
        )
        for kind in ("lists", "events"):
            self._written_metric.labels(kind=kind)
            self._dropped_metric.labels(kind=kind)
        self._thread = threading.Thread(target=self._run, name="training-log", daemon=True)
        self._thread.start()

    # --- request path --------------------------------------------------------------------------
    def served(self, query: RerankQuery, result: RerankResult) -> None:
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        self._put(ServedRecord(self._clock(), query, result), "lists")

    def events(self, events: Sequence[Event]) -> None:
        self._put(EventsRecord(self._clock(), tuple(events)), "events")

    def _put(self, record: ServedRecord | EventsRecord, kind: str) -> None:
        if len(self._queue) >= self.queue_size or self._stop.is_set():  # racy by a few records: fine
            self.dropped[kind] += 1
            self._dropped_metric.labels(kind=kind).inc()
            return
        self._queue.append(record)

    # --- writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        last_flush = time.monotonic()
        pending = {"lists": 0, "events": 0}
        while True:
            cpu_started = time.thread_time()
            stopping = self._stop.is_set()
            batch = self._drain()
            if batch:
                for record in batch:
                    try:
                        pending[self._write(record)] += 1
                    except Exception:
                        log.exception("training log: a record could not be written; dropped")
                        kind = "lists" if isinstance(record, ServedRecord) else "events"
                        self.dropped[kind] += 1
                        self._dropped_metric.labels(kind=kind).inc()
                    for sink in self._sinks:
                        try:
                            sink(record)
                        except Exception:
                            log.exception("training log: a sink failed on a record")
            now = time.monotonic()
            if stopping or now - last_flush >= self.flush_seconds:
                self._flush(pending)
                last_flush = now
                if self._files is not None:
                    for f in self._files:
                        f.rotate_if_old()
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

    def _flush(self, pending: dict[str, int]) -> None:
        if self._files is not None:
            for f in self._files:
                try:
                    f.flush()
                except OSError:
                    log.exception("training log: flush failed")
        for kind, n in pending.items():
            if n:
                self.written[kind] += n
                self._written_metric.labels(kind=kind).inc(n)
                pending[kind] = 0

    def _user(self, user_id: str) -> str:
        return user_hash(self._salt, user_id) if self._salt else _field(user_id)

    def _write(self, record: ServedRecord | EventsRecord) -> str:
        if isinstance(record, ServedRecord):
            if self._files is not None:
                text = served_rows(record, self._user(record.query.user_id))
                if text:
                    self._files[0].write(text)
            return "lists"
        if self._files is not None:
            self._files[1].write(event_rows(record, self._user))
        return "events"

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, fsync and close the files. Idempotent."""
        self._stop.set()
        self._thread.join(timeout)
        if self._files is not None:
            for f in self._files:
                f.close()


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
    if "\t" in joined or "\n" in joined or "\r" in joined:
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


def event_rows(record: EventsRecord, user: Callable[[str], str]) -> str:
    out = []
    for e in record.events:
        ts = e.timestamp if e.timestamp > 0 else record.received_at
        kind = _EVENT_TEXT[e.type]
        out.append(f"{user(e.user_id)}\t{_field(e.item_id)}\t{float(ts)!r}\t{kind}\n")
    return "".join(out)


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
        return Interaction(parts[0], parts[1], float(parts[2]), parts[3])
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
        rows = tuple(CandidateRow(p[1], float(p[2])) for p in current)
        ranks = tuple(int(p[6]) if p[6] else -1 for p in current)
        served = ServedList(first[5], first[0], float(first[4]), rows)
        yield served, (first[7], first[8], first[9], ranks), len(rows) == int(first[10])

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
