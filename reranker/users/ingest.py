"""Event ingestion helpers shared by the RPCs (and usable by a stream consumer, e.g. Kafka).

Every path ends in `RerankService.record_events(events)`: a batch of validated `Event`s, applied
idempotently (by event id) and visible to the very next Rerank. A consumer of another stream only
has to turn its messages into `Event`s and call it with batches of any size up to
`max_events_per_request`.

`ready_batches` turns an async message stream (a gRPC request stream) into batches without waiting
for a batch to fill: a reader task queues messages as they arrive and each batch is whatever is
queued (at least one, at most `max_batch`), plus what arrives within a millisecond. A trickle of
events is applied one by one, about a millisecond after each arrives; a flood in large batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar

T = TypeVar("T")

_END = object()
# How long a batch waits for the next message of a stream. Batching amortizes the per-batch cost
# (vector lookups, locks) ~5x under load; a lone event waits this long at most.
LINGER_S = 0.001


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def ready_batches(
    messages: AsyncIterable[T], max_batch: int, linger_s: float = LINGER_S, max_queued: int | None = None
) -> AsyncIterator[list[T]]:
    """Yield lists of the messages available so far (1..max_batch), in order, until the end.

    A batch closes when `max_batch` messages are in it, or when no further message arrived within
    `linger_s` of the batch's last one. At most `max_queued` (default 2 * max_batch) messages are
    read ahead of the consumer.
    """
    pending: asyncio.Queue[object] = asyncio.Queue(maxsize=max_queued or 2 * max_batch)

    async def read() -> None:
        try:
            async for message in messages:
                await pending.put(message)
            await pending.put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the stream broke (client cancelled, ...): hand it to the consumer
            await pending.put(_Failed(exc))

    reader = asyncio.ensure_future(read())
    try:
        done = False
        while not done:
            batch: list[T] = []
            item = await pending.get()
            while True:
                if item is _END:
                    done = True
                    break
                if isinstance(item, _Failed):
                    raise item.exc
                batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= max_batch:
                    break
                if pending.empty():
                    await asyncio.sleep(linger_s)  # give the next message a moment to arrive
                    if pending.empty():
                        break
                item = pending.get_nowait()
            if batch:
                yield batch
    finally:
        reader.cancel()
