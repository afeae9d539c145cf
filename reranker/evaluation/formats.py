"""The generic evaluation data format: reading, writing, and the leave-last-out split.

- items.tsv:      header, then `item_id<TAB>text`
- events.tsv:     header, then `user_id<TAB>item_id<TAB>timestamp[<TAB>event_type]`
                  timestamp = unix seconds (float); event_type = a reranker EventType name
                  (view, click, add_to_cart, purchase, like, dislike, skip); default click.
- candidates.tsv: header, then `user_id<TAB>item_id<TAB>score[<TAB>label]`, a user's rows in the
                  retriever's order; label (0/1) marks relevant candidates where known (e.g. MIND
                  clicks); without labels the user's leave-last-out target is the one relevant item.
                  The header names the columns: besides the three required ones (first, in this
                  order) it may name `label`, `timestamp` (unix seconds: when the list was served)
                  and `list_id` (rows with the same list id form one list), in any order, and any
                  other column, which readers ignore (the training log adds `returned_rank`,
                  `variant`, `model_version`). Without `list_id`, a list is a run of consecutive rows
                  of one user (and one timestamp). A header that is not made of known names is read
                  the old way: the 4th column is the label.

Leave-last-out: per user, events are sorted by timestamp (stable, so ties keep file order); the last
one is the target, everything before it is the history.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reranker.records import EVENT_TYPES, CandidateRow, FormatError, Interaction, ServedList  # noqa: F401  (formats.Interaction, ...)

CANDIDATE_COLUMNS = ("user_id", "item_id", "score")
OPTIONAL_CANDIDATE_COLUMNS = ("label", "timestamp", "list_id")


@dataclass
class Split:
    """Leave-last-out split: per user, the history (oldest first) and the target interaction."""

    history: dict[str, list[Interaction]] = field(default_factory=dict)
    target: dict[str, Interaction] = field(default_factory=dict)

    @property
    def users(self) -> list[str]:
        return list(self.target)


def _rows(path: Path, min_fields: int, max_fields: int) -> Iterable[tuple[int, list[str]]]:
    with Path(path).open(encoding="utf-8", newline="") as fh:
        header = fh.readline()
        if not header:
            raise FormatError(f"{path}: empty file (expected a header line)")
        for number, line in enumerate(fh, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if not min_fields <= len(parts) <= max_fields:
                raise FormatError(
                    f"{path}:{number}: expected {min_fields}-{max_fields} tab-separated fields, got {len(parts)}"
                )
            yield number, parts


def read_items(path: Path) -> dict[str, str]:
    items: dict[str, str] = {}
    for number, (item_id, text) in _rows(path, 2, 2):
        if not item_id:
            raise FormatError(f"{path}:{number}: empty item_id")
        items[item_id] = text
    return items


def iter_events(path: Path) -> Iterator[Interaction]:
    """The events of an events file, one at a time, in file order. Ids are interned (one string
    object per distinct user or item id, however many events name it) and event types are the
    shared constants, so a million events cost their Interaction objects and little else."""
    names: dict[str, str] = {}
    kinds = {kind: kind for kind in EVENT_TYPES}
    for number, parts in _rows(path, 3, 4):
        user_id, item_id, raw_ts = parts[:3]
        if not user_id or not item_id:
            raise FormatError(f"{path}:{number}: empty user_id or item_id")
        try:
            timestamp = float(raw_ts)
        except ValueError:
            raise FormatError(f"{path}:{number}: timestamp {raw_ts!r} is not a number") from None
        kind = parts[3].strip().lower() if len(parts) == 4 and parts[3].strip() else "click"
        if kind not in kinds:
            raise FormatError(f"{path}:{number}: event_type {kind!r} is not one of {', '.join(EVENT_TYPES)}")
        yield Interaction(names.setdefault(user_id, user_id), names.setdefault(item_id, item_id), timestamp, kinds[kind])


def read_events(path: Path) -> list[Interaction]:
    return list(iter_events(path))


def _candidate_columns(path: Path) -> dict[str, int]:
    """Column positions from the header (see the module doc); unknown headers read positionally."""
    with Path(path).open(encoding="utf-8", newline="") as fh:
        header = [h.strip().lower() for h in fh.readline().rstrip("\r\n").split("\t")]
    named = {name: i for i, name in enumerate(header)}
    if tuple(header[:3]) == CANDIDATE_COLUMNS and any(n in named for n in OPTIONAL_CANDIDATE_COLUMNS):
        return {n: named[n] for n in CANDIDATE_COLUMNS + OPTIONAL_CANDIDATE_COLUMNS if n in named}
    return {"user_id": 0, "item_id": 1, "score": 2, "label": 3}


def _served_row(path: Path, number: int, field_of: dict[str, str]) -> tuple[tuple[str, str, float | None], CandidateRow]:
    """One candidates line: the key of its list (user, list id, timestamp) and its row. Raises
    FormatError naming the line."""
    user_id, item_id = field_of["user_id"], field_of["item_id"]
    if not user_id or not item_id:
        raise FormatError(f"{path}:{number}: empty user_id or item_id")
    try:
        score = float(field_of["score"])
        label = int(field_of["label"]) if field_of.get("label", "") != "" else None
        timestamp = float(field_of["timestamp"]) if field_of.get("timestamp", "") != "" else None
    except ValueError:
        raise FormatError(f"{path}:{number}: score and timestamp must be numbers and label 0 or 1") from None
    if timestamp is not None and not math.isfinite(timestamp):
        raise FormatError(f"{path}:{number}: timestamp must be finite")
    list_id = field_of.get("list_id", "") or f"{user_id}@{'' if timestamp is None else repr(timestamp)}"
    return (user_id, list_id, timestamp), CandidateRow(item_id, score, label)


def read_served_lists(path: Path) -> list[ServedList]:
    """Every list of a candidates file, in file order (see the module doc for columns and grouping)."""
    columns = _candidate_columns(path)
    width = max(columns.values()) + 1
    lists: list[ServedList] = []
    current: tuple[str, str, float | None] | None = None
    rows: list[CandidateRow] = []

    def close() -> None:
        if current is not None and rows:
            lists.append(ServedList(current[1], current[0], current[2], tuple(rows)))

    named = "timestamp" in columns or "list_id" in columns
    # With a named header, other columns are allowed (and ignored); the old positional form has at most 4.
    for number, parts in _rows(path, 3, width + 100 if named else 4):
        key, row = _served_row(path, number, {name: parts[i] if i < len(parts) else "" for name, i in columns.items()})
        if key != current:
            close()
            current, rows = key, []
        rows.append(row)
    close()
    return lists


def read_candidates(path: Path) -> dict[str, list[CandidateRow]]:
    """One list per user (all of a user's rows in file order): the eval format without timestamps."""
    out: dict[str, list[CandidateRow]] = {}
    for served in read_served_lists(path):
        out.setdefault(served.user_id, []).extend(served.rows)
    return out


def leave_last_out(events: Iterable[Interaction]) -> Split:
    by_user: dict[str, list[Interaction]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    split = Split()
    for user_id, rows in by_user.items():
        rows.sort(key=lambda e: e.timestamp)  # stable: equal timestamps keep file order
        split.history[user_id] = rows[:-1]
        split.target[user_id] = rows[-1]
    return split


def read_split(items: Path, events: Path, validation: bool) -> tuple[list[str], Split, dict[str, list[str]]]:
    """(catalog, split, histories as item ids of the users with a history) of a data set, for the
    scripts that measure on the eval targets or one step back: with `validation` every eval target
    is dropped first (never read) and the last remaining event of each user is the target."""
    catalog = list(read_items(items))
    split = leave_last_out(read_events(events))
    if validation:
        split = leave_last_out([e for u in split.users for e in split.history[u]])
    histories = {u: [e.item_id for e in split.history[u]] for u in split.users if split.history[u]}
    return catalog, split, histories


class _TsvWriter:
    def __init__(self, path: Path, header: Sequence[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._fh = Path(path).open("w", encoding="utf-8", newline="\n")
        self.writerow(header)

    def writerow(self, fields: Sequence[object]) -> None:
        self._fh.write("\t".join(str(f) for f in fields) + "\n")

    def __enter__(self) -> _TsvWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def _clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def write_items(path: Path, items: Iterable[tuple[str, str]]) -> int:
    with _TsvWriter(path, ["item_id", "text"]) as writer:
        count = 0
        for item_id, text in items:
            writer.writerow([item_id, _clean(text)])
            count += 1
    return count


def write_events(path: Path, events: Iterable[Interaction]) -> int:
    with _TsvWriter(path, ["user_id", "item_id", "timestamp", "event_type"]) as writer:
        count = 0
        for e in events:
            ts = int(e.timestamp) if float(e.timestamp).is_integer() else e.timestamp
            writer.writerow([e.user_id, e.item_id, ts, e.event_type])
            count += 1
    return count


def write_candidates(path: Path, lists: Iterable[tuple[str, Sequence[CandidateRow]]]) -> int:
    with _TsvWriter(path, ["user_id", "item_id", "score", "label"]) as writer:
        count = 0
        for user_id, rows in lists:
            for row in rows:
                writer.writerow([user_id, row.item_id, repr(float(row.score)), "" if row.label is None else row.label])
                count += 1
    return count


def write_served_lists(path: Path, lists: Iterable[ServedList]) -> int:
    """candidates.tsv with `timestamp` and `list_id` columns (what `reranker train --candidates` reads)."""
    with _TsvWriter(path, ["user_id", "item_id", "score", "label", "timestamp", "list_id"]) as writer:
        count = 0
        for served in lists:
            ts = "" if served.timestamp is None else repr(float(served.timestamp))
            for row in served.rows:
                label = "" if row.label is None else row.label
                writer.writerow([served.user_id, row.item_id, repr(float(row.score)), label, ts, served.list_id])
                count += 1
    return count
