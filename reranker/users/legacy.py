"""Reading profiles of the full layout (the layout before compact profiles were the only one), to
convert them: a snapshot part written with `profile_layout=full`, and a user's six Redis keys that
its Lua fold wrote. Read only: nothing writes this layout any more.

A full profile kept a float32 copy of each history row's item vector, L and S in float64, the
recent events with their ids, the event-id hashes and the consumed-item memory (all of it, not only
the items beyond the history rows). `to_compact` turns one into the compact profile that holds the
same user model (compact.py), taking the rows' share of S and of the consumed memory out of what is
stored beyond them.

Redis keys of a full profile (`<prefix>:{<user_id>}:` + ...):

    p    hash: lt (L as packed float64), st (S, the same), ref, folded, count, seq, updated, repeats, cevents
    r    list: recent events (JSON [item_id, type, ts, event_id, weight]), newest first
    h    sorted set: history rows (16 sequence chars, <ddI ts, weight, id length>, id, float32 vector)
    i    sorted set: 8-byte event-id hashes, oldest first
    c    hash: 8-byte item key -> (count, newest time, mass, session mass, mass frame) as 5 float64
    cz   sorted set: item key by newest time
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from reranker.itemkeys import item_keys
from reranker.types import EventType
from reranker.users import usermodel
from reranker.users.compact import SESSION_TAIL_NEGLIGIBLE, CompactProfile, tail_capacity
from reranker.users.consumed import ConsumedItems
from reranker.users.profiles import ProfileConfig, UnreadableProfile

LEGACY_KEYS = ("p", "r", "h", "i", "c", "cz")  # suffixes of a full profile's Redis keys
_FIELDS = ("lt", "ref", "count", "updated", "st", "folded", "repeats", "cevents", "seq")  # of `p`, as read
_HIST_HEADER = struct.Struct("<ddI")  # timestamp, weight, item id length; then item id, then float32 vector
_SEQ_CHARS = 16


@dataclass(slots=True)
class FullProfile:
    """A full-layout profile as read (what `to_compact` needs of it)."""

    long_term: np.ndarray  # float64 (d,)
    session: np.ndarray | None  # float64 (d,); None: written before S was kept (rebuilt from the rows)
    ref_time: float
    folded: int
    event_count: int
    updated_at: float
    recent_types: dict[tuple[str, float], int]  # (item id, time) -> event type, of the recent events
    history: usermodel.History  # oldest first
    seen: np.ndarray  # uint64 event-id hashes, oldest first
    consumed: ConsumedItems  # masses in L's and S's frames at ref_time


def to_compact(profile: FullProfile, config: ProfileConfig) -> CompactProfile:
    """The compact profile holding the same L, S, rows, consumed memory and event ids."""
    c = config
    keep = slice(max(0, len(profile.history) - c.max_history), None)
    h = profile.history
    rows = usermodel.History(h.item_ids[keep], h.timestamps[keep], h.weights[keep], h.vectors[keep].reshape(-1, c.dim))
    session = profile.session
    if session is None:  # written before S was kept: the history rows are the session's recent events
        session = usermodel.decayed_sum(h, profile.ref_time, c.session_rate)
    out = CompactProfile(
        np.array(profile.long_term, dtype=np.float64), 0, profile.ref_time, profile.updated_at, profile.event_count,
        profile.folded, profile.consumed.repeats, profile.consumed.events,
        row_times=rows.timestamps.tolist(), row_weights=rows.weights.tolist(),
        row_types=[profile.recent_types.get((i, t), int(EventType.CLICK))
                   for i, t in zip(rows.item_ids, rows.timestamps.tolist())],
        row_ids=list(rows.item_ids), row_keys=item_keys(rows.item_ids).tolist(),
        ids=np.array(profile.seen, dtype=np.uint64),
    )
    out.ids_next = 0  # oldest first: once the ring is full, the next id overwrites index 0
    _split_session(out, profile, session, rows, c)
    out.tail = _consumed_tail(profile, rows, c)
    return out


def _split_session(out: CompactProfile, profile: FullProfile, session: np.ndarray, rows: usermodel.History,
                   c: ProfileConfig) -> None:
    """S_tail: S less the rows' part of it, kept while it is not negligible."""
    if len(rows):
        tail = np.asarray(session, dtype=np.float64) - usermodel.decayed_sum(rows, profile.ref_time, c.session_rate)
        session_masses = usermodel.decayed_weights(rows, profile.ref_time, c.session_rate)
        tail_mass = max(float(np.abs(profile.consumed.session_mass).sum()) - float(np.abs(session_masses).sum()),
                        float(np.linalg.norm(tail)))  # |S_tail| <= its mass (unit vectors): a floor
        if tail_mass > SESSION_TAIL_NEGLIGIBLE * float(np.abs(session_masses).sum()):
            out.session_tail, out.session_tail_mass = tail, tail_mass
    elif float(np.linalg.norm(session)) > 0:
        out.session_tail = np.asarray(session, dtype=np.float64).copy()
        out.session_tail_mass = float(np.abs(profile.consumed.session_mass).sum()) or 1.0


