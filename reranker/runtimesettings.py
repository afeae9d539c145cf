"""Runtime settings: the settings an incident or an experiment changes, read from a file while the server runs.

`runtime_settings_file` names a JSON or YAML mapping (a mounted ConfigMap: the kubelet replaces the
file in place, no rollout) of setting names to values, plus an optional `version` label:

    version: "2024-06-01 incident 42"
    kill_switch: true
    blend_weight: 0.2

The settings in force are the start-up settings (flags, environment) with the file's keys on top;
a key removed from the file goes back to its start-up value. Only the keys in RUNTIME_FIELDS may
appear: an unknown or misspelt key makes the file bad (a `kill_swich: true` must not be ignored).

A watcher thread reads the file every `runtime_settings_poll_seconds` and, when its bytes changed,
parses and validates it (the same checks as at start, declared in config.py, and the arms' head
files) and hands the new Settings object to `apply`, which swaps one reference: a request reads
`service.settings` once and keeps what it read. A file that cannot be read, parsed or validated
keeps the settings in force: the reason is logged, `reranker_runtime_settings_reloads{result="error"}`
counts it and `reranker_runtime_settings_stale` is 1 until a good file arrives. The watcher never
dies (every check is guarded) and never blocks a request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from reranker.config import Settings, flat_fields

log = logging.getLogger(__name__)

# Settings the file may change while the server runs.
RUNTIME_FIELDS = (
    "kill_switch",
    "treatment_percent",
    "experiment_arms",
    "blend_weight",
    "diversity",
    "consumed_policy",
    "access_log_sample",
    "training_log_sample",
)
VERSION_KEY = "version"
MAX_FILE_BYTES = 64 * 1024


class RuntimeSettingsError(ValueError):
    """The file is unusable; the message says why (the settings in force are kept)."""


def parse(data: bytes, path: str) -> tuple[dict[str, Any], str]:
    """The file's bytes -> ({setting: value} checked against the field types, version label)."""
    if len(data) > MAX_FILE_BYTES:
        raise RuntimeSettingsError(f"{len(data)} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        text = data.decode("utf-8")
        if path.endswith((".yaml", ".yml")):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:  # UnicodeDecodeError, JSONDecodeError, yaml.YAMLError
        raise RuntimeSettingsError(f"cannot parse: {exc}") from None
    if doc is None:
        doc = {}  # an empty file: no overrides
    if not isinstance(doc, Mapping):
        raise RuntimeSettingsError(f"must be a mapping of setting names to values, got {type(doc).__name__}")
    types = {f.name: f.type for f in flat_fields()}
    values: dict[str, Any] = {}
    version = ""
    for key, value in doc.items():
        if key == VERSION_KEY:
            version = str(value)[:128]
            continue
        if key not in RUNTIME_FIELDS:
            known = "a start-up setting (a flag or RERANKER_* variable)" if key in types else "not a setting"
            raise RuntimeSettingsError(f"{key!r} is {known}; runtime settings: {', '.join(RUNTIME_FIELDS)}")
        values[key] = _typed(key, str(types[key]), value)
    return values, version


def _typed(key: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
    raise RuntimeSettingsError(f"{key}: expected a {kind}, got {value!r}")


def overlay(base: Settings, values: Mapping[str, Any]) -> Settings:
    """`base` with `values` on top, validated like start-up settings (RuntimeSettingsError if not)."""
    try:
        return dataclasses.replace(base, **values)
    except ValueError as exc:
        raise RuntimeSettingsError(str(exc)) from None


class RuntimeSettingsFile:
    """Reads `settings.runtime_settings_file`; `start(apply)` runs the watcher thread.

    `apply(new_settings)` swaps the settings in; it may raise (e.g. an arm's head file is
    unusable) and then the file counts as bad and the settings in force stay."""

    def __init__(self, base: Settings, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.base = base
        self.path = base.server.runtime_settings_file
        self._clock = clock
        self._interval = base.server.runtime_settings_poll_seconds
        self._last: bytes | None = None  # bytes of the last file looked at (applied or not)
        self._missing = False  # the file could not be read at the last check
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._apply: Callable[[Settings], None] = lambda _s: None
        registry = registry if registry is not None else CollectorRegistry()
        self.reloads = Counter(
            "reranker_runtime_settings_reloads",
            "Runtime settings file changes by result: ok (applied) or error (unusable; the settings in force were kept).",
            ["result"], registry=registry,
        )
        for result in ("ok", "error"):
            self.reloads.labels(result=result)
        self.info = Gauge(
            "reranker_runtime_settings_info",
            "Always 1; the runtime settings file in force: its `version` key and the sha256 prefix of its bytes.",
            ["version", "checksum"], registry=registry,
        )
        self.loaded_at = Gauge(
            "reranker_runtime_settings_loaded_timestamp_seconds",
            "Unix time the runtime settings in force were applied (0: none yet, start-up settings only).",
            registry=registry,
        )
        self.stale = Gauge(
            "reranker_runtime_settings_stale",
            "1 while the runtime settings file on disk is unusable (or unreadable) and older settings are in force.",
            registry=registry,
        )
        self._info_labels: tuple[str, str] | None = None  # (version, checksum) that `info` holds
        self.current = base

    def initial(self) -> Settings:
        """The settings to start with: the file's on top of `base`, or `base` alone when it is missing or bad."""
        self._check(lambda s: None)
        return self.current

    def start(self, apply: Callable[[Settings], None]) -> None:
        self._apply = apply
        self._thread = threading.Thread(target=self._run, name="runtime-settings", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._check(self._apply)
            except Exception:  # never let the watcher die
                log.exception("runtime settings: check failed; the settings in force are kept")

    def check(self) -> bool:
        """Read the file now and apply it if it changed; True when new settings were applied."""
        return self._check(self._apply)

    def _check(self, apply: Callable[[Settings], None]) -> bool:
        with self._lock:  # the watcher's tick and a check() from another thread (SIGHUP, tests)
            return self._check_locked(apply)

    def _check_locked(self, apply: Callable[[Settings], None]) -> bool:
        try:
            data = Path(self.path).read_bytes()
        except OSError as exc:
            if not self._missing:  # report each disappearance once
                self._missing = True
                if self._last is None:
                    log.warning("runtime settings: %s is not there (%s); start-up settings are in force", self.path, exc)
                else:
                    log.error("runtime settings: cannot read %s (%s); the settings in force are kept", self.path, exc)
                    self.stale.set(1)  # before the count: whoever sees the error counted sees it stale
                    self.reloads.labels(result="error").inc()
            return False
        self._missing = False
        if data == self._last:
            return False
        self._last = data
        try:
            values, version = parse(data, self.path)
            new = overlay(self.base, values)
            apply(new)
        except Exception as exc:
            log.error("runtime settings: %s is unusable (%s); the settings in force are kept", self.path, exc)
            self.stale.set(1)  # before the count: whoever sees the error counted sees it stale
            self.reloads.labels(result="error").inc()
            return False
        changed = {
            f: (self.current.value(f), new.value(f)) for f in RUNTIME_FIELDS if self.current.value(f) != new.value(f)
        }
        self.current = new
        checksum = hashlib.sha256(data).hexdigest()[:16]
        self.info.labels(version=version, checksum=checksum).set(1)  # the new one before the old one goes:
        if self._info_labels not in (None, (version, checksum)):  # a scrape never sees no file in force
            self.info.remove(*self._info_labels)
        self._info_labels = (version, checksum)
        self.loaded_at.set(self._clock())
        self.stale.set(0)
        self.reloads.labels(result="ok").inc()  # last: whoever sees it counted sees all of the above
        log.info("runtime settings %s (version %r, %s) applied: %s", self.path, version, checksum,
                 ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items())) or "no change")
        return True
