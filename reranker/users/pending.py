"""Events acknowledged while Redis was unreachable, kept in a file across a restart.

During a Redis outage a replica acknowledges events into its in-process replay buffer and writes
them into Redis once it answers again. If the process is stopped before that (SIGTERM during the
outage), `RedisProfileStore.close` writes what is still buffered to `<snapshot_path>.redis-pending`
(a temporary file, fsync, rename: a crash leaves the old file or the new one, never half of one).
The next start reads it back into the replay buffer, and the file is removed only after those
events have been written into Redis. Replaying an event twice is harmless: event ids de-duplicate.

A file that cannot be read is renamed aside (`.unreadable`), never deleted, and logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reranker.fileio import fsync_dir
from reranker.types import Event, EventType

log = logging.getLogger(__name__)

FORMAT = "reranker-redis-pending/1"


class PendingEvents:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def save(self, events: Sequence[tuple[Event, np.ndarray | None]]) -> None:
        rows = [
            {"user_id": e.user_id, "item_id": e.item_id, "type": int(e.type), "timestamp": e.timestamp,
             "event_id": e.event_id, "text": e.text, "weight": e.weight}
            for e, _ in events
        ]
        dim = next((len(v) for _, v in events if v is not None), 0)
        vectors = np.zeros((len(events), dim), dtype=np.float32)
        has_vector = np.zeros(len(events), dtype=bool)
        for i, (_, vector) in enumerate(events):
            if vector is not None and len(vector) == dim:
                vectors[i], has_vector[i] = vector, True
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            np.savez(out, header=np.frombuffer(json.dumps({"format": FORMAT, "events": rows}).encode(), dtype=np.uint8),
                     vectors=vectors, has_vector=has_vector)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        log.info("kept %d events for Redis in %s until the next start", len(events), self.path)

    def load(self, dim: int) -> list[tuple[Event, np.ndarray | None]]:
        if not self.path.exists():
            return []
        try:
            with np.load(self.path, allow_pickle=False) as data:
                header = json.loads(data["header"].tobytes())
                vectors, has_vector = data["vectors"], data["has_vector"]
            if header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format')!r}")
            rows = header["events"]
            out: list[tuple[Event, np.ndarray | None]] = []
            for i, row in enumerate(rows):
                event = Event(row["user_id"], row["item_id"], EventType(row["type"]), float(row["timestamp"]),
                              row["event_id"], row["text"], row["weight"])
                usable = bool(has_vector[i]) and vectors.shape[1] == dim and np.isfinite(vectors[i]).all()
                out.append((event, vectors[i].copy() if usable else None))
        except Exception as exc:  # noqa: BLE001 (any damage: keep the file aside, start without it)
            aside = self.path.with_name(self.path.name + ".unreadable")
            os.replace(self.path, aside)
            log.error("events kept for Redis in %s are unreadable (%s); moved to %s", self.path, exc, aside)
            return []
        log.info("%d events kept for Redis at the last shutdown will be replayed from %s", len(out), self.path)
        return out

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
