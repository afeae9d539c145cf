"""Event ingestion helpers shared by the RPCs (and usable by a stream consumer, e.g. Kafka).

Every path ends in `RerankService.record_events(events)`: a batch of validated `Event`s, applied
idempotently (by event id) and visible to the very next Rerank. A consumer of another stream only
has to turn its messages into `Event`s and call it with batches of any size up to
`max_events_per_request`.

`ready_batches` turns a blocking iterator (a gRPC request stream) into batches without waiting for
a batch to fill: a reader thread queues messages as they arrive and each batch is whatever is
queued (at least one, at most `max_batch`), plus what arrives within a millisecond. A trickle of
events is applied one by one, about a millisecond after each arrives; a flood in large batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()
# How long a batch waits for the next message of a stream. Batching amortizes the per-batch cost
# (vector lookups, locks) ~5x under load; a lone event waits this long at most.
LINGER_S = 0.001


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def ready_batches(
    messages: Iterable[T], max_batch: int, linger_s: float = LINGER_S, max_queued: int | None = None
) -> Iterator[list[T]]:
    """Yield lists of the messages available so far (1..max_batch), in order, until the end.

    A batch closes when `max_batch` messages are in it, or when no further message arrived within
    `linger_s` of the previous one.
    """
    pending: queue.Queue[object] = queue.Queue(maxsize=max_queued or 2 * max_batch)
    stop = threading.Event()

    def read() -> None:
        try:
            for message in messages:
                while not stop.is_set():
                    try:
                        pending.put(message, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            pending.put(_END)
        except BaseException as exc:  # the stream broke (client cancelled, ...): hand it to the consumer
            pending.put(_Failed(exc))

    reader = threading.Thread(target=read, name="event-stream-reader", daemon=True)
    reader.start()
    try:
        done = False
        while not done:
            batch: list[T] = []
            item = pending.get()
            while True:
                if item is _END:
                    done = True
                    break
                if isinstance(item, _Failed):
                    raise item.exc
                batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= max_batch:
                    break
                try:
                    item = pending.get(timeout=linger_s)
                except queue.Empty:
                    break
            if batch:
                yield batch
    finally:
        stop.set()
