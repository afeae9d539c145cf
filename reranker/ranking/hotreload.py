"""Head hot reload: watch the head files (head_path, the experiment arms'), reload on change or SIGHUP.

A new head arrives by atomic rename (write `head.npz.tmp`, then `mv head.npz.tmp head.npz`): the
watcher sees the path's (inode, size, mtime) change, loads and validates the file on its own thread
(never on the request path), builds a new arm table and hands it to the service, which swaps one
reference: a request in flight finishes with the table it started with, the next one gets the new
head and says so in `model_version`. A file that fails to load or validate (truncated, another
encoder, wrong format, a number that is not finite or out of range: `head.load`) keeps the old
head: the error is logged and counted (`reranker_head_reloads{result="error"}`), and health stays
SERVING. When head_path disappears the old head is kept (the next file to arrive is loaded); when an
experiment arm's file is removed, the arm goes back to serving like treatment, as before its file
first arrived: that is how a head is withdrawn from an arm (`reranker learn` rolls a canary back
this way).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from reranker.ranking import arms as arms_module
from reranker.ranking import head as ranking_head
from reranker.config import RankingSettings

log = logging.getLogger(__name__)

Signature = tuple[int, int, int] | None


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class HeadReloader:
    """Owns the watcher thread. `get_table` / `swap_table` read and replace the service's arm table."""

    def __init__(
        self,
        settings: RankingSettings,
        encoder_version: str,
        dim: int,
        get_table: Callable[[], arms_module.ArmTable],
        swap_table: Callable[[arms_module.ArmTable], None],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._settings = settings
        self._encoder_version, self._dim = encoder_version, dim
        self._get, self._swap = get_table, swap_table
        self._interval = settings.head_reload_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one reload at a time (watcher tick and SIGHUP's check(force=True))
        table = get_table()
        self._seen: dict[str, Signature] = {name: _signature(path) for name, path in table.paths().items()}
        self.reloads = Counter(
            "reranker_head_reloads",
            "Head reload attempts by result: ok (swapped in), error (kept the old head), unchanged.",
            ["result"], registry=registry if registry is not None else CollectorRegistry(),
        )
        for result in ("ok", "error", "unchanged"):
            self.reloads.labels(result=result)
        self._thread = threading.Thread(target=self._run, name="head-reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval if self._interval > 0 else None)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.check()
            except Exception:
                log.exception("head reload failed; the old head is kept")

    def check(self, force: bool = False) -> bool:
        """Reload the head files that changed (all with `force`); True when a new table was swapped in."""
        with self._lock:
            table = self._get()
            heads = table.heads()
            changed = False
            swapped = 0  # arms given a new head (or withdrawn), counted "ok" after the swap
            for name, path in table.paths().items():
                signature = _signature(path)
                if not force and signature == self._seen.get(name):
                    continue
                self._seen[name] = signature
                if signature is None:
                    if name != arms_module.TREATMENT and heads.pop(name, None) is not None:
                        changed = True  # withdrawn: the arm borrows the treatment head again
                        log.info("head reload: arm %s: %s was removed; the arm serves like treatment", name, path)
                        swapped += 1
                    elif force and name == arms_module.TREATMENT:
                        log.error("head reload: arm %s: %s does not exist; the old head is kept", name, path)
                        self.reloads.labels(result="error").inc()
                    continue
                try:
                    head = arms_module.load_head(path, self._encoder_version, self._dim)
                except Exception as exc:  # whatever a file holds, it costs this arm this reload only
                    expected = isinstance(exc, (ranking_head.HeadError, OSError, ValueError))
                    log.error("head reload: arm %s: %s is unusable (%s); the old head is kept", name, path, exc,
                              exc_info=not expected)
                    self.reloads.labels(result="error").inc()
                    continue
                current = heads.get(name)
                if current is not None and current.version == head.version:
                    self.reloads.labels(result="unchanged").inc()
                    continue
                heads[name] = head
                changed = True
                log.info("head reload: arm %s now serves %s (from %s)", name, head.version, path)
                swapped += 1
            if changed:
                self._swap(arms_module.build_table(self._settings, self._encoder_version, heads))
            # Counted once the new table is in place: whoever sees the reload counted gets the new head.
            for _ in range(swapped):
                self.reloads.labels(result="ok").inc()
            return changed

    def retarget(self, settings: RankingSettings) -> None:
        """New runtime settings changed the arms: build their table from the one in force (heads
        kept, new files loaded: HeadError leaves everything as it was), swap it in and watch its
        files from now on; under the reload lock, so a head reload in progress is not undone."""
        with self._lock:
            table = arms_module.rebuild_table(settings, self._encoder_version, self._dim, self._get())
            self._settings = settings
            self._swap(table)
            self._seen = {name: _signature(path) for name, path in table.paths().items()}

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5)

