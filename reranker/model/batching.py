"""Micro-batcher between request threads and the encoder.

Request threads submit lists of texts and get a Future; one worker thread drains the queue into
batches of at most `max_batch` texts (waiting at most `max_wait_s` for a batch to fill), sorts
each batch by length so padding is minimal, encodes, and resolves the futures. A bounded number
of pending texts turns overload into an immediate `Overloaded` instead of unbounded queueing.

Tokenization stays off the model's critical section: when the encoder can tokenize separately
(`TokenizingEncoder`), the submitting request thread tokenizes (the Rust tokenizer releases the
GIL) and the worker only pads token ids (numpy) and runs forward passes; batches are sorted by
token count. Other encoders get whole texts, sorted by character length.

A job whose future is cancelled before the worker takes it leaves the queue at once and is never
encoded.

Late work: a job nobody waits for any more (its caller's deadline passed, or the caller left) can
be marked late (`set_late`), and texts can be submitted late from the start (`submit(late=True)`:
tokenized by the worker, not the submitter). Late jobs still count against `max_pending`, run
only while no waited-for job is queued, and are dropped, oldest first, when a waited-for job
needs their room: late work never delays or refuses a caller that waits. A late submission that
finds no free room is refused (Overloaded); it never pushes anything out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from reranker.model.encoder import Encoder, supports_token_ids
from reranker.model.items import unusable_rows
from reranker.errors import EncoderFailed, Overloaded, RerankerError

log = logging.getLogger(__name__)

FAILURE_LOG_INTERVAL_S = 10.0  # reported encoder failures (a server down) are logged this often at most


@dataclass
class _Job:
    texts: list[str]
    token_ids: list[list[int]] | None = None
    future: Future[np.ndarray] = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    late: bool = False  # nobody waits for it: runs after waited-for work, dropped first


@dataclass
class BatcherStats:
    batches: int = 0
    texts: int = 0
    last_batch_size: int = 0
    last_queue_wait_s: float = 0.0
    late_dropped: int = 0  # late texts pushed out of the queue by waited-for work


class MicroBatcher:
    def __init__(
        self,
        encoder: Encoder,
        *,
        max_batch: int,
        max_wait_s: float,
        max_pending: int,
        observer: Callable[[int, float, float, bool], None] | None = None,
    ) -> None:
        """`observer(texts, queue_wait_s, encode_s, ok)` is called after every batch (metrics)."""
        self._encoder = encoder
        self._observer = observer
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_pending = max_pending
        self._jobs: deque[_Job] = deque()  # waited for
        self._late: deque[_Job] = deque()  # nobody waits: oldest first
        self._pending_texts = 0  # both queues
        self._late_texts = 0
        self._cond = threading.Condition()
        self._closed = False
        self.stats = BatcherStats()
        self._quiet_until = 0.0  # reported failures are not logged before this (monotonic) time
        self._unlogged_failures = 0
        self._tokenize_early = supports_token_ids(encoder)
        self._thread = threading.Thread(target=self._run, name="encoder-batcher", daemon=True)
        self._thread.start()

    @property
    def pending_texts(self) -> int:
        """Texts queued, late ones included."""
        return self._pending_texts

    @property
    def late_texts(self) -> int:
        """Queued texts nobody waits for."""
        return self._late_texts

    def submit(
        self, texts: list[str], *, late: bool = False, future: Future[np.ndarray] | None = None
    ) -> Future[np.ndarray]:
        """Queue texts for encoding; the result arrives on `future` (a new one when not given).

        Raises Overloaded when the queue is full: for waited-for texts, even after dropping every
        late job; late texts are refused when there is no free room."""
        job = _Job(list(texts), future=future if future is not None else Future(), late=late)
        if not job.texts:
            job.future.set_result(np.zeros((0, self._encoder.dim), dtype=np.float32))
            return job.future
        if self._tokenize_early and not late:  # late work is tokenized by the worker
            self._check_capacity(len(job.texts), late)  # cheap early refusal before tokenizing
            try:
                job.token_ids = self._encoder.token_ids(job.texts)  # type: ignore[attr-defined]
            except Exception as exc:
                raise EncoderFailed(f"tokenizer error: {exc}") from exc
        with self._cond:
            if self._closed:
                raise EncoderFailed("encoder is shut down")
            self._check_capacity(len(job.texts), late)
            dropped = self._drop_late_for(len(job.texts)) if not late else []
            (self._late if late else self._jobs).append(job)
            self._pending_texts += len(job.texts)
            if late:
                self._late_texts += len(job.texts)
            self._cond.notify()
        for old in dropped:  # outside the lock: cancelling runs the futures' callbacks
            old.future.cancel()
        # A bound method, not a closure over `job`: future -> callback -> job -> future would be a
        # reference cycle that keeps every result array alive until the cyclic GC runs.
        job.future.add_done_callback(self._drop_if_cancelled)
        return job.future

    def set_late(self, future: Future[np.ndarray], late: bool = True) -> bool:
        """Mark a queued job late (nobody waits for it any more) or waited-for again. False when
        the job is not queued (running, done, dropped)."""
        with self._cond:
            source, target = (self._jobs, self._late) if late else (self._late, self._jobs)
            for index, job in enumerate(source):
                if job.future is future:
                    del source[index]
                    job.late = late
                    target.append(job)
                    self._late_texts += len(job.texts) if late else -len(job.texts)
                    return True
        return False

    def _check_capacity(self, count: int, late: bool) -> None:
        pending = self._pending_texts
        room = self._max_pending - pending + (0 if late else self._late_texts)
        if count > room:
            raise Overloaded(f"encoder queue full ({pending} texts pending, limit {self._max_pending})")

    def _drop_late_for(self, count: int) -> list[_Job]:
        """Take late jobs out of the queue, oldest first, until `count` more texts fit (caller holds
        the lock and checked that they can)."""
        dropped = []
        while self._pending_texts + count > self._max_pending and self._late:
            job = self._late.popleft()
            self._pending_texts -= len(job.texts)
            self._late_texts -= len(job.texts)
            self.stats.late_dropped += len(job.texts)
            dropped.append(job)
        return dropped

    def _drop_if_cancelled(self, future: Future[np.ndarray]) -> None:
        """Done-callback: a job cancelled while still queued is removed and its texts un-counted."""
        if not future.cancelled():
            return
        with self._cond:
            for queue in (self._jobs, self._late):
                for index, job in enumerate(queue):
                    if job.future is future:
                        del queue[index]
                        self._pending_texts -= len(job.texts)
                        if job.late:
                            self._late_texts -= len(job.texts)
                        return
            # not found: already taken by the worker (which skips cancelled jobs), or dropped

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        with self._cond:
            leftover = [*self._jobs, *self._late]
            self._jobs, self._late = deque(), deque()
            self._pending_texts = self._late_texts = 0
        for job in leftover:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EncoderFailed("encoder is shut down"))

    def _take_batch(self) -> list[_Job] | None:
        """Waited-for jobs (after waiting up to max_wait for the batch to fill); late jobs only
        when no waited-for job is queued."""
        with self._cond:
            while not self._jobs and not self._late and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            if self._jobs:
                deadline = self._jobs[0].enqueued_at + self._max_wait_s
                while self._pending_texts - self._late_texts < self._max_batch and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            queue = self._jobs if self._jobs else self._late
            jobs, count = [], 0
            while queue and (not jobs or count + len(queue[0].texts) <= self._max_batch):
                job = queue.popleft()
                self._pending_texts -= len(job.texts)
                if job.late:
                    self._late_texts -= len(job.texts)
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled in the meantime: never encode it
                jobs.append(job)
                count += len(job.texts)
            return jobs

    def _tokenized(self, jobs: list[_Job]) -> list[_Job]:
        """Jobs submitted late come untokenized: tokenize them here; one that fails fails alone."""
        ready = []
        for job in jobs:
            if job.token_ids is None:
                try:
                    job.token_ids = self._encoder.token_ids(job.texts)  # type: ignore[attr-defined]
                except Exception as exc:
                    job.future.set_exception(EncoderFailed(f"tokenizer error: {exc}"))
                    continue
            ready.append(job)
        return ready

    def _run(self) -> None:
        while True:
            jobs = self._take_batch()
            if jobs is None:
                return
            if jobs and self._tokenize_early:
                jobs = self._tokenized(jobs)
            if jobs:
                self._encode_jobs(jobs)

    def _encode_jobs(self, jobs: list[_Job]) -> None:
        """Encode the jobs' texts as one batch; each job's future gets its rows, or the batch's error."""
        texts = [t for job in jobs for t in job.texts]
        encode_started = time.monotonic()
        self.stats.last_queue_wait_s = encode_started - jobs[0].enqueued_at
        try:
            if self._tokenize_early:
                vectors = self._encode_sorted([ids for job in jobs for ids in job.token_ids or ()], True)
            else:
                vectors = self._encode_sorted(texts, False)
        except Exception as exc:  # the encoder failing must not kill the worker
            self._observe(len(texts), encode_started, ok=False)
            self._log_failure(exc, len(texts))
            error = exc if isinstance(exc, (EncoderFailed, Overloaded)) else EncoderFailed(f"encoder error: {exc}")
            for job in jobs:
                job.future.set_exception(error)
            return
        self._observe(len(texts), encode_started, ok=True)
        self.stats.batches += 1
        self.stats.texts += len(texts)
        self.stats.last_batch_size = len(texts)
        start = 0
        for job in jobs:
            end = start + len(job.texts)
            job.future.set_result(vectors[start:end])
            start = end

    def _log_failure(self, exc: Exception, size: int) -> None:
        """An unexpected error with its traceback; a failure the encoder reported itself (a remote server
        down, overloaded) in one line, at most one per FAILURE_LOG_INTERVAL_S with a count of the rest."""
        if not isinstance(exc, RerankerError):
            log.exception("encoder failed on a batch of %d texts", size)
            return
        now = time.monotonic()
        if now < self._quiet_until:
            self._unlogged_failures += 1
            return
        more = f" ({self._unlogged_failures} more failed batches not logged)" if self._unlogged_failures else ""
        log.warning("encoder failed on a batch of %d texts: %s%s", size, exc, more)
        self._quiet_until, self._unlogged_failures = now + FAILURE_LOG_INTERVAL_S, 0

    def _observe(self, size: int, encode_started: float, *, ok: bool) -> None:
        if self._observer is not None:
            try:
                self._observer(size, self.stats.last_queue_wait_s, time.monotonic() - encode_started, ok)
            except Exception:  # metrics must never break encoding
                log.exception("batch observer failed")

    def _encode_sorted(self, inputs: list[str] | list[list[int]], are_token_ids: bool) -> np.ndarray:
        """Encode in chunks of max_batch, length-sorted so each chunk pads little."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out = np.empty((len(inputs), self._encoder.dim), dtype=np.float32)
        encode = self._encoder.encode_ids if are_token_ids else self._encoder.encode  # type: ignore[attr-defined]
        for start in range(0, len(order), self._max_batch):
            idx = order[start : start + self._max_batch]
            vectors = np.asarray(encode([inputs[i] for i in idx]), dtype=np.float32)
            if vectors.shape != (len(idx), self._encoder.dim) or unusable_rows(vectors).any():
                raise EncoderFailed(f"encoder returned unusable output of shape {vectors.shape} (rows must be finite, "
                                    f"at most unit length)")
            out[idx] = vectors
        return out