def _consumed_tail(profile: FullProfile, rows: usermodel.History, c: ProfileConfig) -> ConsumedItems:
    """The consumed memory less the rows' share (the compact profile computes that from the rows)."""
    consumed = profile.consumed.copy()
    if len(consumed) and len(rows):
        pos, hit = consumed.positions(item_keys(rows.item_ids))
        np.subtract.at(consumed.counts, pos[hit], 1)
        np.subtract.at(consumed.mass, pos[hit], usermodel.decayed_weights(rows, profile.ref_time, c.decay_rate)[hit])
        np.subtract.at(consumed.session_mass, pos[hit],
                       usermodel.decayed_weights(rows, profile.ref_time, c.session_rate)[hit])
        left = consumed.counts > 0
        consumed = ConsumedItems(consumed.keys[left], consumed.counts[left], consumed.last[left], consumed.mass[left],
                                 consumed.session_mass[left])
    keep = np.sort(np.argsort(consumed.last, kind="stable")[::-1][: tail_capacity(c)])
    return ConsumedItems(consumed.keys[keep], consumed.counts[keep], consumed.last[keep], consumed.mass[keep],
                         consumed.session_mass[keep])


def _history(items: list[str], times: list[float], weights: list[float], vectors: np.ndarray, dim: int
             ) -> usermodel.History:
    """Rows in event-time order (ties: as stored), as the full profile kept them."""
    if not items:
        return usermodel.History.empty(dim)
    order = np.argsort(np.asarray(times, dtype=np.float64), kind="stable")
    return usermodel.History(tuple(items[k] for k in order.tolist()), np.asarray(times, dtype=np.float64)[order],
                             np.asarray(weights, dtype=np.float64)[order],
                             np.asarray(vectors, dtype=np.float32).reshape(-1, dim)[order])


# --- snapshots ---------------------------------------------------------------------------------------
SNAPSHOT_PART_ARRAYS = ("users", "user_long_term", "hist_vectors", "seen_hashes")
OPTIONAL_SNAPSHOT_PART_ARRAYS = ("user_session", "consumed_keys", "consumed_values")


def _usable(u: dict, long_term: np.ndarray, session: np.ndarray | None, vectors: np.ndarray,
            consumed: np.ndarray) -> bool:
    """Every number of a full profile that scores or decays is finite (history vectors also in range)."""
    from reranker.model.items import unusable_rows

    numbers = [u["ref"], u["updated"], *(ts for _, ts, _ in u["hist"]), *(w for _, _, w in u["hist"])]
    try:
        finite = np.isfinite(np.asarray(numbers, dtype=np.float64)).all()
    except (TypeError, ValueError):
        return False
    return bool(finite and np.isfinite(long_term).all() and (session is None or np.isfinite(session).all())
                and not unusable_rows(vectors).any() and np.isfinite(consumed).all())


