"""Event-time and weight hygiene (issue 17): what an event may carry before it touches a profile.

* Time: an event time after server time is clamped to now (counted in
  `reranker_event_times_clamped`); more than `max_event_skew_seconds` after it is refused with
  INVALID_ARGUMENT naming the field, with a hint when the value reads as milliseconds,
  microseconds or nanoseconds. A profile's decay clock therefore never runs ahead of server time.
* Weight: |weight| <= `max_event_weight` (default twice the largest event-type weight), finite.

Pure functions (no protobuf, no clock): convert.py calls them with field names, the service again
for callers of its Python API.
"""

from __future__ import annotations

import math

from reranker.errors import InvalidRequest

_UNITS = (("milliseconds", 1e3), ("microseconds", 1e6), ("nanoseconds", 1e9))
_PLAUSIBLE_PAST_S = 50 * 365 * 86_400.0  # a value that, read in another unit, lands this close to now is a hint


class EventRefused(InvalidRequest):
    """An event's timestamp or weight is outside the policy; `field` is "timestamp" or "weight"."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def check_event_time(timestamp: float, name: str, now: float, max_skew: float) -> None:
    """Refuse an event time more than `max_skew` seconds after `now`, naming the field (and the
    unit it was probably sent in). Times in (now, now + max_skew] pass; the service clamps them."""
    if not math.isfinite(timestamp):
        raise EventRefused(f"{name} must be finite, got {timestamp}", "timestamp")
    if timestamp <= now + max_skew:
        return
    hint = ""
    for unit, per_second in _UNITS:
        if now - _PLAUSIBLE_PAST_S <= timestamp / per_second <= now + max_skew:
            hint = f"; it looks like {unit} sent as seconds"
            break
    raise EventRefused(
        f"{name} is {timestamp - now:.0f} s after server time; at most {max_skew:g} s is accepted "
        f"(setting max_event_skew_seconds){hint}",
        "timestamp",
    )


def check_event_weight(weight: float, name: str, limit: float) -> None:
    if not math.isfinite(weight):
        raise EventRefused(f"{name} must be finite, got {weight}", "weight")
    if abs(weight) > limit:
        raise EventRefused(f"{name} {weight:g} is outside [-{limit:g}, {limit:g}] (setting max_event_weight)", "weight")
