"""ItemEncoding: item texts -> vectors through the micro-batcher, into the item cache.

Every encode lands in the item cache when the encoder finishes it, whether its caller is still
waiting or not. Under CPU pressure the encoder can be slower than the callers' deadlines: the
callers fail open, but the vectors that arrive afterwards are kept, so the cache warms up and
later requests for those items are personalized (instead of falling back for as long as the
pressure lasts).

- One encode in flight per (item id, text): a request that needs a text already being encoded
  waits for that encode instead of queueing the text again.
- A caller that stops waiting (timeout, cancellation) leaves its queued work behind as late work
  (`MicroBatcher.set_late`): bounded by the encoder queue, run only while no caller waits for the
  encoder, dropped first when callers need the room. With `late_fill=False` that work is dropped
  at once instead (what already ran still fills the cache).
- `schedule` queues texts nobody waits for (a fail-open answer's candidates): late from the start,
  never refused to a caller, deduplicated with what is in flight.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from typing import Protocol

import numpy as np

from reranker.errors import EncodeTimeout, Overloaded, RequestCancelled
from reranker.model.batching import MicroBatcher
from reranker.model.items import ItemVectorCache

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (item id, text)


class Cancellation(Protocol):
    """What ItemEncoding needs of a cancel token (reranker.cancellation.CancelToken)."""

    @property
    def cancelled(self) -> bool: ...

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]: ...


class ItemEncoding:
    def __init__(self, batcher: MicroBatcher, items: ItemVectorCache, *, late_fill: bool, chunk: int) -> None:
        """`chunk`: most texts per batcher job (a request larger than the queue still fits in parts)."""
        self._batcher = batcher
        self._items = items
        self._late_fill = late_fill
        self._chunk = max(1, chunk)
        # RLock: cancelling a future under the lock runs its done-callback, which takes the lock again.
        self._lock = threading.RLock()
        self._in_flight: dict[Key, tuple[Future[np.ndarray], int]] = {}  # key -> (future, row in its result)
        self._waiters: dict[Future[np.ndarray], int] = {}  # callers waiting on each in-flight future
        self.late_filled = 0  # texts that reached the cache after every caller had stopped waiting
        self.late_dropped = 0  # texts nobody waited for that were dropped unencoded

    @property
    def in_flight(self) -> int:
        """Texts queued or being encoded."""
        return len(self._in_flight)

    def encode(
        self, item_ids: Sequence[str], texts: Sequence[str], timeout_s: float, cancel: Cancellation | None = None
    ) -> np.ndarray:
        """Vectors of `texts[i]` (the text of `item_ids[i]`; pairs must be distinct); waits at most
        `timeout_s` and wakes at once on cancellation (EncodeTimeout, RequestCancelled). The vectors
        land in the item cache whenever they are ready, also after this call gave up."""
        if timeout_s <= 0:
            self.schedule(item_ids, texts)
            raise EncodeTimeout("no time left to encode")
        keys = list(zip(item_ids, texts))
        cached, created, where = self._join(keys)
        futures = list({entry[0]: None for entry in where if entry is not None})
        try:
            self._submit(created, late=False)
            results = _wait_all(futures, timeout_s, cancel, len(texts))
        finally:
            self._stop_waiting(futures)
        out = np.empty((len(keys), self._items.dim), dtype=np.float32)
        for i, entry in enumerate(where):
            out[i] = cached[keys[i]] if entry is None else results[entry[0]][entry[1]]
        return out

    def schedule(self, item_ids: Sequence[str], texts: Sequence[str]) -> int:
        """Queue texts nobody waits for (their vectors only fill the cache); returns how many were
        queued. Texts already in flight are skipped; with no free room in the queue, none are."""
        if not self._late_fill:
            return 0
        with self._lock:
            _, keys = self._cached([k for k in dict.fromkeys(zip(item_ids, texts)) if k not in self._in_flight])
            created = self._claim(keys)
        try:
            self._submit(created, late=True)
        except Overloaded:
            pass  # dropped and counted (the futures were cancelled)
        return len(keys) - sum(len(part) for future, part in created if future.cancelled())

    # --- internals ------------------------------------------------------------------------------
    def _cached(self, keys: list[Key]) -> tuple[dict[Key, np.ndarray], list[Key]]:
        """(vectors of the keys the cache holds, the other keys); caller holds the lock. Keys not in
        flight are looked up again: an encode may have landed since the caller's own lookup (it
        is cached before it leaves the in-flight table, so no text is ever in neither)."""
        if not keys:
            return {}, []
        vectors, hit = self._items.lookup([k[0] for k in keys], [k[1] for k in keys], count=False)
        cached = {k: vectors[i] for i, k in enumerate(keys) if hit[i]}
        return cached, [k for k in keys if k not in cached]

    def _join(
        self, keys: list[Key]
    ) -> tuple[dict[Key, np.ndarray], list[tuple[Future[np.ndarray], list[Key]]], list[tuple[Future[np.ndarray], int] | None]]:
        """Start waiting for `keys`: (vectors of those the cache holds, the chunks newly claimed for
        the others (not submitted yet), per key its (future, row) or None when cached). Keys already
        in flight join that encode, which becomes waited-for work again if it was late."""
        with self._lock:
            found = [self._in_flight.get(k) for k in keys]
            cached, missing = self._cached([k for k, f in zip(keys, found) if f is None])
            created = self._claim(missing)
            for future, _ in created:
                self._waiters[future] = 1
            for future in {f for f, _ in filter(None, found)}:  # join encodes already in flight
                if self._waiters.get(future, 0) == 0:
                    self._batcher.set_late(future, False)  # a caller waits for it again
                self._waiters[future] = self._waiters.get(future, 0) + 1
            where = [f if f is not None else self._in_flight.get(k) for k, f in zip(keys, found)]
        return cached, created, where

    def _claim(self, keys: list[Key]) -> list[tuple[Future[np.ndarray], list[Key]]]:
        """Register `keys` as in flight, one new future per chunk (caller holds the lock)."""
        created = []
        for start in range(0, len(keys), self._chunk):
            part = keys[start : start + self._chunk]
            future: Future[np.ndarray] = Future()
            for row, key in enumerate(part):
                self._in_flight[key] = (future, row)
            # partial over the keys, not the future: no future -> callback -> future cycle
            future.add_done_callback(functools.partial(self._landed, part))
            created.append((future, part))
        return created

    def _submit(self, created: list[tuple[Future[np.ndarray], list[Key]]], *, late: bool) -> None:
        """Queue each chunk; a chunk the batcher refuses fails (waited for) or is dropped (late),
        and so do the chunks after it."""
        for index, (future, part) in enumerate(created):
            try:
                self._batcher.submit([text for _, text in part], late=late, future=future)
            except Exception as exc:
                for later, _ in created[index:]:
                    if late:
                        later.cancel()
                    else:
                        later.set_exception(exc)
                raise

    def _stop_waiting(self, futures: list[Future[np.ndarray]]) -> None:
        """This caller no longer waits: work nobody waits for becomes late work (or is dropped)."""
        with self._lock:
            for future in futures:
                left = self._waiters.get(future)
                if left is None:
                    continue  # already landed
                if left > 1:
                    self._waiters[future] = left - 1
                    continue
                self._waiters[future] = 0
                if future.done():
                    continue
                if self._late_fill:
                    self._batcher.set_late(future)  # no-op when it is already running
                else:
                    future.cancel()  # drops it if still queued; a running job still fills the cache

    def _landed(self, keys: list[Key], future: Future[np.ndarray]) -> None:
        """Done-callback (the batcher's worker, or whoever cancelled): cache the vectors, then
        forget the in-flight entries (in that order: no moment where a text is in neither)."""
        try:
            vectors = None if future.cancelled() or future.exception() is not None else future.result()
            if vectors is not None:
                self._items.put([k[0] for k in keys], [k[1] for k in keys], vectors)
            with self._lock:
                late = self._waiters.pop(future, 0) == 0
                for key in keys:
                    entry = self._in_flight.get(key)
                    if entry is not None and entry[0] is future:
                        del self._in_flight[key]
                if late and vectors is not None:
                    self.late_filled += len(keys)
                elif late and future.cancelled():
                    self.late_dropped += len(keys)
        except Exception:  # a callback must never take the batcher's worker down
            log.exception("caching %d encoded item vectors failed", len(keys))


def _noop() -> None:
    pass


def _wait_all(
    futures: list[Future[np.ndarray]], timeout_s: float, cancel: Cancellation | None, texts: int
) -> dict[Future[np.ndarray], np.ndarray]:
    """Each future's vectors, once all are done; EncodeTimeout after `timeout_s`, RequestCancelled
    at once on cancellation, Overloaded when queued work was dropped."""
    done = _AllDone(futures)
    unregister = cancel.on_cancel(done.wake) if cancel is not None else _noop
    try:
        if not done.wait(timeout_s):
            raise EncodeTimeout(f"encoding {texts} texts took longer than {timeout_s * 1000:.0f} ms")
        if cancel is not None and cancel.cancelled:
            raise RequestCancelled("the caller cancelled the request")
        try:
            return {f: f.result() for f in futures}
        except CancelledError:
            raise Overloaded("queued encoder work was dropped under overload") from None
    finally:
        unregister()


class _AllDone:
    """Waits until every future is done, or until `wake()` (cancellation), whichever comes first."""

    def __init__(self, futures: Sequence[Future[np.ndarray]]) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._left = len(futures)
        if not futures:
            self._event.set()
        for f in futures:
            f.add_done_callback(self._one_done)

    def _one_done(self, _future: Future[np.ndarray]) -> None:
        with self._lock:
            self._left -= 1
            if self._left <= 0:
                self._event.set()

    def wake(self) -> None:
        self._event.set()

    def wait(self, timeout_s: float) -> bool:
        return self._event.wait(timeout_s)
