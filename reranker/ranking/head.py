"""Trained ranking head: request-time features and a learned linear scorer. Pure numpy, no I/O
except `load`/`save` of the versioned artefact.

The head replaces the fixed blend `(1 - w) * upstream + w * cosine` with a learned linear function
of standardized features that the server can compute from what it has at request time:

  upstream_minmax  upstream score scaled to [0, 1] within the request
  upstream_rank    1 / log2(2 + number of candidates with a strictly higher upstream score)
  zero_shot        cosine(user vector, item vector) in the encoder's space (the zero-shot signal)
  long_term        cosine of the adapted user vector and the adapted item vector
  session          cosine with the mean of the last `session_length` adapted history vectors
  max_sim          largest cosine to any recent history item (adapted space)
  attention        attention-pooled similarity: softmax(sims / T)-weighted mean of the history sims
  last_item        cosine to the most recent history item (recency of interest)
  item_prior       a learned direction in the adapted space: "items people go on to consume"
  popularity       log1p(interactions in the training histories) / log1p(max); 0 for unknown items
  covisit          sum over the user's recent liked items h (newest weighted 1, then
                   history_decay ** age, 0.8 by default) of cosine(h, item) on the binary
                   user x item matrix of the training histories (item-kNN similarity), from a
                   sparse top-k neighbour table carried in the artefact
  transition       the same sum over a directed "what follows h" table: how often the item came
                   within `window` events after h in the training histories (weight decay^(gap-1)),
                   divided by (all weight leaving h + 1), sparse top-k per item
  mf_foldin        implicit-ALS score y_item . u, with u folded in from the history items alone:
                   u = (Y'Y + alpha Yh'Yh + reg I)^-1 (1 + alpha) Yh' 1 (Y: item factors in the artefact)
  consumed         1 if the user already had an event on the candidate (reranker.users.consumed), else 0
  consumed_count   log1p(events on the candidate)
  consumed_recency 1 / (1 + log1p(hours from its newest event to the user's newest event)); 0 if never
  consumed_repeat  consumed x the user's repeat rate (share of their events on items already consumed)

Leave-one-out: every similarity feature compares a consumed candidate with the user *without* its
own past events: zero_shot and long_term with the user vector rebuilt without it
(reranker.users.profiles.candidate_history), session / max_sim / attention / last_item over the history
rows that are not its own, mf_foldin with its own rows removed from the fold-in (a Sherman-Morrison
downdate, exact), covisit / transition by construction (their tables hold no item-to-itself
weight). So the head learns the domain's repeat behaviour from the consumed_* features alone.

"Adapted" vectors are the frozen encoder vectors v mapped to v + (v @ down) @ up (a low-rank residual
adapter, i.e. the identity at start, trained with a next-item softmax objective), then L2-normalized. Item popularity is a
table carried in the artefact (counted on the training events), so it is fixed until the head is
retrained; unknown items get 0. The collaborative tables (covisit, transition, ALS factors) are the
same kind of thing: counted once on the training histories, frozen in the artefact, looked up by
item id at request time (history ids: the profile's vector history, newest `vector_history_size`
events with positive weight); an item or history item the tables never saw contributes 0. Each keeps at most k neighbours per item (`reranker train
--neighbours`, default 50); with the 32 ALS factors per item (`mf_foldin`: the user's factors are
folded in from the history items at request time, one f x f solve) the artefact grows linearly with
the catalog, about 2 x k x 8 + 4 x 32 bytes per item (~930 bytes; 1.8 MB for ml-100k).

Artefact: a .npz with arrays (weights, mean, std, adapter_down/up, prior, popularity ids/values, graph
ids, covisit/transition CSR indptr/indices/values, mf_factors) and a JSON `meta` string: format version,
feature names, encoder version, training data hash and statistics.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reranker.ranking import scoring
from reranker.history import CandidateHistory

# 2: + covisit/transition tables and ALS factors; 3: + re-consumption features (older heads must be retrained)
FORMAT_VERSION = 3
FEATURES = (
    "upstream_minmax",
    "upstream_rank",
    "zero_shot",
    "long_term",
    "session",
    "max_sim",
    "attention",
    "last_item",
    "item_prior",
    "popularity",
    "covisit",
    "transition",
    "mf_foldin",
    "consumed",
    "consumed_count",
    "consumed_recency",
    "consumed_repeat",
)
# Features that need the candidate's vector; they are neutral (the training mean) without one.
VECTOR_FEATURES = tuple(
    i for i, name in enumerate(FEATURES)
    if not name.startswith(("upstream", "popularity", "covisit", "transition", "mf_", "consumed"))
)


class HeadError(ValueError):
    """The artefact is missing, malformed, or does not fit the configured encoder."""


@dataclass(frozen=True)
class NeighbourTable:
    """Sparse top-k neighbours per item, CSR over the positions of `ItemGraph.ids`:
    the neighbours of item p are indices[indptr[p]:indptr[p + 1]] with weights values[...]."""

    indptr: np.ndarray  # int64 (n + 1,)
    indices: np.ndarray  # int32 (nnz,)
    values: np.ndarray  # float32 (nnz,)

    @staticmethod
    def empty(n: int) -> NeighbourTable:
        return NeighbourTable(np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32))

    def scores(self, candidates: np.ndarray, history: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """sum_h weights[h] * table[history[h], candidates[c]] for every candidate (positions; -1 = unknown)."""
        out = np.zeros(len(candidates))
        if not len(history) or not len(candidates):
            return out
        starts = self.indptr[history]
        lengths = self.indptr[history + 1] - starts
        total = int(lengths.sum())
        if total == 0:
            return out
        # Flat positions of all the history items' neighbour slices, without a Python loop.
        offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
        neighbours = self.indices[offsets]
        values = self.values[offsets] * np.repeat(weights, lengths)
        unique, inverse = np.unique(candidates, return_inverse=True)
        pos = np.minimum(np.searchsorted(unique, neighbours), len(unique) - 1)
        match = unique[pos] == neighbours
        acc = np.zeros(len(unique))
        np.add.at(acc, pos[match], values[match])
        out = acc[inverse]
        out[candidates < 0] = 0.0
        return out


@dataclass(frozen=True)
class ItemGraph:
    """Item-to-item tables counted on the training histories (see the module doc)."""

    ids: tuple[str, ...] = ()
    covisit: NeighbourTable = field(default_factory=lambda: NeighbourTable.empty(0))
    transition: NeighbourTable = field(default_factory=lambda: NeighbourTable.empty(0))
    # Implicit-ALS item factors (n, f) and their gram matrix Y^T Y (f, f), for the mf_foldin feature.
    factors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    alpha: float = 10.0
    reg: float = 0.1
    index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {item: p for p, item in enumerate(self.ids)})
        y = np.asarray(self.factors, dtype=np.float64)
        object.__setattr__(self, "_gram", y.T @ y)

    def foldin(self, candidates: np.ndarray, history: np.ndarray, leave_out: bool = False) -> np.ndarray:
        """ALS fold-in: the user's factors from the history items alone (confidence 1 + alpha each),
        u = (Y^T Y + alpha Yh^T Yh + reg I)^-1 (1 + alpha) Yh^T 1; score = Y[c] @ u (0 for unknown c).

        With `leave_out`, a candidate that is itself in the history (k times) is scored against the
        fold-in without those rows: with s = y.u and q = y' A^-1 y, the Sherman-Morrison downdate
        gives exactly (s - (1 + alpha) k q) / (1 - alpha k q)."""
        out = np.zeros(len(candidates))
        if not len(history) or self.factors.shape[1] == 0:
            return out
        yh = self.factors[history].astype(np.float64)
        f = yh.shape[1]
        a = self._gram + self.alpha * (yh.T @ yh) + self.reg * np.eye(f)  # type: ignore[attr-defined]
        user = np.linalg.solve(a, (1.0 + self.alpha) * yh.sum(axis=0))
        known = candidates >= 0
        out[known] = self.factors[candidates[known]] @ user
        if leave_out:
            positions, times = np.unique(history, return_counts=True)
            at = np.minimum(np.searchsorted(positions, candidates), positions.size - 1)
            own = known & (positions[at] == candidates)
            if own.any():
                k = times[at[own]].astype(np.float64)
                y = self.factors[candidates[own]].astype(np.float64)  # (m, f)
                q = np.einsum("mf,fm->m", y, np.linalg.solve(a, y.T))
                out[own] = (out[own] - (1.0 + self.alpha) * k * q) / (1.0 - self.alpha * k * q)
        return out

    def positions(self, item_ids: Sequence[str]) -> np.ndarray:
        get = self.index.get
        return np.fromiter((get(i, -1) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def tables(self) -> dict[str, NeighbourTable]:
        return {"covisit": self.covisit, "transition": self.transition}


@dataclass(frozen=True)
class RankingHead:
    weights: np.ndarray  # (F,)
    mean: np.ndarray  # (F,) feature standardization
    std: np.ndarray  # (F,)
    adapter_down: np.ndarray  # (d, r) } adapted = normalize(v + (v @ down) @ up): a low-rank residual
    adapter_up: np.ndarray  # (r, d)   } adapter, r << d, so adapting 100 candidates costs ~2 * 100 * d * r
    prior: np.ndarray  # (d,)
    popularity: Mapping[str, float]
    encoder_version: str
    session_length: int = 10
    attention_temperature: float = 0.1
    graph: ItemGraph = field(default_factory=ItemGraph)
    history_length: int = 50  # at most this many newest history ids feed covisit/transition
    history_decay: float = 0.8  # weight of a history item = decay ** (its age in events, newest = 0)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.adapter_down.shape[0])

    @property
    def version(self) -> str:
        """`head-v<format>-<12 hex of the parameters>`: changes whenever any number that changes a
        score does (every array, the popularity and graph tables, and each scalar of the meta that
        the features read)."""
        digest = hashlib.sha256()
        for arr in (self.weights, self.mean, self.std, self.adapter_down, self.adapter_up, self.prior):
            digest.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
        ids = sorted(self.popularity)
        digest.update("\n".join(ids).encode())
        digest.update(np.array([self.popularity[i] for i in ids], dtype=np.float32).tobytes())
        digest.update("\n".join(self.graph.ids).encode())
        for table in self.graph.tables().values():
            for arr, dtype in ((table.indptr, np.int64), (table.indices, np.int32), (table.values, np.float32)):
                digest.update(np.ascontiguousarray(arr, dtype=dtype).tobytes())
        digest.update(np.ascontiguousarray(self.graph.factors, dtype=np.float32).tobytes())
        digest.update(np.array([self.history_length, self.history_decay, self.graph.alpha, self.graph.reg,
                                self.session_length, self.attention_temperature], dtype=np.float64).tobytes())
        return f"head-v{FORMAT_VERSION}-{digest.hexdigest()[:12]}"

    # --- features and scoring --------------------------------------------------------------------
    def adapt(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        return scoring.l2_normalize(vectors + (vectors @ self.adapter_down) @ self.adapter_up)

    def features(
        self,
        item_ids: Sequence[str],
        upstream: np.ndarray,
        item_vectors: np.ndarray,
        has_vector: np.ndarray,
        user_vector: np.ndarray,
        history: np.ndarray,
        history_ids: Sequence[str] = (),
        seen: CandidateHistory | None = None,
    ) -> np.ndarray:
        """(n, F) raw feature matrix. `history` is (h, d) and `history_ids` the ids the user liked
        recently, both oldest first (may be empty). `seen` (reranker.users.profiles.candidate_history,
        its own_rows aligned with `history`) gives the re-consumption features and the
        leave-one-out comparisons; None = no candidate was consumed."""
        upstream = np.asarray(upstream, dtype=np.float64)
        n = upstream.size
        out = np.zeros((n, len(FEATURES)), dtype=np.float64)
        out[:, 0] = scoring.minmax(upstream)
        out[:, 1] = scoring.rank_discount(upstream)
        items = self.adapt(item_vectors)
        self._cosine_features(out, items, item_vectors, user_vector, seen)
        self._history_features(out, items, history, seen)
        out[:, 8] = items @ self.prior
        pop = self.popularity
        out[:, 9] = [pop.get(item_id, 0.0) for item_id in item_ids]
        if len(history_ids) and self.graph.ids:
            self._graph_features(out, item_ids, history_ids, seen)
        if seen is not None:
            _consumed_features(out, seen)
        return out

    def _cosine_features(
        self, out: np.ndarray, items: np.ndarray, item_vectors: np.ndarray, user_vector: np.ndarray,
        seen: CandidateHistory | None,
    ) -> None:
        """cosine (raw vectors) and long_term (adapted), each to the user vector without the
        candidate where it was consumed (leave-one-out)."""
        user = np.asarray(user_vector, dtype=np.float32)
        out[:, 3] = items @ self.adapt(user[None, :])[0]
        if seen is not None and seen.excluded is not None and seen.user_vectors is not None and seen.excluded.size:
            excluded = seen.excluded
            out[:, 2] = seen.cosine(item_vectors, user)
            out[excluded, 3] = np.einsum("md,md->m", items[excluded], self.adapt(seen.user_vectors))
        else:
            out[:, 2] = np.asarray(item_vectors, dtype=np.float32) @ user

    def _history_features(
        self, out: np.ndarray, items: np.ndarray, history: np.ndarray, seen: CandidateHistory | None
    ) -> None:
        """session / max_sim / attention / last_item against the (liked) history rows, each
        candidate's own rows left out; long_term's value where there is no history."""
        if not len(history):
            out[:, 4:8] = out[:, 3:4]
            return
        own = None if seen is None or seen.own_rows is None else seen.own_rows.T  # (n, h)
        if own is not None and not own.any():
            own = None
        hist = self.adapt(history)
        tail = hist[-self.session_length :]
        sims = items @ hist.T  # (n, h)
        out[:, 4] = items @ scoring.l2_normalize(tail.mean(axis=0))
        if own is not None:
            self._leave_own_rows_out(out, items, tail, sims, own)
            return
        out[:, 5] = sims.max(axis=1)
        logits = sims / self.attention_temperature
        logits -= logits.max(axis=1, keepdims=True)
        attn = np.exp(logits)
        out[:, 6] = (attn * sims).sum(axis=1) / attn.sum(axis=1)
        out[:, 7] = sims[:, -1]

    def _graph_features(
        self, out: np.ndarray, item_ids: Sequence[str], history_ids: Sequence[str], seen: CandidateHistory | None
    ) -> None:
        """covisit / transition / foldin from the item graph, over the newest `history_length` liked
        ids (decayed by age in events)."""
        hist = self.graph.positions(list(history_ids)[-self.history_length :])
        weights = self.history_decay ** np.arange(len(hist) - 1, -1, -1, dtype=np.float64)
        known = hist >= 0
        hist, weights = hist[known], weights[known]
        cands = self.graph.positions(item_ids)
        out[:, 10] = self.graph.covisit.scores(cands, hist, weights)
        out[:, 11] = self.graph.transition.scores(cands, hist, weights)
        out[:, 12] = self.graph.foldin(cands, hist, leave_out=seen is not None and bool(seen.consumed.any()))

    def _leave_own_rows_out(
        self, out: np.ndarray, items: np.ndarray, tail: np.ndarray, sims: np.ndarray, own: np.ndarray
    ) -> None:
        """session / max_sim / attention / last_item over the history rows that are not the
        candidate's own (`own` (n, h)); a candidate with no other row gets its long_term value."""
        h = sims.shape[1]
        others = ~own
        none_left = ~others.any(axis=1)
        t = tail.shape[0]
        own_tail = own[:, h - t :].astype(np.float32)  # (n, t)
        kept = t - own_tail.sum(axis=1)
        pooled = tail.sum(axis=0)[None, :] - own_tail @ tail  # (n, d): the session sum without own rows
        norms = np.linalg.norm(pooled, axis=1)
        session = np.einsum("nd,nd->n", items, pooled) / np.maximum(norms, 1e-12)
        out[:, 4] = np.where(kept > 0, session, out[:, 3])
        masked = np.where(own, -np.inf, sims)
        best = masked.max(axis=1)
        logits = (masked - np.where(none_left, 0.0, best)[:, None]) / self.attention_temperature
        attn = np.exp(logits)  # own rows: exp(-inf) = 0
        total = attn.sum(axis=1)
        pooled_sims = (attn * np.where(own, 0.0, sims)).sum(axis=1)
        last = h - 1 - np.argmax(others[:, ::-1], axis=1)  # newest row that is not the candidate's own
        out[:, 5] = np.where(none_left, out[:, 3], best)
        out[:, 6] = np.where(none_left, out[:, 3], pooled_sims / np.maximum(total, 1e-300))
        out[:, 7] = np.where(none_left, out[:, 3], sims[np.arange(sims.shape[0]), last])

    def standardize(self, raw: np.ndarray, has_vector: np.ndarray) -> np.ndarray:
        z = (raw - self.mean) / self.std
        missing = ~np.asarray(has_vector, dtype=bool)
        if missing.any():
            z[np.ix_(missing, list(VECTOR_FEATURES))] = 0.0
        return z

    def score(
        self,
        item_ids: Sequence[str],
        upstream: np.ndarray,
        item_vectors: np.ndarray,
        has_vector: np.ndarray,
        user_vector: np.ndarray,
        history: np.ndarray,
        history_ids: Sequence[str] = (),
        seen: CandidateHistory | None = None,
    ) -> np.ndarray:
        raw = self.features(item_ids, upstream, item_vectors, has_vector, user_vector, history, history_ids, seen)
        return self.standardize(raw, has_vector) @ self.weights

    def rank(
        self,
        item_ids: Sequence[str],
        upstream: np.ndarray,
        item_vectors: np.ndarray,
        has_vector: np.ndarray,
        user_vector: np.ndarray,
        history: np.ndarray,
        history_ids: Sequence[str] = (),
        *,
        diversity: float = 0.0,
        mmr_window: int = 50,
        top_k: int = 0,
        seen: CandidateHistory | None = None,
    ) -> scoring.Ranking:
        """Like scoring.rank, with the head's score as relevance (MMR and top_k apply the same way)."""
        has_vector = np.asarray(has_vector, dtype=bool)
        raw = self.features(item_ids, upstream, item_vectors, has_vector, user_vector, history, history_ids, seen)
        final = self.standardize(raw, has_vector) @ self.weights
        semantic = np.where(has_vector, raw[:, 2], 0.0)  # zero_shot: the (leave-one-out) cosine to the user
        order = scoring.order_by_score(final)
        if diversity > 0.0:  # MMR's relevance, scaled; without diversity the order stands
            order = scoring.mmr_order(order, scoring.minmax(final), item_vectors, has_vector, diversity, mmr_window)
        if top_k > 0:
            order = order[:top_k]
        return scoring.Ranking(order=order, final=final, semantic=semantic)

    # --- artefact --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        meta = dict(self.meta)
        meta.update(
            format_version=FORMAT_VERSION,
            features=list(FEATURES),
            encoder_version=self.encoder_version,
            session_length=self.session_length,
            attention_temperature=self.attention_temperature,
            history_length=self.history_length,
            history_decay=self.history_decay,
            mf_alpha=self.graph.alpha,
            mf_reg=self.graph.reg,
            version=self.version,
        )
        tables = {
            f"{name}_{part}": getattr(table, part)
            for name, table in self.graph.tables().items()
            for part in ("indptr", "indices", "values")
        }
        ids = np.array(list(self.popularity), dtype=str)
        values = np.array([self.popularity[i] for i in ids.tolist()], dtype=np.float32)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with Path(path).open("wb") as fh:
            np.savez(
                fh,
                weights=self.weights.astype(np.float64),
                mean=self.mean.astype(np.float64),
                std=self.std.astype(np.float64),
                adapter_down=self.adapter_down.astype(np.float32),
                adapter_up=self.adapter_up.astype(np.float32),
                prior=self.prior.astype(np.float32),
                popularity_ids=ids,
                popularity_values=values,
                graph_ids=np.array(self.graph.ids, dtype=str),
                mf_factors=np.asarray(self.graph.factors, dtype=np.float32),
                **tables,
                meta=np.array(json.dumps(meta, sort_keys=True)),
            )


