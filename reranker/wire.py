"""Protobuf wire format written with array operations: the repeated `items` field of a
RerankResponse (hundreds of scored items) without one Python protobuf object per item.
"""

from __future__ import annotations

import numpy as np

from reranker.types import RankedItems


def _varint_sizes(values: np.ndarray) -> np.ndarray:
    """Bytes each non-negative integer takes as a protobuf varint."""
    sizes = np.ones(values.shape, dtype=np.int64)
    largest = int(values.max(initial=0))
    bits = 7
    while bits < 64 and largest >= 1 << bits:
        sizes += values >= (1 << bits)
        bits += 7
    return sizes


def _put_varints(out: np.ndarray, starts: np.ndarray, values: np.ndarray, sizes: np.ndarray) -> None:
    """Write `values` as varints at `starts` (byte sizes from _varint_sizes)."""
    if int(sizes.max(initial=1)) == 1:
        out[starts] = values
        return
    values = values.astype(np.uint64)
    for k in range(int(sizes.max())):
        write = sizes > k
        more = sizes > k + 1
        byte = ((values >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8) | (more.astype(np.uint8) << 7)
        out[starts[write] + k] = byte[write]


_SCORED_ITEM_DOUBLES = (0x11, 0x19, 0x21)  # tags of ScoredItem fields 2, 3, 4 (fixed64)
_ITEMS_TAG = 0x0A  # RerankResponse.items = 1 (length-delimited); also ScoredItem.item_id = 1
_RANK_TAG = 0x28  # ScoredItem.original_rank = 5 (varint)
_DOUBLES_OFFSETS = np.arange(27)


def encode_ranked_items(items: RankedItems) -> bytes:
    """The `items` field of a RerankResponse in protobuf wire format, built with array operations.

    Equivalent to adding one ScoredItem message per item (without explanations), at a fraction of
    the cost for hundreds of items. Concatenating it with the rest of a serialized RerankResponse
    gives a valid message (protobuf merges fields in any order).
    """
    n = len(items)
    if n == 0:
        return b""
    joined = "".join(items.item_ids)
    if joined.isascii():  # one character = one byte: no per-id encoding needed
        all_id_bytes = joined.encode("ascii")
        id_sizes = np.fromiter(map(len, items.item_ids), dtype=np.int64, count=n)
    else:
        id_bytes = [item_id.encode("utf-8") for item_id in items.item_ids]
        all_id_bytes = b"".join(id_bytes)
        id_sizes = np.fromiter(map(len, id_bytes), dtype=np.int64, count=n)
    ranks = items.original_ranks.astype(np.int64)
    rank_sizes = _varint_sizes(ranks)
    id_len_sizes = _varint_sizes(id_sizes)
    body = 1 + id_len_sizes + id_sizes + 27 + 1 + rank_sizes  # item_id, 3 doubles, original_rank
    body_len_sizes = _varint_sizes(body)
    record = 1 + body_len_sizes + body
    ends = np.cumsum(record)
    starts = ends - record
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    out[starts] = _ITEMS_TAG
    _put_varints(out, starts + 1, body, body_len_sizes)
    pos = starts + 1 + body_len_sizes
    out[pos] = _ITEMS_TAG
    _put_varints(out, pos + 1, id_sizes, id_len_sizes)
    pos = pos + 1 + id_len_sizes
    all_ids = np.frombuffer(all_id_bytes, dtype=np.uint8)
    if all_ids.size:
        offsets = np.repeat(pos - (np.cumsum(id_sizes) - id_sizes), id_sizes)
        out[offsets + np.arange(all_ids.size)] = all_ids
    pos = pos + id_sizes
    doubles = np.empty((n, 27), dtype=np.uint8)  # three (tag, little-endian float64) fields
    for k, (tag, column) in enumerate(
        zip(_SCORED_ITEM_DOUBLES, (items.scores, items.semantic_scores, items.upstream_scores), strict=True)
    ):
        doubles[:, 9 * k] = tag
        doubles[:, 9 * k + 1 : 9 * k + 9] = np.ascontiguousarray(column, dtype="<f8").reshape(n, 1).view(np.uint8)
    out[pos[:, None] + _DOUBLES_OFFSETS] = doubles
    pos = pos + 27
    out[pos] = _RANK_TAG
    _put_varints(out, pos + 1, ranks, rank_sizes)
    return out.tobytes()


