"""A RerankResponse's header (every field but the order) and its packed_items, in protobuf wire format
written by hand: the same bytes protobuf serializes from the same values (fields in number order,
proto3 defaults left out), without building a message and its Timing per request (a message built
from keyword arguments costs about twice these few byte joins).
"""

from __future__ import annotations

import struct

import numpy as np

from reranker.types import DecimalIds, RankedItems, RerankResult, Timing

_DOUBLE = struct.Struct("<d")
_ZERO_DOUBLE = bytes(8)  # 0.0 is left out; -0.0 has its sign bit set and is written, as protobuf does

# Tags (field number << 3 | wire type) of the RerankResponse fields, in field-number order.
_VARIANT, _FALLBACK_REASON, _FALLBACK_DETAIL, _MODEL_VERSION = b"\x10", b"\x18", b"\x22", b"\x2a"
_REQUEST_ID, _COLD_USER, _TIMING, _CACHE_HITS = b"\x32", b"\x38\x01", b"\x42", b"\x48"
_ENCODED, _WITHOUT_VECTOR, _BUCKET = b"\x50", b"\x58", b"\x60"
_CONSUMED_CANDIDATES, _CONSUMED_DROPPED = b"\xa0\x01", b"\xa8\x01"  # 20, 21
_PACKED_ITEMS, _ARM = b"\xf2\x01", b"\xc2\x02"  # 30, 40
_TIMING_FIELDS = (b"\x09", b"\x11", b"\x19")  # Timing.total_ms, encode_ms, score_ms (fixed64)
# PackedItems fields (length-delimited): positions, scores, item_ids, semantic_scores, upstream_scores.
_POSITIONS, _SCORES, _ITEM_IDS, _SEMANTIC_SCORES, _UPSTREAM_SCORES = b"\x0a", b"\x12", b"\x1a", b"\x22", b"\x2a"

_PACKED_ID = np.dtype("<i8")
_PACKED_SCORE = np.dtype("<f4")
_PACKED_POSITION = np.dtype("<i4")


def _varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    if value < 0x80:
        return bytes((value,))  # ValueError for a negative value, as protobuf raises for a uint32
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: bytes, data: bytes) -> bytes:
    return tag + _varint(len(data)) + data


def _timing(t: Timing) -> bytes:
    fields = b""
    for tag, value in zip(_TIMING_FIELDS, (t.total_ms, t.encode_ms, t.score_ms)):
        packed = _DOUBLE.pack(value)
        if packed != _ZERO_DOUBLE:
            fields += tag + packed
    return _length_delimited(_TIMING, fields)  # the Timing message is always set, even when empty


def header(result: RerankResult, packed_items: bytes | None = None) -> bytes:
    """Every RerankResponse field of `result` but `items` and `item_columns`; with `packed_items` (a
    PackedItems payload) that field too, in its place before `arm`. The counts are uint32 fields."""
    parts = []
    add = parts.append
    if result.variant:
        add(_VARIANT + _varint(result.variant))
    if result.fallback_reason:
        add(_FALLBACK_REASON + _varint(result.fallback_reason))
    if result.fallback_detail:
        add(_length_delimited(_FALLBACK_DETAIL, result.fallback_detail.encode()))
    if result.model_version:
        add(_length_delimited(_MODEL_VERSION, result.model_version.encode()))
    if result.request_id:
        add(_length_delimited(_REQUEST_ID, result.request_id.encode()))
    if result.cold_user:
        add(_COLD_USER)
    add(_timing(result.timing))
    for tag, count in (
        (_CACHE_HITS, result.cache_hits), (_ENCODED, result.encoded), (_WITHOUT_VECTOR, result.without_vector),
        (_BUCKET, result.bucket), (_CONSUMED_CANDIDATES, result.consumed_candidates),
        (_CONSUMED_DROPPED, result.consumed_dropped),
    ):
        if count:
            add(tag + _varint(count))
    if packed_items is not None:
        add(_length_delimited(_PACKED_ITEMS, packed_items))
    if result.arm:
        add(_length_delimited(_ARM, result.arm.encode()))
    return b"".join(parts)


def packed_items(items: RankedItems, item_ids: bool = False, score_details: bool = False) -> bytes:
    """The order as a PackedItems payload: each field one array's little-endian bytes (an empty
    array's field left out)."""
    columns = [(_POSITIONS, items.original_ranks.astype(_PACKED_POSITION)), (_SCORES, items.scores.astype(_PACKED_SCORE))]
    if item_ids:
        ids = items.item_ids
        values = ids.values if isinstance(ids, DecimalIds) else np.array([int(i) for i in ids], dtype=np.int64)
        columns.append((_ITEM_IDS, values.astype(_PACKED_ID)))
    if score_details:
        columns.append((_SEMANTIC_SCORES, items.semantic_scores.astype(_PACKED_SCORE)))
        columns.append((_UPSTREAM_SCORES, items.upstream_scores.astype(_PACKED_SCORE)))
    return b"".join(_length_delimited(tag, column.tobytes()) for tag, column in columns if column.size)