def _consumed_features(out: np.ndarray, seen: CandidateHistory) -> None:
    """consumed / log count / recency / repeat rate: what the user's history says about each candidate."""
    consumed = seen.consumed
    out[:, 13] = consumed
    out[:, 14] = np.log1p(seen.counts)
    with np.errstate(divide="ignore"):
        out[:, 15] = np.where(consumed, 1.0 / (1.0 + np.log1p(np.minimum(seen.hours_since, 1e12))), 0.0)
    out[:, 16] = consumed * seen.repeat_rate


def _read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of the .npz at `path` (no pickle); HeadError when it is missing or unreadable."""
    try:
        # Opened here: np.load leaks its own handle when the file is not a valid zip (a torn hot-reload file).
        with Path(path).open("rb") as fh, np.load(fh, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise HeadError(f"ranking head {path} does not exist") from None
    except Exception as exc:
        raise HeadError(f"ranking head {path} is not a readable .npz artefact: {exc}") from None


def _read_meta(path: str | Path, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The artefact's meta block, checked to be of this server's format."""
    if "meta" not in arrays:
        raise HeadError(f"ranking head {path} lacks meta")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as exc:
        raise HeadError(f"ranking head {path} has an unreadable meta block: {exc}") from None
    if not isinstance(meta, dict):
        raise HeadError(f"ranking head {path}: its meta block is not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise HeadError(
            f"ranking head {path} has format {meta.get('format_version')}; this server reads format {FORMAT_VERSION} "
            "(retrain it with `reranker train`)"
        )
    return meta


