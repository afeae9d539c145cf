"""Snapshots of what a replica learned (item vectors, in-process user profiles) on local disk.

Format (version 1): an uncompressed NumPy .npz archive (a zip of .npy arrays, read with
allow_pickle=False):

    header            uint8   UTF-8 JSON {"format": "reranker-snapshot", "version": 1, "created_at",
                              "model_version", "dim", "items", "users", "user_parts"}
    item_ids          uint8   JSON list of item ids (least recently used first)
    item_hashes       uint64  text hash per item
    item_vectors      float32 (items, dim)
    users_<k>         uint8   JSON list, one object per user of part k: id, ref, folded, count,
                              updated, recent [[item_id, type, ts, event_id, weight]],
                              hist [[item_id, ts, weight]], seen
    user_long_term_<k> float64 (users in part, dim)
    user_session_<k>  float64 (users in part, dim), the session sum S (absent in snapshots written
                              by older builds: S is then rebuilt from the history rows)
    hist_vectors_<k>  float32 (sum of len(hist), dim), the part's history rows in order
    seen_hashes_<k>   uint64  (sum of seen,) event-id hashes, oldest first per user
    consumed_keys_<k> uint64  (sum of consumed,) consumed-item keys per user (reranker.users.consumed)
    consumed_values_<k> float64 (sum of consumed, 4): count, newest time, masses in L's and S's frames
                      (users_<k> rows carry "consumed": [n, repeats, events]; snapshots written
                      before these arrays existed load with an empty consumed-item memory)

With `profile_layout=compact` (header "layout": "compact") a part is instead

    compact_users_<k> uint8   JSON list of user ids
    compact_blobs_<k> uint8   their compact profiles (reranker.users.compact), back to back
    compact_ends_<k>  int64   where each profile ends in compact_blobs_<k>

A full-layout snapshot loads into a compact store (each profile converted: `compact.from_full`); a
compact one into a full store restores its item vectors only (a compact profile holds no vectors).

User profiles are written in parts of USERS_PER_PART users, so saving copies (and holds the
store's lock for) one part at a time.

Writes are atomic: a temp file in the same directory is written, fsync'ed, then os.replace'd
over the old snapshot (and the directory fsync'ed), so a crash at any point leaves the old
snapshot whole. A snapshot from another model version or dimension is ignored (its vectors would not be
comparable); so is a snapshot of an unknown format version. Stale temp files of crashed writers
are removed at load. A profile whose decay clock is more than `max_event_skew_seconds` after now
(a future event folded by an older build) is repaired as it is loaded, logged and counted (see
usermodel.repair_future_clock).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reranker.fileio import fsync_dir
from reranker.users.consumed import ConsumedItems
from reranker.users import usermodel
from reranker.model.items import ItemVectorCache, unusable_rows
from reranker.users.compact import CompactProfileStore, encode, from_full, stored_updated_at
from reranker.users.profiles import InProcessProfileStore, _Profile, _SeenIds

log = logging.getLogger(__name__)

FORMAT = "reranker-snapshot"
VERSION = 1
USERS_PER_PART = 2000
_PART_ARRAYS = ("users", "user_long_term", "hist_vectors", "seen_hashes")
_OPTIONAL_PART_ARRAYS = ("user_session", "consumed_keys", "consumed_values")
_COMPACT_PART_ARRAYS = ("compact_users", "compact_blobs", "compact_ends")


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    path: str
    items: int
    users: int
    bytes: int
    seconds: float
    items_refused: int = 0  # entries skipped: a vector not finite or longer than unit length
    users_refused: int = 0  # profiles skipped: a vector, time or consumed-item number not finite


def _json_array(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value, separators=(",", ":")).encode("utf-8"), dtype=np.uint8)


def _json_value(array: np.ndarray) -> object:
    return json.loads(array.tobytes().decode("utf-8"))


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _user_part(rows: list[tuple[str, _Profile]], dim: int) -> dict[str, np.ndarray]:
    users, long_terms, sessions, hist_vectors, seen_hashes, consumed_keys, consumed_values = [], [], [], [], [], [], []
    for user_id, p in rows:
        seen = p.seen.in_order()
        c = p.consumed
        users.append({
            "id": user_id, "ref": p.ref_time, "folded": p.folded, "count": p.event_count, "updated": p.updated_at,
            "recent": [list(row) for row in p.recent],
            "hist": [list(row) for row in zip(p.hist_items, p.hist_times, p.hist_weights)],
            "seen": int(seen.size),
            "consumed": [len(c), c.repeats, c.events],
        })
        long_terms.append(p.long_term)
        sessions.append(np.zeros(dim) if p.session is None else p.session)
        hist_vectors.extend(p.hist_vectors)
        seen_hashes.append(seen)
        consumed_keys.append(c.keys)
        consumed_values.append(np.stack([c.counts.astype(np.float64), c.last, c.mass, c.session_mass], axis=1))
    return {
        "users": _json_array(users),
        "user_long_term": np.asarray(long_terms, dtype=np.float64).reshape(-1, dim),
        "user_session": np.asarray(sessions, dtype=np.float64).reshape(-1, dim),
        "hist_vectors": np.asarray(hist_vectors, dtype=np.float32).reshape(-1, dim),
        "seen_hashes": np.concatenate(seen_hashes) if seen_hashes else np.zeros(0, np.uint64),
        "consumed_keys": np.concatenate(consumed_keys) if consumed_keys else np.zeros(0, np.uint64),
        "consumed_values": np.concatenate(consumed_values).reshape(-1, 4) if consumed_values else np.zeros((0, 4)),
    }


def _compact_part(rows: list[tuple[str, bytes]]) -> dict[str, np.ndarray]:
    return {
        "compact_users": _json_array([user_id for user_id, _ in rows]),
        "compact_blobs": np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.uint8),
        "compact_ends": np.cumsum([len(blob) for _, blob in rows], dtype=np.int64),
    }


def _write_array(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with archive.open(name + ".npy", "w", force_zip64=True) as out:
        np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)


def save_snapshot(
    path: str | os.PathLike[str],
    *,
    items: ItemVectorCache | None,
    profiles: InProcessProfileStore | CompactProfileStore | None,
    model_version: str,
    dim: int,
    users_per_part: int = USERS_PER_PART,
) -> SnapshotInfo:
    """Write a snapshot atomically (temp file + fsync + os.replace).

    Profiles are copied and written `users_per_part` at a time, so the store's lock is held only
    for one part's copy and memory grows by one part, not by the whole state.
    """
    started = time.perf_counter()
    path = Path(path)
    item_ids, item_hashes, item_vectors = (
        items.export() if items is not None else ([], np.zeros(0, np.uint64), np.zeros((0, dim), np.float32))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    users = parts = 0
    try:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                _write_array(archive, "item_ids", _json_array(item_ids))
                _write_array(archive, "item_hashes", np.asarray(item_hashes, dtype=np.uint64))
                _write_array(archive, "item_vectors", np.asarray(item_vectors, dtype=np.float32).reshape(-1, dim))
                del item_vectors
                chunks = profiles.export_chunks(users_per_part) if profiles is not None else iter(())
                layout = profiles.layout if profiles is not None else "full"
                for rows in chunks:
                    part = _compact_part(rows) if layout == "compact" else _user_part(rows, dim)  # type: ignore[arg-type]
                    for name, array in part.items():
                        _write_array(archive, f"{name}_{parts}", array)
                    users += len(rows)
                    parts += 1
                _write_array(archive, "header", _json_array({
                    "format": FORMAT, "version": VERSION, "created_at": time.time(), "model_version": model_version,
                    "dim": dim, "items": len(item_ids), "users": users, "user_parts": parts, "layout": layout,
                }))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    info = SnapshotInfo(str(path), len(item_ids), users, path.stat().st_size, time.perf_counter() - started)
    log.info("snapshot saved: %d items, %d users, %d bytes in %.2f s", info.items, info.users, info.bytes, info.seconds)
    return info


def remove_stale_temps(path: str | os.PathLike[str]) -> int:
    """Delete temp files left by writers that crashed before their rename; returns how many."""
    path = Path(path)
    removed = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def load_snapshot(
    path: str | os.PathLike[str],
    *,
    items: ItemVectorCache | None,
    profiles: InProcessProfileStore | CompactProfileStore | None,
    model_version: str,
    dim: int,
    now: float,
    ttl_seconds: float,
) -> SnapshotInfo | None:
    """Restore a snapshot into empty caches; None (and a log line) when absent, foreign or unreadable."""
    started = time.perf_counter()
    path = Path(path)
    if remove_stale_temps(path):
        log.warning("removed stale snapshot temp files next to %s (a writer crashed)", path)
    if not path.is_file():
        log.info("no snapshot at %s; starting empty", path)
        return None
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as archive:
            header = _json_value(archive["header"])
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                log.warning("%s is not a reranker snapshot; ignored", path)
                return None
            if header.get("version") != VERSION:
                log.warning("snapshot %s has format version %r; this build reads %d; ignored",
                            path, header.get("version"), VERSION)
                return None
            if header.get("model_version") != model_version or header.get("dim") != dim:
                log.warning("snapshot %s is for model %r (dim %r), not %r (dim %d); ignored",
                            path, header.get("model_version"), header.get("dim"), model_version, dim)
                return None
            restored_items = restored_users = items_refused = users_refused = 0
            try:
                if items is not None:
                    item_ids, hashes, vectors = _json_value(archive["item_ids"]), archive["item_hashes"], archive["item_vectors"]
                    usable = ~unusable_rows(vectors)
                    items_refused = int(len(usable) - usable.sum())
                    items.restore([i for i, ok in zip(item_ids, usable.tolist()) if ok], hashes[usable],  # type: ignore[call-overload]
                                  vectors[usable])
                    restored_items = len(hashes) - items_refused
                layout = header.get("layout", "full")
                if profiles is not None and layout == "compact" and profiles.layout == "full":
                    log.warning("snapshot %s holds compact profiles, this server keeps full ones (profile_layout): "
                                "its profiles are ignored (a compact profile holds no item vectors)", path)
                elif isinstance(profiles, CompactProfileStore) and layout == "compact":
                    for part in range(int(header.get("user_parts", 0))):
                        arrays = {name: archive[f"{name}_{part}"] for name in _COMPACT_PART_ARRAYS}
                        restored_users += _restore_compact(profiles, arrays, now, ttl_seconds)
                elif profiles is not None:
                    for part in range(int(header.get("user_parts", 0))):
                        arrays = {name: archive[f"{name}_{part}"] for name in _PART_ARRAYS}
                        arrays.update({name: archive[f"{name}_{part}"] for name in _OPTIONAL_PART_ARRAYS
                                       if f"{name}_{part}" in archive})
                        restored, refused = _restore_profiles(profiles, arrays, now, ttl_seconds)
                        restored_users += restored
                        users_refused += refused
            except Exception as exc:  # readable header, damaged or inconsistent content: keep what was restored
                log.warning("snapshot %s is damaged (%s); it was restored only in part", path, exc)
    except Exception as exc:  # corrupt, truncated, not a zip, ...: start empty, never crash
        log.warning("snapshot %s is unreadable (%s); starting empty", path, exc)
        return None
    info = SnapshotInfo(str(path), restored_items, restored_users, path.stat().st_size,
                        time.perf_counter() - started, items_refused, users_refused)
    if items_refused or users_refused:
        log.warning("snapshot %s: %d item vectors and %d user profiles skipped (a number not finite or out of range)",
                    path, items_refused, users_refused)
    log.info("snapshot loaded: %d items, %d users in %.2f s", info.items, info.users, info.seconds)
    return info


def _usable_profile(u: dict, long_term: np.ndarray, session: np.ndarray | None, vectors: np.ndarray,
                    consumed: np.ndarray) -> bool:
    """Every number of a full-layout profile that scores or decays is finite (history rows also in range)."""
    numbers = [u["ref"], u["updated"], *(ts for _, ts, _ in u["hist"]), *(w for _, _, w in u["hist"])]
    try:
        finite = np.isfinite(np.asarray(numbers, dtype=np.float64)).all()
    except (TypeError, ValueError):
        return False
    return bool(finite and np.isfinite(long_term).all() and (session is None or np.isfinite(session).all())
                and not unusable_rows(vectors).any() and np.isfinite(consumed).all())


def _restore_profiles(store: InProcessProfileStore | CompactProfileStore, data: dict[str, np.ndarray], now: float,
                      ttl: float) -> tuple[int, int]:
    """Full-layout profiles into `store` (converted when the store keeps compact ones); returns
    (restored, refused: a profile holding a number that is not finite)."""
    c = store.config
    users = _json_value(data["users"])
    long_terms, hist_vectors, seen_hashes = data["user_long_term"], data["hist_vectors"], data["seen_hashes"]
    consumed_keys = data.get("consumed_keys", np.zeros(0, np.uint64))
    consumed_values = data.get("consumed_values", np.zeros((0, 4)))
    sessions = data.get("user_session")
    hist_at = seen_at = consumed_at = restored = refused = 0
    for row, u in enumerate(users):  # type: ignore[arg-type]
        hist, seen_count = u["hist"], u["seen"]
        consumed_count, repeats, consumed_events = u.get("consumed", [0, 0, 0])
        vectors = hist_vectors[hist_at : hist_at + len(hist)]
        seen = seen_hashes[seen_at : seen_at + seen_count]
        keys = consumed_keys[consumed_at : consumed_at + consumed_count]
        values = consumed_values[consumed_at : consumed_at + consumed_count]
        hist_at += len(hist)
        seen_at += seen_count
        consumed_at += consumed_count
        if not _usable_profile(u, long_terms[row], None if sessions is None else sessions[row], vectors, values):
            refused += 1
            continue
        if now - u["updated"] > ttl:
            continue  # would have expired while the process was down
        profile = _Profile(
            long_term=np.array(long_terms[row], dtype=np.float64), ref_time=u["ref"], folded=u["folded"],
            event_count=u["count"], updated_at=u["updated"], recent=deque(maxlen=c.max_recent),
        )
        for item_id, kind, ts, event_id, weight in u["recent"]:
            profile.recent.append((item_id, int(kind), ts, event_id, weight))
        for (item_id, ts, weight), vector in zip(hist, vectors):
            profile.add_history(ts, item_id, weight, np.array(vector, dtype=np.float32), c.max_history)
        if sessions is not None:
            profile.session = np.array(sessions[row], dtype=np.float64)
        else:  # written before S was kept: the history rows are the session's recent events
            profile.session = usermodel.decayed_sum(profile.history(c.dim), profile.ref_time, c.session_rate)
        profile.seen = _SeenIds()
        for hashed in seen.tolist():
            profile.seen.add(hashed, c.max_event_ids)
        keep = np.argsort(values[:, 1], kind="stable")[-c.max_consumed :] if c.max_consumed > 0 else np.zeros(0, np.int64)
        keep = np.sort(keep)  # keys were written sorted; the newest max_consumed are kept
        profile.consumed = ConsumedItems(
            np.asarray(keys[keep], dtype=np.uint64), values[keep, 0].astype(np.int64), values[keep, 1].copy(),
            values[keep, 2].copy(), values[keep, 3].copy(), int(repeats), int(consumed_events),
        )
        if isinstance(store, CompactProfileStore):
            store.restore(u["id"], encode(from_full(profile, c)), now)
        else:
            store.restore(u["id"], profile, now)
        restored += 1
    return restored, refused


def _restore_compact(store: CompactProfileStore, data: dict[str, np.ndarray], now: float, ttl: float) -> int:
    users = _json_value(data["compact_users"])
    blobs, ends = data["compact_blobs"].tobytes(), data["compact_ends"].tolist()
    restored = 0
    for user_id, start, end in zip(users, [0, *ends[:-1]], ends):  # type: ignore[call-overload]
        blob = blobs[start:end]
        if now - stored_updated_at(blob) > ttl:
            continue  # would have expired while the process was down
        store.restore(user_id, blob, now)
        restored += 1
    return restored


class PeriodicSnapshots:
    """Calls `save` every `interval_seconds` on a daemon thread until stopped."""

    def __init__(self, save: Callable[[], object], interval_seconds: float) -> None:
        self._save = save
        self._interval = interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshots", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._save()
            except Exception:
                log.exception("periodic snapshot failed; will retry")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
