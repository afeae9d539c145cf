"""Pure numpy scoring: similarity, normalization, blending, MMR diversity, ordering. No I/O.

Conventions: vectors are float32 and L2-normalized, so cosine similarity is a dot product.
Arrays are indexed by candidate position in the (deduplicated) request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reranker.types import DecimalIds
from reranker.vectors import l2_normalize  # noqa: F401  (scoring.l2_normalize, the ranking code's name for it)

FloatArray = np.ndarray
# History rows from which attention_scores computes similarities with one matrix product.
_ATTENTION_GEMM_ROWS = 8


def minmax(values: FloatArray) -> FloatArray:
    """Scale to [0, 1]; a constant (or empty) input maps to 0.5 everywhere."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    lo, hi = float(values.min()), float(values.max())
    if not math.isfinite(hi - lo):  # e.g. 1e308 and -1e308: the range overflows; halve everything first
        values, lo, hi = values / 2.0, lo / 2.0, hi / 2.0
    if hi - lo <= 1e-12:
        return np.full_like(values, 0.5)
    out = values - lo
    out /= hi - lo
    return out


def has_duplicates(ids: Sequence[str]) -> bool:
    """Whether any id occurs twice (integer ids, DecimalIds, compared as an array)."""
    if isinstance(ids, DecimalIds):
        ordered = ids.values.copy()  # np.sort and ndarray.any are Python wrappers around these calls
        ordered.sort()
        return np.count_nonzero(ordered[1:] == ordered[:-1]) > 0
    return len(set(ids)) < len(ids)


def first_occurrences(ids: Sequence[str]) -> list[int]:
    """Positions of the first occurrence of each id, in input order (duplicate removal)."""
    if isinstance(ids, DecimalIds):
        return np.sort(np.unique(ids.values, return_index=True)[1]).tolist()
    seen: set[str] = set()
    keep = []
    for position, item_id in enumerate(ids):
        if item_id not in seen:
            seen.add(item_id)
            keep.append(position)
    return keep


def rank_discount(upstream: FloatArray) -> FloatArray:
    """1 / log2(2 + r), r = the number of candidates with a strictly higher upstream score: the
    upstream's order with DCG's position discount, blind to how its scores are scaled."""
    upstream = np.asarray(upstream, dtype=np.float64)
    higher = upstream.size - np.searchsorted(np.sort(upstream), upstream, side="right")
    return 1.0 / np.log2(2.0 + higher)


def blend(
    upstream: FloatArray, semantic: FloatArray, has_vector: FloatArray, weight: float, upstream_form: str = "score"
) -> FloatArray:
    """Final score = (1 - weight) * minmax(upstream) + weight * minmax(semantic).

    `upstream_form` "rank" uses minmax(rank_discount(upstream)) instead of the scores: the blend
    then depends only on the upstream's order, not on how its scores are spread.

    Items without a vector get the mean normalized semantic score of the items that have one: a
    neutral value, so their position relative to each other is decided by the upstream score alone.
    """
    up = minmax(rank_discount(upstream) if upstream_form == "rank" else upstream)
    has_vector = np.asarray(has_vector, dtype=bool)
    with_vector = np.count_nonzero(has_vector)
    if weight <= 0.0 or not with_vector:
        return up
    if with_vector == has_vector.size:  # the usual case: every candidate has a vector, nothing to fill in
        sem = minmax(np.asarray(semantic, dtype=np.float64))
    else:
        sem = np.empty_like(up)
        sem[has_vector] = minmax(np.asarray(semantic, dtype=np.float64)[has_vector])
        sem[~has_vector] = sem[has_vector].mean()
    # (1 - weight) * up + weight * sem, in place in the two fresh arrays (the same float operations)
    up *= 1.0 - weight
    sem *= weight
    up += sem
    return up


def order_by_score(scores: FloatArray) -> np.ndarray:
    """Indices sorted by descending score; ties keep input (upstream) order.

    Scores without ties have one order, which numpy's default (unstable, SIMD where the CPU has it)
    argsort finds with fewer instructions than the stable sort (callgrind at 500: ~101k against
    ~117k); only when two scores are equal (or one is NaN) is the stable sort needed and run."""
    negated = -np.asarray(scores, dtype=np.float64)
    order = negated.argsort()
    ranked = negated.take(order)
    if ranked.size > 1 and (np.count_nonzero(ranked[1:] == ranked[:-1]) or ranked[-1] != ranked[-1]):
        return negated.argsort(kind="stable")
    return order