def snapshot_profiles(users: list[dict], data: dict[str, np.ndarray], config: ProfileConfig
                      ) -> Iterator[tuple[dict, FullProfile | None]]:
    """Each user's row of a full-layout snapshot part and its profile (None: a number not finite)."""
    c = config
    long_terms, hist_vectors, seen_hashes = data["user_long_term"], data["hist_vectors"], data["seen_hashes"]
    consumed_keys = data.get("consumed_keys", np.zeros(0, np.uint64))
    consumed_values = data.get("consumed_values", np.zeros((0, 4)))
    sessions = data.get("user_session")
    hist_at = seen_at = consumed_at = 0
    for row, u in enumerate(users):
        hist, seen_count = u["hist"], u["seen"]
        consumed_count, repeats, consumed_events = u.get("consumed", [0, 0, 0])
        vectors = hist_vectors[hist_at : hist_at + len(hist)]
        seen = seen_hashes[seen_at : seen_at + seen_count]
        keys = consumed_keys[consumed_at : consumed_at + consumed_count]
        values = consumed_values[consumed_at : consumed_at + consumed_count]
        hist_at, seen_at, consumed_at = hist_at + len(hist), seen_at + seen_count, consumed_at + consumed_count
        session = None if sessions is None else np.array(sessions[row], dtype=np.float64)
        if not _usable(u, long_terms[row], session, vectors, values):
            yield u, None
            continue
        keep = np.sort(np.argsort(values[:, 1], kind="stable")[-c.max_consumed :]) if c.max_consumed > 0 else []
        consumed = ConsumedItems(np.asarray(keys[keep], dtype=np.uint64), values[keep, 0].astype(np.int64),
                                 values[keep, 1].copy(), values[keep, 2].copy(), values[keep, 3].copy(),
                                 int(repeats), int(consumed_events))
        yield u, FullProfile(
            np.array(long_terms[row], dtype=np.float64), session, u["ref"], u["folded"], u["count"], u["updated"],
            {(item_id, ts): int(kind) for item_id, kind, ts, _, _ in u["recent"]},
            _history([i for i, _, _ in hist], [t for _, t, _ in hist], [w for _, _, w in hist], vectors, c.dim),
            np.asarray(seen, dtype=np.uint64), consumed,
        )


# --- Redis ------------------------------------------------------------------------------------------
def legacy_keys(prefix: str, user_id: str) -> list[str]:
    base = f"{prefix}:{{{user_id}}}:"
    return [base + suffix for suffix in LEGACY_KEYS]


def queue_legacy_reads(pipe: object, keys: list[str]) -> None:
    """Queue the reads `redis_profile` parses (in a MULTI pipeline: one consistent read)."""
    p, r, h, i, c, _ = keys
    pipe.hmget(p, *_FIELDS)  # type: ignore[attr-defined]
    pipe.zrange(h, 0, -1)  # type: ignore[attr-defined]
    pipe.hgetall(c)  # type: ignore[attr-defined]
    pipe.lrange(r, 0, -1)  # type: ignore[attr-defined]
    pipe.zrange(i, 0, -1)  # type: ignore[attr-defined]
    pipe.pttl(p)  # type: ignore[attr-defined]


def _number(raw: bytes | None, field: str) -> float:
    if raw is None:
        return 0.0
    try:
        if b"_" in raw:  # Python reads 1_000, Lua did not
            raise ValueError(raw)
        value = float(raw)
    except ValueError:
        raise UnreadableProfile(f"profile field {field!r} is not a number") from None
    if not math.isfinite(value):
        raise UnreadableProfile(f"profile field {field!r} is not finite", "non_finite")
    return value


def _vector(raw: bytes | None, field: str, dim: int) -> np.ndarray | None:
    if raw is None:
        return None
    if len(raw) != 8 * dim:
        raise UnreadableProfile(f"profile field {field!r} holds {len(raw)} bytes, not {8 * dim}")
    vector = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    if not np.isfinite(vector).all():
        raise UnreadableProfile(f"profile field {field!r} holds a number that is not finite", "non_finite")
    return vector