def _check_present(path: str | Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Every array a head needs is there, and it was trained on this server's features."""
    tables = [f"{name}_{part}" for name in ("covisit", "transition") for part in ("indptr", "indices", "values")]
    required = ("weights", "mean", "std", "adapter_down", "adapter_up", "prior", "popularity_ids", "popularity_values",
                "graph_ids", "mf_factors", *tables)
    missing = [name for name in required if name not in arrays]
    if missing:
        raise HeadError(f"ranking head {path} lacks {', '.join(missing)}")
    if list(meta.get("features", [])) != list(FEATURES):
        raise HeadError(f"ranking head {path} was trained on features {meta.get('features')}; expected {list(FEATURES)}")


def _check_values(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """The weights, scaling, adapter and popularity arrays have their shapes and stay in range."""
    f, down, up = len(FEATURES), arrays["adapter_down"], arrays["adapter_up"]
    if any(arrays[name].shape != (f,) for name in ("weights", "mean", "std")):
        raise HeadError(f"ranking head {path} has arrays of the wrong shape")
    if down.ndim != 2 or up.shape != down.shape[::-1] or arrays["prior"].shape != (down.shape[0],):
        raise HeadError(f"ranking head {path} has an adapter of the wrong shape {down.shape} x {up.shape}")
    for name in ("weights", "mean", "adapter_down", "adapter_up", "prior", "mf_factors", "covisit_values",
                 "transition_values"):
        _check_range(path, name, arrays[name], -PARAMETER_LIMIT, PARAMETER_LIMIT)
    _check_range(path, "std", arrays["std"], MIN_STD, PARAMETER_LIMIT)
    _check_range(path, "popularity_values", arrays["popularity_values"], 0.0, 1.0)
    if arrays["popularity_values"].shape != arrays["popularity_ids"].shape:
        raise HeadError(f"ranking head {path} has {arrays['popularity_ids'].size} popularity ids and "
                        f"{arrays['popularity_values'].size} values")


def load(path: str | Path) -> RankingHead:
    """Read and validate an artefact written by `RankingHead.save` (no pickle)."""
    arrays = _read_arrays(path)
    meta = _read_meta(path, arrays)
    _check_present(path, arrays, meta)
    _check_values(path, arrays)
    down, up = arrays["adapter_down"], arrays["adapter_up"]
    scalars = _meta_scalars(path, meta)
    popularity = dict(zip(arrays["popularity_ids"].tolist(), arrays["popularity_values"].astype(float).tolist()))
    graph = _load_graph(path, arrays, scalars)
    return RankingHead(
        weights=arrays["weights"],
        mean=arrays["mean"],
        std=arrays["std"],
        adapter_down=down.astype(np.float32),
        adapter_up=up.astype(np.float32),
        prior=arrays["prior"].astype(np.float32),
        popularity=popularity,
        encoder_version=str(meta.get("encoder_version", "")),
        session_length=int(scalars["session_length"]),
        attention_temperature=scalars["attention_temperature"],
        graph=graph,
        history_length=int(scalars["history_length"]),
        history_decay=scalars["history_decay"],
        meta=meta,
    )


# What a head file may hold. Within these bounds every feature, standardized and weighted, stays a
# finite float64 for any finite input (features are cosines, [0, 1] tables and log counts).
PARAMETER_LIMIT = 1e6  # |x| of any weight, mean, adapter, prior, factor or table value
MIN_STD = 1e-6  # the trainer's floor for a feature's scale
# meta scalars the features read: (default, low, high, integer)
META_RANGES: dict[str, tuple[float, float, float, bool]] = {
    "session_length": (10, 1, 10_000, True),
    "history_length": (50, 1, 100_000, True),
    "attention_temperature": (0.1, 1e-3, 1e3, False),  # sims / T, sims in [-1, 1]
    "history_decay": (0.8, 1e-6, 1.0, False),
    "mf_alpha": (10.0, 0.0, PARAMETER_LIMIT, False),
    "mf_reg": (0.1, 1e-9, PARAMETER_LIMIT, False),  # > 0: the fold-in's system stays solvable
}


def _check_range(path: str | Path, name: str, values: np.ndarray, low: float, high: float) -> None:
    if not np.issubdtype(values.dtype, np.number):
        raise HeadError(f"ranking head {path}: {name} holds {values.dtype}, not numbers")
    bad = ~np.isfinite(values) | (values < low) | (values > high)
    if bad.any():
        first = values.flat[int(np.flatnonzero(bad.ravel())[0])]
        raise HeadError(f"ranking head {path}: {name} holds {int(bad.sum())} value(s) that are not finite or outside "
                        f"[{low:g}, {high:g}], the first {float(first)!r}")


def _meta_scalars(path: str | Path, meta: Mapping[str, Any]) -> dict[str, float]:
    """The meta's scoring scalars, each a finite number in META_RANGES (HeadError naming it if not)."""
    out = {}
    for name, (default, low, high, integer) in META_RANGES.items():
        value = meta.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)) \
                or not (math.isfinite(value) and low <= value <= high):
            kind = "an integer" if integer else "a number"
            raise HeadError(f"ranking head {path}: meta {name} must be {kind} in [{low:g}, {high:g}], got {value!r}")
        out[name] = float(value)
    return out