def mmr_order(
    order: np.ndarray,
    relevance: FloatArray,
    vectors: FloatArray,
    has_vector: FloatArray,
    diversity: float,
    window: int,
) -> np.ndarray:
    """Maximal Marginal Relevance over the first `window` positions of `order`.

    Greedily picks argmax (1 - diversity) * relevance - diversity * max_sim_to_already_picked.
    Items without a vector have similarity 0 to everything. Positions beyond the window keep their
    relevance order. Cost O(window * n * d).
    """
    n = order.size
    if diversity <= 0.0 or n < 3 or window < 2:
        return order
    has_vector = np.asarray(has_vector, dtype=bool)
    pool = order.copy()
    rel = np.asarray(relevance, dtype=np.float64)[pool]
    vec = np.where(has_vector[pool, None], vectors[pool], 0.0).astype(np.float32, copy=False)
    max_sim = np.full(n, -np.inf)
    picked = np.zeros(n, dtype=bool)
    result = []
    for step in range(min(window, n)):
        if step == 0:
            gain = rel.copy()
        else:
            gain = (1.0 - diversity) * rel - diversity * np.maximum(max_sim, 0.0)
        gain[picked] = -np.inf
        best = int(np.argmax(gain))  # argmax takes the first maximum: ties keep relevance order
        picked[best] = True
        result.append(best)
        max_sim = np.maximum(max_sim, vec @ vec[best])
    rest = np.flatnonzero(~picked)
    return pool[np.concatenate([np.asarray(result, dtype=np.int64), rest])]


@dataclass(frozen=True, slots=True)
class Ranking:
    order: np.ndarray  # candidate indices, best first (already cut to top_k)
    final: np.ndarray  # final score per candidate index
    semantic: np.ndarray  # raw cosine per candidate index (0 where no vector)


def rank(
    upstream: FloatArray,
    item_vectors: FloatArray,
    has_vector: FloatArray,
    user_vector: FloatArray | None,
    *,
    weight: float,
    diversity: float = 0.0,
    mmr_window: int = 50,
    top_k: int = 0,
    semantic: FloatArray | None = None,
    upstream_form: str = "score",
) -> Ranking:
    """Score and order candidates. `item_vectors` is (n, d) with arbitrary rows where no vector.

    With no user vector (cold user) the semantic term is dropped and the upstream order stands.
    `semantic` replaces the plain cosine to the user vector (e.g. `personal_semantic`).
    """
    upstream = np.asarray(upstream, dtype=np.float64)
    n = upstream.size
    has_vector = np.asarray(has_vector, dtype=bool)
    if user_vector is None or n == 0:
        semantic = np.zeros(n)
        final = minmax(upstream)
    else:
        if semantic is None:
            semantic = np.where(has_vector, item_vectors @ np.asarray(user_vector, dtype=np.float32), 0.0)
        final = blend(upstream, semantic, has_vector, weight, upstream_form)
    order = order_by_score(final)
    if user_vector is not None:
        order = mmr_order(order, final, item_vectors, has_vector, diversity, mmr_window)
    if top_k > 0:
        order = order[:top_k]
    return Ranking(order=order, final=final, semantic=semantic)


def apply_consumed_policy(order: np.ndarray, consumed: np.ndarray, policy: str) -> tuple[np.ndarray, int]:
    """(order, dropped) after a consumed-item policy: `demote` moves consumed candidates after all
    the others (both keep their relative order), `drop` removes them; `keep` and `learned` (the
    head already decided) leave the order as it is."""
    if policy not in ("demote", "drop"):
        return order, 0
    mask = np.asarray(consumed, dtype=bool)[order]
    if policy == "drop":
        return order[~mask], int(mask.sum())
    return np.concatenate([order[~mask], order[mask]]), 0


def nearest(history: FloatArray, items: FloatArray) -> tuple[np.ndarray, np.ndarray]:
    """For each item row, the index of and similarity to the most similar history row."""
    sims = np.asarray(items, dtype=np.float32) @ np.asarray(history, dtype=np.float32).T
    best = sims.argmax(axis=1)
    return best, sims[np.arange(sims.shape[0]), best]


