"""A small progress bar on stderr (one line, redrawn in place on a terminal, sparse lines otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.width = width
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_stage = ""
        self._last_draw = 0.0
        self._last_decile = -1
        self._started = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        label = stage.split(" (")[0]
        if label != self._last_stage:
            if self._tty and self._last_stage:
                self.stream.write("\n")
            self._last_stage, self._last_decile, self._started = label, -1, time.perf_counter()
        fraction = done / total if total else 1.0
        now = time.perf_counter()
        if self._tty:
            if now - self._last_draw < 0.1 and done < total:
                return
            filled = int(self.width * fraction)
            line = f"\r{stage:<34} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {now - self._started:5.1f}s"
            self.stream.write(line + ("\n" if done >= total else ""))
            if done >= total:
                self._last_stage = ""
        else:
            decile = int(fraction * 10)
            if decile == self._last_decile:
                return
            self._last_decile = decile
            self.stream.write(f"{stage}: {done}/{total} ({fraction:.0%}, {now - self._started:.1f}s)\n")
        self._last_draw = now
        self.stream.flush()
