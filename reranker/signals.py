"""Signals from a command's first instruction: SIGTERM, SIGINT and SIGHUP never kill a command by
their default action, whenever they arrive (docs/reliability.md, "Signals").

`install_early` runs first in `python -m reranker` and in `reranker.cli.main`, before any heavy
import (grpc, numpy, torch take a second or more), so it imports nothing but the standard library.

- `serve` and `consume`, until they install their own handlers (serve: at the top of
  `server.serve`; consume: in `streamconsumer.consume`): SIGTERM and SIGINT end the start-up with
  exit status 0 (nothing has been served or acknowledged yet); SIGHUP is logged and ignored (serve
  reads its head files when the model loads, after this). Afterwards serve drains on SIGTERM /
  SIGINT and reloads its heads on SIGHUP; consume stops after its current batch on SIGTERM /
  SIGINT and keeps logging and ignoring SIGHUP (it has nothing to reload).
- Every other command (soak, replay, eval, train, bench, ...): SIGTERM, SIGINT and SIGHUP raise
  SystemExit(128 + signal) in the main thread, so `finally` blocks and context managers run (soak
  stops its server child) and the exit status names the signal.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger(__name__)

SERVICES = ("serve", "consume")
_installed: list[str] = []


def install_early(argv: Sequence[str]) -> None:
    """Install the start-up handlers for the command in `argv` (the arguments after the program). Idempotent."""
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    command = next((a for a in argv if not a.startswith("-")), "")
    _installed.append(command)
    if command in SERVICES:
        signal.signal(signal.SIGTERM, _stop_during_startup)
        signal.signal(signal.SIGINT, _stop_during_startup)
        signal.signal(signal.SIGHUP, _log_and_ignore_hangup)
    else:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, _exit_with_signal)


def _stop_during_startup(signum: int, _frame: FrameType | None) -> None:
    _log(logging.WARNING, "signal %d before start-up finished: exiting (nothing was served or acknowledged yet)", signum)
    raise SystemExit(0)


def _log_and_ignore_hangup(signum: int, _frame: FrameType | None) -> None:
    # From a thread: a handler runs between two bytecodes of the main thread, which may be writing a log line.
    threading.Thread(target=log.info, args=("SIGHUP: nothing to reload (yet); ignored",), daemon=True).start()


def _exit_with_signal(signum: int, _frame: FrameType | None) -> None:
    _log(logging.WARNING, "signal %d: stopping", signum)
    raise SystemExit(128 + signum)


def _log(level: int, message: str, *args: object) -> None:
    try:
        log.log(level, message, *args)
    except Exception:  # the main thread was inside a write to the same stream: the exit matters more
        pass