def query_rows(user_vector: FloatArray, history: FloatArray | None = None) -> np.ndarray:
    """The rows a request's candidates are compared with, stacked: the user vector, then the history
    rows (float32, C order; `similarities` multiplies the candidates with all of them at once)."""
    rows = [np.asarray(user_vector, dtype=np.float32)[None, :]]
    if history is not None and len(history):
        rows.append(np.asarray(history, dtype=np.float32))
    out = np.ascontiguousarray(np.concatenate(rows)) if len(rows) > 1 else np.ascontiguousarray(rows[0])
    out.flags.writeable = False
    return out


def similarities(item_vectors: FloatArray, rows: np.ndarray) -> np.ndarray:
    """(m, n) float32: every query row (`query_rows`) against every candidate vector, in one array
    that the cosine (row 0) and attention (the history rows) both read.

    Measured at 500 candidates x 384, OpenBLAS 0.3.31 on one thread: one matrix-vector product per
    row costs 71 k instructions (callgrind) and about 13 us (thread CPU). A GEMM of stacked rows
    packs the candidate matrix first, so it costs more instructions at every row count (21 rows:
    1.60 M as the user row's product plus the 20 history rows' GEMM, 1.70 M as one GEMM, 1.48 M as
    21 products), but it reads the candidate vectors once and from about 8 rows takes less time (21
    rows: 115-155 us against 230-280 us as products). Hence: the user row is one matrix-vector
    product; the history rows are one (k, d) @ (d, n) product from _ATTENTION_GEMM_ROWS rows on, else
    one product each. Callgrind runs OpenBLAS's Haswell kernels (valgrind has no AVX-512); on an
    AVX-512 machine OpenBLAS runs its SkylakeX kernels, whose 2-row product takes about the time of
    one matrix-vector product (14 us) but 4.6x its instructions under callgrind and rounds
    differently, so it is not used. (A matrix-vector product rounds the same under both kernel sets;
    a GEMM does not, so the history rows' GEMM is the one result that depends on the machine.)"""
    items = np.asarray(item_vectors, dtype=np.float32)
    m = rows.shape[0]
    out = np.empty((m, items.shape[0]), dtype=np.float32)
    np.dot(items, rows[0], out=out[0])
    if m - 1 >= _ATTENTION_GEMM_ROWS:
        np.matmul(rows[1:], items.T, out=out[1:])
    else:
        for j in range(1, m):
            np.dot(items, rows[j], out=out[j])
    return out


