"""Progress of `reranker eval` / `reranker train` on stderr: one tqdm bar per phase.

The pipeline reports progress as `progress(stage, done, total)` calls (no tqdm inside the
library code); a stage's text before " (" names the phase (one bar each), the part in parentheses
(e.g. the current loss) is shown after the bar.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class ProgressBar:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._bar: tqdm | None = None
        self._phase = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        phase, _, detail = stage.partition(" (")
        if self._bar is None or phase != self._phase or total != self._bar.total or done < self._bar.n:
            self.close()
            self._bar = tqdm(total=total, desc=phase, file=self.stream, mininterval=0.5, dynamic_ncols=True)
            self._phase = phase
        if detail:
            self._bar.set_postfix_str(detail.removesuffix(")"), refresh=False)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
