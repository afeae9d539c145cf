"""Snapshots of what a replica learned (item vectors, in-process user profiles) on local disk.

Format (version 1): an uncompressed NumPy .npz archive (a zip of .npy arrays, read with
allow_pickle=False):

    header            uint8   UTF-8 JSON {"format": "reranker-snapshot", "version": 1, "created_at",
                              "model_version", "dim", "items", "users", "user_parts"}
    item_ids          uint8   JSON list of item ids (least recently used first)
    item_hashes       uint64  text hash per item
    item_vectors      float32 (items, dim)
    compact_users_<k> uint8   JSON list of the user ids of part k
    compact_blobs_<k> uint8   their compact profiles (reranker.users.compact), back to back
    compact_ends_<k>  int64   where each profile ends in compact_blobs_<k>

A snapshot written with the full profile layout (header "layout" "full" or absent: parts of
`users_<k>`, `user_long_term_<k>`, `hist_vectors_<k>`, ... as reranker.users.legacy reads them)
still loads: each profile is converted to a compact one as it is restored, and the next snapshot is
written compact.

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
import struct
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reranker.fileio import fsync_dir
from reranker.model.items import ItemVectorCache, unusable_rows
from reranker.users import legacy
from reranker.users.compact import CompactProfileStore, encode, stored_updated_at
from reranker.users.profiles import UnreadableProfile

log = logging.getLogger(__name__)

FORMAT = "reranker-snapshot"
VERSION = 1
USERS_PER_PART = 2000
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
    profiles: CompactProfileStore | None,
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
                for rows in chunks:
                    for name, array in _compact_part(rows).items():
                        _write_array(archive, f"{name}_{parts}", array)
                    users += len(rows)
                    parts += 1
                _write_array(archive, "header", _json_array({
                    "format": FORMAT, "version": VERSION, "created_at": time.time(), "model_version": model_version,
                    "dim": dim, "items": len(item_ids), "users": users, "user_parts": parts, "layout": "compact",
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
    profiles: CompactProfileStore | None,
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
            header = _header(archive, path, model_version, dim)
            if header is None:
                return None
            counts = [0, 0, 0, 0]  # items restored, users restored, items refused, users refused
            try:
                if items is not None:
                    counts[0], counts[2] = _restore_items(items, archive)
                if profiles is not None:
                    _restore_users(profiles, archive, header, now, ttl_seconds, counts)
            except Exception as exc:  # readable header, damaged or inconsistent content: keep what was restored
                log.warning("snapshot %s is damaged (%s); it was restored only in part", path, exc)
    except Exception as exc:  # corrupt, truncated, not a zip, ...: start empty, never crash
        log.warning("snapshot %s is unreadable (%s); starting empty", path, exc)
        return None
    restored_items, restored_users, items_refused, users_refused = counts
    info = SnapshotInfo(str(path), restored_items, restored_users, path.stat().st_size,
                        time.perf_counter() - started, items_refused, users_refused)
    if items_refused or users_refused:
        log.warning("snapshot %s: %d item vectors and %d user profiles skipped (a number not finite or out of range)",
                    path, items_refused, users_refused)
    log.info("snapshot loaded: %d items, %d users in %.2f s", info.items, info.users, info.seconds)
    return info


def _header(archive: Any, path: Path, model_version: str, dim: int) -> dict | None:
    """The snapshot's header, or None (logged) when it is not one this server can use."""
    header = _json_value(archive["header"])
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        log.warning("%s is not a reranker snapshot; ignored", path)
        return None
    if header.get("version") != VERSION:
        log.warning("snapshot %s has format version %r; this build reads %d; ignored", path, header.get("version"),
                    VERSION)
        return None
    if header.get("model_version") != model_version or header.get("dim") != dim:
        log.warning("snapshot %s is for model %r (dim %r), not %r (dim %d); ignored",
                    path, header.get("model_version"), header.get("dim"), model_version, dim)
        return None
    return header


def _restore_items(items: ItemVectorCache, archive: Any) -> tuple[int, int]:
    """Item vectors into `items`; (restored, refused: a vector not finite or longer than unit length)."""
    item_ids, hashes, vectors = _json_value(archive["item_ids"]), archive["item_hashes"], archive["item_vectors"]
    usable = ~unusable_rows(vectors)
    refused = int(len(usable) - usable.sum())
    items.restore([i for i, ok in zip(item_ids, usable.tolist()) if ok], hashes[usable], vectors[usable])  # type: ignore[call-overload]
    return len(hashes) - refused, refused


def _restore_users(store: CompactProfileStore, archive: Any, header: dict, now: float, ttl: float,
                   counts: list[int]) -> None:
    """Every part's profiles into `store`, a full-layout part converted; counts[1] and counts[3]
    count the restored and refused profiles part by part (a damaged part leaves the earlier ones)."""
    for part in range(int(header.get("user_parts", 0))):
        if header.get("layout", "full") == "compact":
            arrays = {name: archive[f"{name}_{part}"] for name in _COMPACT_PART_ARRAYS}
            done, bad = _restore_compact(store, arrays, now, ttl)
        else:
            arrays = {name: archive[f"{name}_{part}"] for name in legacy.SNAPSHOT_PART_ARRAYS}
            arrays.update({name: archive[f"{name}_{part}"] for name in legacy.OPTIONAL_SNAPSHOT_PART_ARRAYS
                           if f"{name}_{part}" in archive})
            done, bad = _restore_full(store, arrays, now, ttl)
        counts[1] += done
        counts[3] += bad


def _restore_full(store: CompactProfileStore, data: dict[str, np.ndarray], now: float, ttl: float) -> tuple[int, int]:
    """A full-layout part's profiles, converted (legacy.to_compact); (restored, refused: a profile
    holding a number that is not finite)."""
    restored = refused = 0
    for u, profile in legacy.snapshot_profiles(_json_value(data["users"]), data, store.config):  # type: ignore[arg-type]
        if profile is None:
            refused += 1
        elif now - u["updated"] <= ttl:  # else it would have expired while the process was down
            store.restore(u["id"], encode(legacy.to_compact(profile, store.config)), now)
            restored += 1
    return restored, refused


def _restore_compact(store: CompactProfileStore, data: dict[str, np.ndarray], now: float, ttl: float
                     ) -> tuple[int, int]:
    """A compact part's profiles; (restored, refused: a profile compact.decode refuses, e.g. one
    holding a number that is not finite: that user alone starts empty)."""
    users = _json_value(data["compact_users"])
    blobs, ends = data["compact_blobs"].tobytes(), data["compact_ends"].tolist()
    restored = refused = 0
    for user_id, start, end in zip(users, [0, *ends[:-1]], ends):  # type: ignore[call-overload]
        blob = blobs[start:end]
        try:
            if now - stored_updated_at(blob) > ttl:
                continue  # would have expired while the process was down
            store.restore(user_id, blob, now)
        except (UnreadableProfile, struct.error):
            refused += 1
            continue
        restored += 1
    return restored, refused


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
