"""What an event may carry before it touches a profile: one check for every entrance.

`checked_event` is the validation of one event's fields, shared by the gRPC edge
(serving/convert.py: RecordEvents, StreamEvents, Rerank context events) and the stream consumer
(streamconsumer.py), so both refuse exactly the same events with the same messages (field
names prefixed the entrance's way: `events[3].item_id`, or `item_id` for a stream entry):

* ids: user_id and item_id non-empty, each id (event_id too) at most `max_id_chars` characters;
* type: a known EventType number;
* text: at most `max_text_chars` characters;
* time and weight: the hygiene below.

Event-time and weight hygiene:

* Time: an event time after server time is clamped to now (counted in
  `reranker_event_times_clamped`); more than `max_event_skew_seconds` after it is refused with
  INVALID_ARGUMENT naming the field, with a hint when the value reads as milliseconds,
  microseconds or nanoseconds. A profile's decay clock therefore never runs ahead of server time.
* Weight: |weight| <= `max_event_weight` (default twice the largest event-type weight), finite.

Pure functions (no protobuf, no clock): the entrances call them with field names, the service again
for callers of its Python API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from reranker.errors import InvalidRequest
from reranker.types import Event, EventType

if TYPE_CHECKING:
    from reranker.config import LimitsSettings, UserModelSettings

EVENT_TYPES = frozenset(int(t) for t in EventType)
# google.protobuf.Timestamp's valid range ends at 9999-12-31T23:59:59Z.
MAX_TIMESTAMP_SECONDS = 253_402_300_799

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


@dataclass(frozen=True, slots=True)
class EventLimits:
    """The limits `checked_event` applies (settings max_id_chars, max_text_chars, max_event_weight,
    max_event_skew_seconds)."""

    max_id_chars: int
    max_text_chars: int
    max_event_weight: float
    max_event_skew: float

    @classmethod
    def from_settings(cls, limits: LimitsSettings, users: UserModelSettings) -> EventLimits:
        return cls(limits.max_id_chars, limits.max_text_chars, users.event_weight_limit(), users.max_event_skew_seconds)


def check_id(value: str, name: str, max_chars: int) -> str:
    if not value:
        raise InvalidRequest(f"{name} must not be empty")
    if len(value) > max_chars:
        raise InvalidRequest(f"{name} is {len(value)} characters; the limit is {max_chars}")
    return value


def check_text(value: str, name: str, max_chars: int) -> str:
    if len(value) > max_chars:
        raise InvalidRequest(f"{name} is {len(value)} characters; the limit is {max_chars}")
    return value


def check_timestamp(timestamp: float, name: str, now: float | None, max_skew: float) -> None:
    """A given event time: finite, after 1970-01-01, not after 9999-12-31, and (with `now`, server
    time) at most `max_skew` seconds after now."""
    if not math.isfinite(timestamp):
        raise EventRefused(f"{name} must be finite, got {timestamp}", "timestamp")
    if math.floor(timestamp) > MAX_TIMESTAMP_SECONDS:
        if now is not None:  # the policy's message names the unit the value was probably sent in
            check_event_time(math.floor(timestamp), name, now, max_skew)
        raise InvalidRequest(f"{name} is after 9999-12-31")
    if timestamp <= 0:
        raise InvalidRequest(f"{name} must be after 1970-01-01")
    if now is not None:
        check_event_time(timestamp, name, now, max_skew)


def checked_event(
    user_id: str,
    item_id: str,
    type: int,
    timestamp: float | None,
    event_id: str,
    text: str | None,
    weight: float | None,
    *,
    name: str,
    limits: EventLimits,
    now: float | None,
) -> Event:
    """The Event these fields make, or InvalidRequest (EventRefused for the time / weight policy)
    naming the first offending field as `<name>.<field>` (`<field>` when `name` is empty).
    `timestamp` None = none given (the service stamps server time); `now` None = no skew check."""
    prefix = f"{name}." if name else ""
    check_id(user_id, prefix + "user_id", limits.max_id_chars)
    check_id(item_id, prefix + "item_id", limits.max_id_chars)
    if type not in EVENT_TYPES:
        raise InvalidRequest(f"{prefix}type {type} is not a known EventType")
    if len(event_id) > limits.max_id_chars:
        raise InvalidRequest(f"{prefix}event_id is longer than {limits.max_id_chars} characters")
    if weight is not None:
        check_event_weight(weight, prefix + "weight", limits.max_event_weight)
    if timestamp is not None:
        check_timestamp(timestamp, prefix + "timestamp", now, limits.max_event_skew)
    if text is not None:
        check_text(text, prefix + "text", limits.max_text_chars)
    return Event(user_id, item_id, EventType(type), 0.0 if timestamp is None else timestamp, event_id, text, weight)
