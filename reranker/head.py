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

"Adapted" vectors are the frozen encoder vectors v mapped to v + (v @ down) @ up (a low-rank residual
adapter, i.e. the identity at start, trained with a next-item softmax objective), then L2-normalized. Item popularity is a
table carried in the artefact (counted on the training events), so it is fixed until the head is
retrained; unknown items get 0.

Artefact: a .npz with arrays (weights, mean, std, adapter_down/up, prior, popularity ids/values) and a JSON
`meta` string: format version, feature names, encoder version, training data hash and statistics.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reranker import scoring

FORMAT_VERSION = 1
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
)
# Features that need the candidate's vector; they are neutral (the training mean) without one.
VECTOR_FEATURES = tuple(i for i, name in enumerate(FEATURES) if not name.startswith(("upstream", "popularity")))


class HeadError(ValueError):
    """The artefact is missing, malformed, or does not fit the configured encoder."""


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
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.adapter_down.shape[0])

    @property
    def version(self) -> str:
        """`head-v<format>-<12 hex of the parameters>`: changes whenever the weights do."""
        digest = hashlib.sha256()
        for arr in (self.weights, self.mean, self.std, self.adapter_down, self.adapter_up, self.prior):
            digest.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
        ids = sorted(self.popularity)
        digest.update("\n".join(ids).encode())
        digest.update(np.array([self.popularity[i] for i in ids], dtype=np.float32).tobytes())
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
    ) -> np.ndarray:
        """(n, F) raw feature matrix. `history` is (h, d), oldest first (may be empty)."""
        upstream = np.asarray(upstream, dtype=np.float64)
        n = upstream.size
        out = np.zeros((n, len(FEATURES)), dtype=np.float64)
        out[:, 0] = scoring.minmax(upstream)
        ascending = np.sort(upstream)
        higher = n - np.searchsorted(ascending, upstream, side="right")
        out[:, 1] = 1.0 / np.log2(2.0 + higher)
        items = self.adapt(item_vectors)
        user = np.asarray(user_vector, dtype=np.float32)
        out[:, 2] = np.asarray(item_vectors, dtype=np.float32) @ user
        out[:, 3] = items @ self.adapt(user[None, :])[0]
        if len(history):
            hist = self.adapt(history)
            session = scoring.l2_normalize(hist[-self.session_length :].mean(axis=0))
            sims = items @ hist.T  # (n, h)
            out[:, 4] = items @ session
            out[:, 5] = sims.max(axis=1)
            logits = sims / self.attention_temperature
            logits -= logits.max(axis=1, keepdims=True)
            attn = np.exp(logits)
            out[:, 6] = (attn * sims).sum(axis=1) / attn.sum(axis=1)
            out[:, 7] = sims[:, -1]
        else:
            out[:, 4:8] = out[:, 3:4]
        out[:, 8] = items @ self.prior
        pop = self.popularity
        out[:, 9] = [pop.get(item_id, 0.0) for item_id in item_ids]
        return out

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
    ) -> np.ndarray:
        raw = self.features(item_ids, upstream, item_vectors, has_vector, user_vector, history)
        return self.standardize(raw, has_vector) @ self.weights

    def rank(
        self,
        item_ids: Sequence[str],
        upstream: np.ndarray,
        item_vectors: np.ndarray,
        has_vector: np.ndarray,
        user_vector: np.ndarray,
        history: np.ndarray,
        *,
        diversity: float = 0.0,
        mmr_window: int = 50,
        top_k: int = 0,
    ) -> scoring.Ranking:
        """Like scoring.rank, with the head's score as relevance (MMR and top_k apply the same way)."""
        has_vector = np.asarray(has_vector, dtype=bool)
        final = self.score(item_ids, upstream, item_vectors, has_vector, user_vector, history)
        semantic = np.where(has_vector, np.asarray(item_vectors, dtype=np.float32) @ user_vector, 0.0)
        order = scoring.order_by_score(final)
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
            version=self.version,
        )
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
                meta=np.array(json.dumps(meta, sort_keys=True)),
            )


def load(path: str | Path) -> RankingHead:
    """Read and validate an artefact written by `RankingHead.save` (no pickle)."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise HeadError(f"ranking head {path} does not exist") from None
    except Exception as exc:
        raise HeadError(f"ranking head {path} is not a readable .npz artefact: {exc}") from None
    required = ("weights", "mean", "std", "adapter_down", "adapter_up", "prior", "popularity_ids", "popularity_values", "meta")
    missing = [name for name in required if name not in arrays]
    if missing:
        raise HeadError(f"ranking head {path} lacks {', '.join(missing)}")
    meta = json.loads(str(arrays["meta"]))
    if meta.get("format_version") != FORMAT_VERSION:
        raise HeadError(f"ranking head {path} has format {meta.get('format_version')}; this server reads {FORMAT_VERSION}")
    if list(meta.get("features", [])) != list(FEATURES):
        raise HeadError(f"ranking head {path} was trained on features {meta.get('features')}; expected {list(FEATURES)}")
    f, down, up = len(FEATURES), arrays["adapter_down"], arrays["adapter_up"]
    if any(arrays[name].shape != (f,) for name in ("weights", "mean", "std")):
        raise HeadError(f"ranking head {path} has arrays of the wrong shape")
    if down.ndim != 2 or up.shape != down.shape[::-1] or arrays["prior"].shape != (down.shape[0],):
        raise HeadError(f"ranking head {path} has an adapter of the wrong shape {down.shape} x {up.shape}")
    if not all(np.isfinite(arrays[n]).all() for n in ("weights", "mean", "std", "adapter_down", "adapter_up", "prior")):
        raise HeadError(f"ranking head {path} holds non-finite numbers")
    if (arrays["std"] <= 0).any():
        raise HeadError(f"ranking head {path} has non-positive feature scales")
    popularity = dict(zip(arrays["popularity_ids"].tolist(), arrays["popularity_values"].astype(float).tolist()))
    return RankingHead(
        weights=arrays["weights"],
        mean=arrays["mean"],
        std=arrays["std"],
        adapter_down=down.astype(np.float32),
        adapter_up=up.astype(np.float32),
        prior=arrays["prior"].astype(np.float32),
        popularity=popularity,
        encoder_version=str(meta.get("encoder_version", "")),
        session_length=int(meta.get("session_length", 10)),
        attention_temperature=float(meta.get("attention_temperature", 0.1)),
        meta=meta,
    )


def single_threaded_blas() -> None:
    """Run numpy's BLAS on one thread, process-wide.

    The head's products are small (100 x 384 x 64): a multi-threaded BLAS gains nothing on them and,
    on a busy machine, its threads spin-wait for other processes' cores: measured p50 0.3 ms on one
    thread vs 50 ms with the default threads on 2 loaded cores (scripts/bench_head.py). The encoder
    runs on torch's own thread pool and is not affected.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def check_encoder(head: RankingHead, encoder_version: str, dim: int) -> None:
    """Refuse a head trained on another model (vectors would not mean the same thing).

    The precision suffix (`/float32`, `/int8`) may differ: the vectors are close enough.
    """
    if head.dim != dim:
        raise HeadError(f"ranking head expects {head.dim}-d vectors; the encoder gives {dim}")
    if head.encoder_version.split("/")[0] != encoder_version.split("/")[0]:
        raise HeadError(f"ranking head was trained on encoder {head.encoder_version}; this server runs {encoder_version}")