def _redis_history(members: list[bytes], dim: int) -> usermodel.History:
    items, times, weights, vectors = [], [], [], []
    start = _SEQ_CHARS + _HIST_HEADER.size
    for member in members:
        if len(member) < start:
            raise UnreadableProfile(f"a history row of {len(member)} bytes")
        timestamp, weight, length = _HIST_HEADER.unpack_from(member, _SEQ_CHARS)
        if len(member) != start + length + 4 * dim:
            raise UnreadableProfile(f"a history row of {len(member)} bytes, its header says {start + length + 4 * dim}")
        try:
            items.append(member[start : start + length].decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            raise UnreadableProfile("a history row's item id is not UTF-8", "bad_utf8") from None
        times.append(timestamp)
        weights.append(weight)
        vectors.append(np.frombuffer(member, dtype="<f4", count=dim, offset=start + length))
    history = _history(items, times, weights, np.stack(vectors) if vectors else np.zeros((0, dim)), dim)
    if not (np.isfinite(history.timestamps).all() and np.isfinite(history.weights).all()
            and np.isfinite(history.vectors).all()):
        raise UnreadableProfile("a history row holds a number that is not finite", "non_finite")
    return history


def _redis_consumed(raw: dict[bytes, bytes], ref_time: float, config: ProfileConfig, repeats: int, events: int
                    ) -> ConsumedItems:
    """The `c` hash, masses brought from the frame each was stored in to L's and S's at `ref_time`."""
    out = ConsumedItems.empty()
    if raw:
        if set(map(len, raw)) != {8} or set(map(len, raw.values())) != {40}:
            raise UnreadableProfile("the consumed-item memory holds entries of another size")
        keys = np.frombuffer(b"".join(raw.keys()), dtype="<u8").astype(np.uint64)
        values = np.frombuffer(b"".join(raw.values()), dtype="<f8").reshape(-1, 5)
        if not np.isfinite(values).all():
            raise UnreadableProfile("the consumed-item memory holds a number that is not finite", "non_finite")
        order = np.argsort(keys)
        count, last, mass, session_mass, frame = (values[order, j] for j in range(5))

        def factor(rate: float) -> np.ndarray:  # a frame a rebuilt repair left behind counts 0
            exponent = -rate * (ref_time - frame)
            return np.where(exponent > 20.0, 0.0, np.exp(np.minimum(exponent, 20.0)))

        out = ConsumedItems(keys[order], count.astype(np.int64), last, mass * factor(config.decay_rate),
                            session_mass * factor(config.session_rate))
    out.repeats, out.events = repeats, events
    return out


def _recent_types(raw: list[bytes]) -> dict[tuple[str, float], int]:
    out = {}
    for entry in raw:
        try:
            item_id, kind, timestamp = json.loads(entry)[:3]
            out[(str(item_id), float(timestamp))] = int(EventType(kind))
        except UnicodeDecodeError:
            raise UnreadableProfile("a recent event is not UTF-8", "bad_utf8") from None
        except (ValueError, TypeError) as exc:
            raise UnreadableProfile(f"a recent event is not one the full layout wrote ({type(exc).__name__})") from None
    return out


def redis_profile(replies: list[object], config: ProfileConfig) -> tuple[FullProfile, int] | None:
    """The full profile from the replies of `queue_legacy_reads` (errors already raised) and the
    milliseconds its keys had left to live; None when there is none. UnreadableProfile for a value
    the full layout did not write."""
    fields, members, consumed_raw, recent_raw, seen_raw, ttl_ms = replies
    lt, ref, count, updated, st, folded, repeats, cevents, seq = fields  # type: ignore[misc]
    if count is None:
        return None
    ref_time = _number(ref, "ref")
    n_count, n_folded, n_repeats, n_events = (int(_number(raw, name)) for raw, name in (
        (count, "count"), (folded, "folded"), (repeats, "repeats"), (cevents, "cevents")))
    _number(seq, "seq")
    if any(len(member) != 8 for member in seen_raw):  # type: ignore[union-attr]
        raise UnreadableProfile("an event-id hash that is not 8 bytes")
    long_term = _vector(lt, "lt", config.dim)
    profile = FullProfile(
        np.zeros(config.dim) if long_term is None else long_term, _vector(st, "st", config.dim), ref_time, n_folded,
        n_count, _number(updated, "updated"), _recent_types(recent_raw),  # type: ignore[arg-type]
        _redis_history(members, config.dim),  # type: ignore[arg-type]
        np.frombuffer(b"".join(seen_raw), dtype="<u8").astype(np.uint64),  # type: ignore[arg-type]
        _redis_consumed(consumed_raw, ref_time, config, n_repeats, n_events),  # type: ignore[arg-type]
    )
    return profile, int(ttl_ms)  # type: ignore[call-overload]
