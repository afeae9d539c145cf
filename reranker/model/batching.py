"""Micro-batcher between request threads and the encoder.

Request threads submit lists of texts and get a Future; one worker thread drains the queue into
batches of at most `max_batch` texts (waiting at most `max_wait_s` for a batch to fill), sorts
each batch by length so padding is minimal, encodes, and resolves the futures. A bounded number
of pending texts turns overload into an immediate `Overloaded` instead of unbounded queueing.

Tokenization stays off the model's critical section: when the encoder can tokenize separately
(`TokenizingEncoder`), the submitting request thread tokenizes (the Rust tokenizer releases the
GIL) and the worker only pads token ids (numpy) and runs forward passes; batches are sorted by
token count. Other encoders get whole texts, sorted by character length.

A job whose future is cancelled before the worker takes it (caller gone or timed out) leaves the
queue at once and is never encoded.
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


@dataclass
class BatcherStats:
    batches: int = 0
    texts: int = 0
    last_batch_size: int = 0
    last_queue_wait_s: float = 0.0


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
        self._jobs: deque[_Job] = deque()
        self._pending_texts = 0
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
        return self._pending_texts

    def submit(self, texts: list[str]) -> Future[np.ndarray]:
        """Queue texts for encoding. Raises Overloaded when the queue is full."""
        job = _Job(list(texts))
        if not job.texts:
            job.future.set_result(np.zeros((0, self._encoder.dim), dtype=np.float32))
            return job.future
        if self._tokenize_early:
            self._check_capacity(len(job.texts))  # cheap early refusal before tokenizing
            try:
                job.token_ids = self._encoder.token_ids(job.texts)  # type: ignore[attr-defined]
            except Exception as exc:
                raise EncoderFailed(f"tokenizer error: {exc}") from exc
        with self._cond:
            if self._closed:
                raise EncoderFailed("encoder is shut down")
            self._check_capacity(len(job.texts))
            self._jobs.append(job)
            self._pending_texts += len(job.texts)
            self._cond.notify()
        # A bound method, not a closure over `job`: future -> callback -> job -> future would be a
        # reference cycle that keeps every result array alive until the cyclic GC runs.
        job.future.add_done_callback(self._drop_if_cancelled)
        return job.future

    def _check_capacity(self, count: int) -> None:
        pending = self._pending_texts
        if pending + count > self._max_pending:
            raise Overloaded(f"encoder queue full ({pending} texts pending, limit {self._max_pending})")

    def _drop_if_cancelled(self, future: Future[np.ndarray]) -> None:
        """Done-callback: a job cancelled while still queued is removed and its texts un-counted."""
        if not future.cancelled():
            return
        with self._cond:
            for index, job in enumerate(self._jobs):
                if job.future is future:
                    del self._jobs[index]
                    self._pending_texts -= len(job.texts)
                    return
            # not found: already taken by the worker, which skips cancelled jobs

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        with self._cond:
            leftover, self._jobs = list(self._jobs), deque()
            self._pending_texts = 0
        for job in leftover:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EncoderFailed("encoder is shut down"))

    def _take_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = self._jobs[0].enqueued_at + self._max_wait_s
            while self._pending_texts < self._max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            jobs, count = [], 0
            while self._jobs and (not jobs or count + len(self._jobs[0].texts) <= self._max_batch):
                job = self._jobs.popleft()
                self._pending_texts -= len(job.texts)
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled in the meantime: never encode it
                jobs.append(job)
                count += len(job.texts)
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take_batch()
            if jobs is None:
                return
            if not jobs:
                continue
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
                continue
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