def attention_scores(
    item_vectors: FloatArray,
    history: FloatArray,
    history_weights: FloatArray,
    temperature: float,
    own_rows: np.ndarray | None = None,
    sims: np.ndarray | None = None,
    pooling_weights: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Candidate-aware (target) attention over a user's history, one score in [-1, 1] per item.

    s_ci = v_i . c (history row i, candidate c), a_ci = softmax_i(s_ci / temperature), and
    att_c = sum_i a_ci * b_i * s_ci / sum_i a_ci * |b_i| with b_i the (signed, decayed) event
    weights: a weighted mean of signed similarities in which the history items most like the
    candidate count most. Disliked items similar to the candidate pull its score down. A high
    temperature approaches the plain b-weighted mean; a low one the most similar item alone.
    Cost O(n * k * d) for n candidates and k history rows. No history -> zeros.
    `own_rows` (k, n) marks history rows that are events on the candidate itself: they are left
    out of its pooling (a candidate is never similar to the user through its own past events).
    `sims` (k, n), when given, are the similarities v_i . c already computed (e.g. a view of the
    request's one product, `similarities`): they are read instead of multiplying again.
    `pooling_weights`, when given, is `attention_weights(history_weights)` already computed (the
    service keeps it with the user state).
    """
    items = np.asarray(item_vectors, dtype=np.float32)
    hist = np.asarray(history, dtype=np.float32)
    if hist.shape[0] == 0 or items.shape[0] == 0:
        return np.zeros(items.shape[0])
    weights = attention_weights(history_weights) if pooling_weights is None else pooling_weights
    if sims is not None:
        return _pooled(sims, weights, temperature, own_rows)
    # Rows are history items, so the reductions below are (k,) @ (k, n) products. A few rows: one
    # matrix-vector product each (cheaper than a matrix product's set-up); more: one (k, d) @ (d, n)
    # product, which reads the candidate vectors once (2x faster at k = 20). The server runs BLAS
    # on one thread (RerankService.load), so the product never waits on spinning BLAS threads.
    k = hist.shape[0]
    if k >= _ATTENTION_GEMM_ROWS:
        sims = hist @ items.T
    else:
        sims = np.empty((k, items.shape[0]), dtype=np.float32)  # (k, n)
        for j in range(k):
            np.dot(items, hist[j], out=sims[j])
    return _pooled(sims, weights, temperature, own_rows)


def attention_weights(history_weights: FloatArray) -> tuple[np.ndarray, np.ndarray] | None:
    """(b, |b|) float32: the history weights scaled to [-1, 1] as attention pooling multiplies them
    (num / den does not change when b is scaled, and float32 cannot overflow); None when no weight
    is nonzero and finite (the attention is then 0). Depends on the weights only: the service keeps
    it with the user state."""
    b64 = np.asarray(history_weights, dtype=np.float64)
    scale = float(np.abs(b64).max()) if b64.size else 0.0
    if not scale > 0.0 or not math.isfinite(scale):
        return None
    b = (b64 / scale).astype(np.float32)
    b.flags.writeable = False
    magnitude = np.abs(b)
    magnitude.flags.writeable = False
    return b, magnitude


def _pooled(
    sims: np.ndarray, weights: tuple[np.ndarray, np.ndarray] | None, temperature: float, own_rows: np.ndarray | None
) -> np.ndarray:
    """attention_scores from the (k, n) similarities of history rows and candidates, with the
    weights `attention_weights` made of the history weights."""
    if weights is None:
        return np.zeros(sims.shape[1])
    b, magnitude = weights
    if own_rows is not None:
        attn = sims.copy()
        np.copyto(attn, np.float32(-np.inf), where=own_rows)
        peak = attn.max(axis=0)
        finite = np.isfinite(peak)
        if not finite.all():
            peak[~finite] = 0.0  # a candidate whose every history row is its own: no pooling
        attn -= peak
    else:
        attn = sims - sims.max(axis=0)
    attn *= np.float32(1.0 / max(temperature, 1e-6))
    np.exp(attn, out=attn)  # 0 at a candidate's own rows (exp(-inf)), so they drop out of both sums
    den = magnitude @ attn
    attn *= sims
    num = b @ attn
    # float32 division, cast to float64 (what np.divide does with a float64 `out`)
    if den.min() > 1e-12:
        return np.divide(num, den, out=np.empty(num.shape, dtype=np.float64))
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 1e-12)


def personal_semantic(
    item_vectors: FloatArray,
    has_vector: FloatArray,
    user_vector: FloatArray,
    history: FloatArray,
    history_weights: FloatArray,
    *,
    attention_weight: float,
    temperature: float,
    own_rows: np.ndarray | None = None,
    cosine: np.ndarray | None = None,
    sims: np.ndarray | None = None,
    pooling_weights: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Semantic score = (1 - a) * cos(u, c) + a * attention_scores(c); a = attention_weight.

    Rows without a vector score 0. With a = 0 (or no history) this is the plain cosine.
    `cosine` replaces cos(u, c) (e.g. with leave-one-out user vectors for consumed candidates);
    `own_rows` (history rows x candidates) leaves a candidate's own events out of its attention;
    `sims` (history rows x candidates) are the similarities already computed (`similarities`);
    `pooling_weights` is `attention_weights(history_weights)` already computed.
    """
    has_vector = np.asarray(has_vector, dtype=bool)
    if cosine is None:
        cosine = np.asarray(item_vectors, dtype=np.float32) @ np.asarray(user_vector, dtype=np.float32)
    semantic = np.asarray(cosine, dtype=np.float64)
    if attention_weight > 0.0 and len(history):
        att = attention_scores(item_vectors, history, history_weights, temperature, own_rows, sims, pooling_weights)
        semantic = semantic * (1.0 - attention_weight)  # a new array: `cosine` is the caller's
        att *= attention_weight
        semantic += att
    if not has_vector.all():
        if semantic is cosine:
            semantic = semantic.copy()
        semantic[~has_vector] = 0.0
    return semantic


def single_threaded_blas() -> None:
    """Run numpy's BLAS on one thread, process-wide (the server does, at load).

    Scoring's products are small (hundreds x 384 x tens): a multi-threaded BLAS gains nothing on
    them and, on a busy machine, its threads spin-wait for other processes' cores: measured p50
    0.3 ms on one thread vs 50 ms with the default threads on 2 loaded cores for the trained
    head's products (reranker bench head). The encoders run on their own thread pools (torch,
    ONNX Runtime) and are not affected.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
