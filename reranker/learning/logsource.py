"""The learner's view of one or many sidecars' training logs, and the online join it judges arms by.

Layout: `root` is either one training-log directory or a directory with one subdirectory per pod
(`root/<pod>/served-*.tsv`, `root/<pod>/events-*.tsv`: each sidecar's `training_log_dir`). Every
pod's files are read and merged in time order, so a user served by one pod and acting on another
still joins (the timestamps are the sidecars' clocks: keep them in sync, as NTP does).

Files are re-read only when they change (size or mtime): a closed file is parsed once, the file a
sidecar is still writing is parsed again at each look. A torn last line or a list cut short
(the sidecar is mid-write) is not data yet and is picked up at a later look. What is kept per list
is small (`LoggedList`: who, when, which arm and head, the first k returned ids); the full rows
are read again only for the lists a training window needs (`served_lists`).

The online join is the sidecar's (reranker.learning.onlinemetrics), recomputed from the log: a
list is judged by its user's first positive event (weight > 0) at or after it was served, within
`window` seconds; NDCG@k = 1 / log2(2 + rank) when that item was among the first k returned,
hits@k = 1 then; lists with no such event are not judged (yet).
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from reranker.records import Interaction, ServedList
from reranker.learning.traininglog import EVENTS_PREFIX, SERVED_PREFIX, read_log_file

log = logging.getLogger(__name__)

JUDGED_VARIANTS = ("reranked", "control", "fallback")  # bypassed lists belong to no arm


@dataclass(frozen=True, slots=True)
class LoggedList:
    list_id: str
    user_id: str
    served_at: float
    variant: str
    arm: str
    model_version: str
    top: tuple[str, ...]  # returned ids, best first, at most k


@dataclass(frozen=True, slots=True)
class Outcome:
    """One judged list: its arm and head, when it was served, its NDCG@k and hits@k."""

    arm: str
    model_version: str
    served_at: float
    ndcg: float
    hit: float


@dataclass
class _FileData:
    signature: tuple[int, int]
    events: list[Interaction]
    lists: list[LoggedList]


class LogSource:
    def __init__(self, root: str | Path, k: int = 10) -> None:
        self.root = Path(root)
        self.k = k
        self._files: dict[Path, _FileData] = {}
        self.events: list[Interaction] = []
        self.lists: list[LoggedList] = []
        self.errors = 0  # files that could not be read at the last refresh (kept out, logged)

    def directories(self) -> list[Path]:
        """The log directories under root: root itself when it holds log files, else its subdirectories."""
        if not self.root.is_dir():
            return []
        if any(self.root.glob(f"{SERVED_PREFIX}*.tsv")) or any(self.root.glob(f"{EVENTS_PREFIX}*.tsv")):
            return [self.root]
        return sorted(p for p in self.root.iterdir() if p.is_dir())

    def files(self) -> list[Path]:
        out = []
        for directory in self.directories():
            out += sorted(directory.glob(f"{EVENTS_PREFIX}*.tsv")) + sorted(directory.glob(f"{SERVED_PREFIX}*.tsv"))
        return out

    def refresh(self) -> bool:
        """Read what changed since the last call; True when anything did."""
        present = self.files()
        changed = set(self._files) - set(present)
        for path in changed:
            del self._files[path]  # deleted (keep_files rotation): its rows leave the window
        errors = 0
        for path in present:
            try:
                st = path.stat()
            except OSError:
                continue
            signature = (st.st_size, st.st_mtime_ns)
            cached = self._files.get(path)
            if cached is not None and cached.signature == signature:
                continue
            try:
                self._files[path] = self._read(path, signature)
            except (OSError, ValueError) as exc:  # one bad file is kept out, the others still count
                errors += 1
                log.error("learner: %s is unreadable (%s); left out", path, exc)
                self._files.pop(path, None)
                continue
            changed.add(path)
        self.errors = errors
        if changed:
            self.events = sorted((e for f in self._files.values() for e in f.events), key=lambda e: e.timestamp)
            self.lists = sorted((x for f in self._files.values() for x in f.lists), key=lambda x: x.served_at)
        return bool(changed)

    def _read(self, path: Path, signature: tuple[int, int]) -> _FileData:
        data = read_log_file(path)
        lists = []
        for served in data.lists:
            variant, version, arm, ranks = data.served_as[served.list_id]
            order = sorted((r, i) for i, r in enumerate(ranks) if 0 <= r < self.k)
            top = tuple(sys.intern(served.rows[i].item_id) for _, i in order)
            lists.append(LoggedList(served.list_id, sys.intern(served.user_id), float(served.timestamp or 0.0),
                                    variant, arm, version, top))
        return _FileData(signature, data.events, lists)

    def served_lists(self, start: float, stop: float) -> list[ServedList]:
        """Full rows of the lists served in [start, stop), from the files that may hold them."""
        out: list[ServedList] = []
        for path, cached in self._files.items():
            if not path.name.startswith(SERVED_PREFIX) or not cached.lists:
                continue
            if cached.lists[-1].served_at < start or cached.lists[0].served_at >= stop:
                continue
            out += [s for s in read_log_file(path).lists if start <= (s.timestamp or 0.0) < stop]
        out.sort(key=lambda s: s.timestamp or 0.0)
        return out

    @property
    def file_count(self) -> int:
        return len(self._files)

    @property
    def size_bytes(self) -> int:
        total = 0
        for path in self._files:
            try:
                total += os.path.getsize(path)
            except OSError:
                pass
        return total


def join(
    lists: Sequence[LoggedList], events: Iterable[Interaction], positive: set[str], window: float, k: int
) -> list[Outcome]:
    """The judged lists (see the module doc), in the order of `lists`."""
    times: dict[str, list[float]] = {}
    items: dict[str, list[str]] = {}
    for e in events:  # in time order
        if e.event_type in positive:
            times.setdefault(e.user_id, []).append(e.timestamp)
            items.setdefault(e.user_id, []).append(e.item_id)
    out = []
    for x in lists:
        if x.variant not in JUDGED_VARIANTS or not x.arm:
            continue
        user_times = times.get(x.user_id)
        if not user_times:
            continue
        at = bisect.bisect_left(user_times, x.served_at)
        if at == len(user_times) or user_times[at] - x.served_at > window:
            continue
        target = items[x.user_id][at]
        rank = x.top.index(target) if target in x.top[:k] else -1
        ndcg = 1.0 / math.log2(rank + 2) if rank >= 0 else 0.0
        out.append(Outcome(x.arm, x.model_version, x.served_at, ndcg, 1.0 if rank >= 0 else 0.0))
    return out