def _is_neighbour_table(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n: int) -> bool:
    """A CSR table over `n` items: integer row pointers from 0 to the entry count, never falling,
    integer columns in [0, n), one finite value per entry."""
    shaped = (
        indptr.shape == (n + 1,) and indices.ndim == 1 and values.shape == indices.shape
        and np.issubdtype(indptr.dtype, np.integer) and np.issubdtype(indices.dtype, np.integer)
    )
    return bool(
        shaped and indptr[0] == 0 and indptr[-1] == indices.size and (np.diff(indptr) >= 0).all()
        and (indices.size == 0 or (indices.min() >= 0 and indices.max() < n))
        and np.isfinite(values).all()
    )


def _load_graph(path: str | Path, arrays: Mapping[str, np.ndarray], scalars: Mapping[str, float]) -> ItemGraph:
    ids = tuple(arrays["graph_ids"].tolist())
    n = len(ids)
    tables = {}
    for name in ("covisit", "transition"):
        indptr, indices, values = (arrays[f"{name}_{part}"] for part in ("indptr", "indices", "values"))
        if not _is_neighbour_table(indptr, indices, values, n):
            raise HeadError(f"ranking head {path} has a malformed {name} table")
        tables[name] = NeighbourTable(indptr.astype(np.int64), indices.astype(np.int32), values.astype(np.float32))
    factors = arrays["mf_factors"]
    if factors.ndim != 2 or (factors.size and factors.shape[0] != n) or not np.isfinite(factors).all():
        raise HeadError(f"ranking head {path} has malformed mf_factors {factors.shape} for {n} items")
    return ItemGraph(
        ids, tables["covisit"], tables["transition"], factors.astype(np.float32),
        alpha=scalars["mf_alpha"], reg=scalars["mf_reg"],
    )


def check_encoder(head: RankingHead, encoder_version: str, dim: int) -> None:
    """Refuse a head trained on another model (vectors would not mean the same thing).

    The precision suffix (`/float32`, `/int8`) may differ: the vectors are close enough.
    """
    if head.dim != dim:
        raise HeadError(f"ranking head expects {head.dim}-d vectors; the encoder gives {dim}")
    if head.encoder_version.split("/")[0] != encoder_version.split("/")[0]:
        raise HeadError(f"ranking head was trained on encoder {head.encoder_version}; this server runs {encoder_version}")
