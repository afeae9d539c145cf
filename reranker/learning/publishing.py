"""What the learner writes: head files the sidecars watch, and its decision history. Crash-safe.

Head files. A head is published by writing a temporary file in the same directory
(`.<name>.learn-tmp-<pid>`, a name no sidecar watches), fsyncing it, renaming it over the watched
path (atomic on POSIX: a reader sees the old file or the new one, never a mix) and fsyncing the
directory (the rename survives a machine crash). A head is withdrawn by unlinking its path (the
sidecar's arm goes back to serving like treatment, reranker.ranking.hotreload). A learner killed
mid-write leaves only a temporary file, which no sidecar reads and the next start deletes; the
sidecar's reload validates every file anyway (a truncated .npz is refused, the old head kept).

History. One JSON object per line, appended with one write and an fsync. A crash can leave a last
line without its newline: `History` drops it when it opens the file (it never became a decision:
the entry is written after the file operation it records, and a restarted learner reconciles
the files with the history, see learner.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reranker.fileio import fsync_dir
from reranker.ranking import head as ranking_head

log = logging.getLogger(__name__)

TMP_MARK = ".learn-tmp-"


def _tmp_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}"


def publish(dest: Path, write: Callable[[Path], None]) -> None:
    """Atomically replace `dest` with what `write(tmp)` writes (see the module doc)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(dest)
    try:
        write(tmp)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(dest.parent)


def publish_head(head: ranking_head.RankingHead, dest: Path) -> None:
    publish(dest, head.save)


def publish_copy(source: Path, dest: Path) -> None:
    publish(dest, lambda tmp: shutil.copyfile(source, tmp))


def withdraw(dest: Path) -> bool:
    """Unlink `dest` (True when it existed)."""
    try:
        dest.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(dest.parent)
    return True


def remove_stale_tmp(directory: Path) -> list[Path]:
    """Delete temporary files a killed learner left in `directory`."""
    removed = []
    if directory.is_dir():
        for path in directory.glob(f".*{TMP_MARK}*"):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                log.warning("learner: could not delete %s", path)
    return removed


class HeadFile:
    """The head at one watched path: its version, re-read only when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._head: ranking_head.RankingHead | None = None
        self.error = ""

    def head(self) -> ranking_head.RankingHead | None:
        """The head served from this path; None when there is none (the arm serves like treatment).
        An unusable file (the sidecars refuse it too and keep their old head) raises HeadError."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._signature, self._head, self.error = None, None, ""
            return None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if signature != self._signature:
            self._head = ranking_head.load(self.path)
            self._signature = signature
        return self._head

    def version(self) -> str | None:
        head = self.head()
        return None if head is None else head.version


class History:
    """The append-only decision history (JSON lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.repaired = False
        self._entries: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end != len(data):  # a torn last line: the learner died while appending it
                with path.open("rb+") as fh:
                    fh.truncate(end)
                    os.fsync(fh.fileno())
                self.repaired = True
                log.warning("learner: %s ended in a torn line (%d bytes); dropped", path, len(data) - end)
            for number, line in enumerate(data[:end].decode().splitlines(), start=1):
                try:
                    self._entries.append(json.loads(line))
                except ValueError:
                    log.error("learner: %s:%d is not JSON; skipped", path, number)

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self._entries)

    def append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._entries.append(entry)
